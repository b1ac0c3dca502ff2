"""A small byte-level BPE tokenizer trained on the author's own text, and a model config to train from scratch.

    python dataset.py tokenizer            # configs/austen-tiny: 4,096 tokens from the Austen training split
    python dataset.py tokenizer --data my_author.jsonl --vocab-size 8192 --out configs/my-author-tiny

In a small model, GPT-2's 50,257-token output layer is most of the compute of a step; a 4,096-token
vocabulary cuts it twelvefold and, fit to one author, spends its merges on her words. The tokenizer is
byte-level like GPT-2's (any text encodes, nothing is unknown) and has one special token, `<|endoftext|>`,
which frames paragraphs exactly as GPT-2's does. It learns from the training split only (train.py's split
with the same --train-size and --seed), so validation text stays unseen.

The output folder also gets the model config, ready for `train.py --model <out> --from-scratch`: --config's
architecture with this vocabulary, --layers blocks and --dropout. The defaults (2 blocks, no dropout) suit a
short run on a CPU: two epochs of 2 blocks reach lower loss than one epoch of 4 in about the same time, and a
model that sees each paragraph twice underfits, so dropout only slows it. Rebuilding gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_bpe(paragraphs: list[str], vocab_size: int, special_tokens: tuple[str, ...] = (END_OF_TEXT,)):
    """A byte-level BPE with `vocab_size` tokens (the special tokens, 256 bytes, then merges) fit to `paragraphs`."""

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(paragraphs, trainer)
    return tokenizer


def save_tokenizer_and_config(
    tokenizer, template_config: Path, out: Path, layers: int, dropout: float, positions: int | None = None
) -> None:
    """The tokenizer as a transformers fast tokenizer, and `template_config` with this vocabulary, `layers`
    transformer blocks, `dropout` (GPT-2's embedding, attention and residual dropout) and `positions` (None:
    the template's)."""

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )
    fast.save_pretrained(out)
    config = json.loads(template_config.read_text())
    end_of_text = fast.convert_tokens_to_ids(END_OF_TEXT)
    config.update(vocab_size=len(fast), bos_token_id=end_of_text, eos_token_id=end_of_text, n_layer=layers)
    config.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    if positions is not None:
        config.update(n_positions=positions)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
