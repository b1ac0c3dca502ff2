"""Fine-tune a causal language model on one author's paragraphs (default: GPT-2 on Jane Austen's six novels).

  python train.py                                                        # gpt2, austen_dataset.pkl, 4 epochs
  python train.py --config configs/quickstart.yaml                       # offline CPU: the shipped base
  python train.py --resume                                               # continue after an interruption
  python train.py --model models/austen-tiny --self-play-rounds 3 ...    # self-play (SPIN) on a fine-tuned model

Settings first, then set-up (everything that can fail on bad input fails there, before any work or
write), then the loop. One hand-written loop on an accelerate.Accelerator, which owns the device, mixed
precision and multi-process distribution: the same code runs on a CPU, one GPU or many.
"""

from __future__ import annotations

import sys

from austen_gpt.cli import quiet_libraries, run_cli
from austen_gpt.training.flags import given_settings, train_settings
from austen_gpt.training.settings import check_settings


def main(argv: list[str] | None = None) -> int:
    settings = train_settings(argv, __doc__)
    check_settings(settings)
    quiet_libraries()
    # imported once the flags are good: torch and transformers take seconds, --help and a bad flag answer at once
    from austen_gpt.models.saving import DiskFull
    from austen_gpt.training.checkpoints import resume_command
    from austen_gpt.training.loop import train
    from austen_gpt.training.self_play import self_play_split

    settings = self_play_split(settings, given_settings(argv), print)  # self-play: the model's own split
    resume_cmd = resume_command(sys.argv[1:] if argv is None else argv)
    try:
        return train(settings, resume_cmd)
    except DiskFull as full:
        raise DiskFull(f"{full}. Free some space, then resume with: {resume_cmd}") from None


if __name__ == "__main__":
    run_cli(main)
