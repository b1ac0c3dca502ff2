"""austen_gpt: teach a causal language model to write in one author's style, and measure whether it does.

Subpackages by job, each importing only those below it: data, models, sampling, style, training
(cli and flags, the shared command-line parts, sit under them all). The scripts at the project's top
(train.py, inference.py, ...) parse flags and call into here; utils.py is the notebook API.
"""
