"""Merge LoRA adapters into their base model and save a standalone model that plain transformers loads.

  python export.py --adapter GPT2_fine_tuned_Austen --out GPT2_Austen_merged

The base is loaded in full precision (fp32), never quantized, so the merged weights are exact: the
merged model's logits match the adapter model's within float rounding. GPT-2's tied token embedding
stays tied (the adapters never touch it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from austen_gpt.cli import ArgumentParser, UserError, add_bool_flag, add_flag, quiet_libraries, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(
        p, "--adapter", required=True, help="adapter folder: train.py's --output-dir or a checkpoint of a LoRA run"
    )
    add_flag(p, "--out", required=True, help="folder for the merged model")
    add_flag(p, "--base-model", default=None, help="base model (default: the one in adapter_config.json)")
    add_bool_flag(p, "--overwrite", help="replace a model already in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not args.overwrite):
        raise UserError(f"--out {out} already exists; pass --overwrite or choose another folder")
    quiet_libraries()

    from austen_gpt.models import lora
    from austen_gpt.models.loading import load_model, load_tokenizer
    from austen_gpt.models.saving import save_model_folder

    if not lora.is_adapter_folder(args.adapter):
        raise UserError(f"{args.adapter} is not an adapter folder (no {lora.ADAPTER_CONFIG}); pass a LoRA run's output")
    base = args.base_model or lora.adapter_base_model(args.adapter)
    try:
        model = load_model(base)
    except UserError as err:
        raise UserError(
            f"the adapters in {args.adapter} need their base model {base}: {err}; pass --base-model"
        ) from None
    merged = lora.load_lora(model, Path(args.adapter), quantized=False, trainable=False).merge_and_unload()
    save_model_folder(out, merged, load_tokenizer(args.adapter), replace=args.overwrite)
    print(f"merged {args.adapter} into {base}: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
