"""Training: train.py's flags, set-up and loop, the step, state, checkpoints, processes and logs."""
