"""Export a trained model: LoRA adapters merged into their base as a standalone model folder, or any model as a
GGUF file for llama.cpp, Ollama and LM Studio.

  python export.py --adapter GPT2_fine_tuned_Austen --out GPT2_Austen_merged
  python export.py --model-path models/base-tiny --out configs/base-tiny --dtype bf16      # half the size
  python export.py --model-path GPT2_fine_tuned_Austen --gguf austen.gguf                  # f16, and austen.Modelfile
  python export.py --model-path models/austen-tiny --gguf austen-tiny.gguf --gguf-type q8_0
  python export.py --adapter my_adapters --gguf mine.gguf --gguf-type q4_k_m   # merged first; needs llama-cpp-python

The base is loaded in full precision (fp32), never quantized, so the merged weights are exact: the
merged model's logits match the adapter model's within float rounding. GPT-2's tied token embedding
stays tied (the adapters never touch it). A GGUF file holds GPT-2, Llama or Qwen2 weights and the tokenizer,
and an Ollama Modelfile is written beside it (docs/export.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from austen_gpt.cli import ArgumentParser, UserError, add_bool_flag, add_flag, quiet_libraries, require, run_cli

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
FOLDER_DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(p, "--adapter", default=None, help="adapter folder: train.py's --output-dir or a checkpoint of a LoRA run")
    add_flag(p, "--model-path", default=None, help="a full model folder (or an adapter folder), for --gguf or --out")
    add_flag(p, "--out", default=None, help="folder for the merged model (or a copy of --model-path at --dtype)")
    add_flag(
        p,
        "--dtype",
        choices=FOLDER_DTYPES,
        default="fp32",
        help="the --out folder's weights: fp32, or bf16 / fp16 at half the size (training loads them back as fp32)",
    )
    add_flag(p, "--gguf", default=None, metavar="OUT.gguf", help="write a GGUF file instead (and OUT.Modelfile)")
    add_flag(
        p,
        "--gguf-type",
        choices=GGUF_TYPES,
        default="f16",
        help="the GGUF's weights: f32, f16, q8_0, or q4_k_m (by llama.cpp's quantizer: needs llama-cpp-python)",
    )
    add_flag(p, "--base-model", default=None, help="base model (default: the one in adapter_config.json)")
    add_bool_flag(p, "--overwrite", help="replace a model already in --out, or the --gguf file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = args.model_path or args.adapter
    require(
        [
            (source, "give --adapter FOLDER (merge into --out) or --model-path FOLDER (with --gguf OUT.gguf or --out)"),
            (not (args.model_path and args.adapter), "--adapter and --model-path: give one"),
            (args.out or args.gguf, "give --out FOLDER for the merged model, or --gguf OUT.gguf"),
        ]
    )
    if args.gguf:
        return export_gguf(args, source)
    out = Path(args.out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not args.overwrite):
        raise UserError(f"--out {out} already exists; pass --overwrite or choose another folder")
    quiet_libraries()

    import torch

    from austen_gpt.models import lora
    from austen_gpt.models.loading import load_model, load_tokenizer
    from austen_gpt.models.saving import save_model_folder

    if lora.is_adapter_folder(source):
        base, model = merged_model(source, args.base_model)
        done = f"merged {source} into {base}"
    elif args.adapter:
        raise UserError(f"{source} is not an adapter folder (no {lora.ADAPTER_CONFIG}); pass a LoRA run's output")
    else:
        model, done = load_model(source, dtype=torch.float32), f"copied {source}"
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    save_model_folder(out, model, load_tokenizer(source), replace=args.overwrite)
    print(f"{done}: {out} ({args.dtype})")
    return 0


def merged_model(adapters: str, base_model: str | None):
    """(the base's name, the adapters merged into it loaded in fp32)."""
    import torch

    from austen_gpt.models import lora
    from austen_gpt.models.loading import load_model

    base = base_model or lora.adapter_base_model(adapters)
    try:
        # fp32 whatever the base's checkpoint holds (the shipped base is bf16): merged in bf16, the adapters'
        # small updates would be rounded away; --dtype rounds the merged weights once, at the end
        model = load_model(base, dtype=torch.float32)
    except UserError as err:
        raise UserError(f"the adapters in {adapters} need their base model {base}: {err}; pass --base-model") from None
    return base, lora.load_lora(model, Path(adapters), quantized=False, trainable=False).merge_and_unload()


def export_gguf(args: argparse.Namespace, source: str) -> int:
    """The model (adapters merged first) as a GGUF file and an Ollama Modelfile beside it."""
    out = Path(args.gguf)
    modelfile_path = out.with_suffix(".Modelfile")
    require(
        [
            (out.suffix == ".gguf", f"--gguf {out}: name the file OUT.gguf"),
            (out.parent.is_dir(), f"--gguf {out}: the folder {out.parent} does not exist; create it first"),
            (
                args.overwrite or not (out.exists() or modelfile_path.exists()),
                f"--gguf {out}: {out if out.exists() else modelfile_path} already exists; pass --overwrite",
            ),
        ]
    )
    if args.gguf_type == "q4_k_m":
        try:
            import llama_cpp  # noqa: F401  (its quantizer is llama.cpp's own)
        except ImportError:
            raise UserError("--gguf-type q4_k_m needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    quiet_libraries()

    from austen_gpt.models import lora
    from austen_gpt.models.gguf_file import Provenance, modelfile, quantize_q4_k_m, write_gguf
    from austen_gpt.models.loading import load_model, load_tokenizer
    from austen_gpt.models.saving import run_settings
    from austen_gpt.sampling.generation import context_length
    from austen_gpt.sampling.loading import sampling_of_run
    from austen_gpt.settings import SamplingSettings

    model = merged_model(source, args.base_model)[1] if lora.is_adapter_folder(source) else load_model(source)
    tokenizer, context = load_tokenizer(source), context_length(model)
    run = run_settings(source) or {}
    provenance = Provenance(Path(source).resolve().name, run.get("data"), run.get("output_dir"))
    partial = out.with_name(f".{out.name}.partial")  # written whole, then renamed: never a half file under the name
    if args.gguf_type == "q4_k_m":  # from f16, as llama.cpp's own quantize tool takes it
        f16 = write_gguf(model, tokenizer, partial.with_suffix(".f16"), "f16", context, provenance)
        quantize_q4_k_m(f16, partial)
        f16.unlink()
    else:
        write_gguf(model, tokenizer, partial, args.gguf_type, context, provenance)
    partial.replace(out)
    settings, _ = sampling_of_run(source, SamplingSettings(), set())
    modelfile_path.write_text(modelfile(out, tokenizer, settings, context))
    size = out.stat().st_size / 2**20
    print(f"{out} ({args.gguf_type}, {size:,.1f} MiB, context {context}) and {modelfile_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
