"""Sample paragraphs from a fine-tuned model.

  python inference.py --model-path GPT2_fine_tuned_Austen --prompt "It was a fine morning"
  python inference.py --model-path Checkpoints/Epoch_2 --prompt "Emma" --n-return-seqs 5 --seed 1
  python inference.py --prompt "Emma" --max-new-tokens 3000 --paragraphs 12 --output emma.md   # longer than the context
  python inference.py --prompts-file data/eval_prompts.txt --output samples.jsonl
  python inference.py --interactive                                  # the model loaded once, prompt after prompt
  python inference.py --model-path my_adapters --load-in-4bit --base-model gpt2-medium --prompt "Emma"
  python inference.py --model-path Qwen/Qwen2.5-0.5B-Instruct --few-shot 3 --prompt "Emma"  # docs/prompting.md

A folder of LoRA/QLoRA adapters (adapter_config.json) is recognised and loaded on its base model.
Samples come from batched `generate` calls with the KV cache, using the tokenizer saved with the model;
each starts as a new paragraph and stops after --paragraphs end-of-text tokens or its length. A length
beyond the model's context slides the window (generation.py says how far back the model sees). Each sample
has its own random numbers, from --seed, its prompt and its number: it is the same in any batch.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING

from austen_gpt.cli import (
    ArgumentParser,
    add_bool_flag,
    add_flag,
    add_original_qlora_flag,
    add_setting,
    quiet_libraries,
    read_original_qlora_flag,
    require,
    run_cli,
)
from austen_gpt.flags import add_sampling_flags, add_split_flags, sampling_rules
from austen_gpt.settings import SamplingSettings, from_flags
from austen_gpt.style.settings import MAX_RERANK

if TYPE_CHECKING:  # imported where used: torch and transformers take seconds, --help answers at once
    from austen_gpt.sampling.few_shot import FewShot

SAMPLING = SamplingSettings()  # the sampling flags' defaults and types


def build_parser() -> ArgumentParser:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(p, "--model-path", default="GPT2_fine_tuned_Austen", help="model or adapter folder, or a Hub id")
    add_flag(p, "--prompt", default="", help="text the samples continue; empty starts a fresh paragraph")
    add_flag(p, "--prompts-file", default=None, help="a text file of prompts, one per line (# comments), instead")
    add_bool_flag(p, "--interactive", help="load the model once, then read prompts and :commands (:help lists them)")
    add_flag(p, "--n-return-seqs", type=int, default=3, help="samples per prompt")
    add_setting(p, "--max-length", SAMPLING, "tokens per sample with the prompt")
    add_setting(
        p,
        "--max-new-tokens",
        SAMPLING,
        "tokens after the prompt; overrides --max-length; more than the model's context slides the window",
    )
    add_setting(p, "--paragraphs", SAMPLING, "stop a sample after this many paragraphs (end-of-text)")
    add_sampling_flags(p)
    add_setting(p, "--repetition-penalty", SAMPLING, "penalty on repeated tokens (not special ones); 1.0 is none")
    add_setting(
        p,
        "--static-cache",
        SAMPLING,
        "a preallocated KV cache, which transformers compiles on CUDA (a compile at the start, then faster "
        "tokens where Python overhead dominates; bench.py measures it on a GPU)",
    )
    add_flag(p, "--seed", type=int, default=None, help="makes samples reproducible; without it one is drawn and kept")
    add_flag(
        p,
        "--output",
        default=None,
        help="append the samples, with the model, prompt, settings, seed, date and the command that draws them "
        "again, to this .jsonl (a record per sample) or .md (for reading) file",
    )
    few = p.add_argument_group("few-shot prompting: the author's excerpts in the prompt (docs/prompting.md)")
    add_flag(few, "--few-shot", type=int, default=None, metavar="K", help="place K excerpts of the author first")
    add_flag(
        few, "--author", default=None, help="the author a chat model is asked to write as (bundled data: Jane Austen)"
    )
    add_flag(few, "--instruction", default=None, help="a chat model's instruction (default: continue as --author)")
    add_split_flags(
        few, ("--split-seed",), "split_seed", "train.py's --seed: the excerpts come from its training split"
    )
    judged = p.add_argument_group(
        "reranking: keep the candidate a judge finds most like the author (docs/inference.md)"
    )
    add_flag(
        judged,
        "--rerank",
        type=int,
        default=1,
        metavar="N",
        help="draw N candidates for each sample and keep one by the model's judge of the author's text against its "
        "own (fit on the training split the first time and saved beside the model); 1: every sample as drawn",
    )
    add_flag(
        judged,
        "--rerank-choice",
        choices=("sample", "best"),
        default="sample",
        help="sample: a candidate drawn in proportion to the judge's odds; best: the likeliest (less varied)",
    )
    add_flag(judged, "--rerank-temperature", type=float, default=1.0, help="sample's temperature on the odds")
    add_flag(p, "--base-model", default=None, help="base model of an adapter folder (default: its adapter_config.json)")
    add_bool_flag(p, "--load-in-4bit", help="quantize the (base) model to 4-bit NF4 with bitsandbytes")
    add_original_qlora_flag(p)
    return p


def parse_args(argv: list[str] | None = None, parser: ArgumentParser | None = None) -> argparse.Namespace:
    args = (parser or build_parser()).parse_args(argv)
    read_original_qlora_flag(args)
    return args


def check_settings(settings, n: int, prefix: str = "--") -> None:
    """Refuse sampling settings that cannot sample; names are flags (prefix '--') or session commands (':')."""
    require(
        [
            (n >= 1, f"{prefix}n-return-seqs must be at least 1"),
            (settings.max_length >= 1, f"{prefix}max-length must be at least 1"),
            (
                settings.max_new_tokens is None or settings.max_new_tokens >= 1,
                f"{prefix}max-new-tokens must be at least 1",
            ),
            (settings.paragraphs is None or settings.paragraphs >= 1, f"{prefix}paragraphs must be at least 1"),
            *sampling_rules(settings.top_k, settings.top_p, settings.temperature, prefix),
            (settings.repetition_penalty > 0, f"{prefix}repetition-penalty must be positive, e.g. 1.1"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    settings = from_flags(SamplingSettings, args)
    check_settings(settings, args.n_return_seqs)
    require(
        [
            (not (args.interactive and args.prompts_file), "--interactive and --prompts-file: choose one"),
            (args.few_shot is None or args.few_shot >= 0, "--few-shot must be 0 or more excerpts"),
            (1 <= args.rerank <= MAX_RERANK, f"--rerank must be 1 to {MAX_RERANK} candidates a sample"),
            (args.rerank_temperature > 0, "--rerank-temperature must be positive, e.g. 1.0"),
        ]
    )
    quiet_libraries()
    # imported once the flags are good: torch and transformers take seconds, --help and a bad flag answer at once
    from austen_gpt.sampling import records, session
    from austen_gpt.sampling.generation import (
        fresh_seed,
        generate_paragraphs,
        read_prompts,
        rows_per_call,
        sample_prompts,
    )

    # Every check on the user's input before the model loads (which takes long, and may download).
    output = records.check_output(args.output) if args.output else None
    prompts = read_prompts(args.prompts_file, "--prompts-file") if args.prompts_file else [args.prompt]
    at_terminal = session.check_stdin(sys.stdin) if args.interactive else False

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.loading import load_for_sampling, sampling_of_run

    # --few-shot's checks need the tokenizer (is it a chat model's?) and the split, before the model loads
    tokenizer = load_tokenizer(args.model_path) if args.few_shot is not None else None
    few_shot, prompt_flags = few_shot_setup(args, parser.given_dests(argv), tokenizer)
    model = load_for_sampling(args.model_path, args.base_model, args.load_in_4bit)
    settings, where = sampling_of_run(args.model_path, settings, parser.given_dests(argv))
    print(where, file=sys.stderr)
    tokenizer = tokenizer or load_tokenizer(args.model_path)
    judge = rerank_judge(args, parser.given_dests(argv), model, tokenizer, settings) if args.rerank > 1 else None
    if judge:
        prompt_flags += ("--rerank", str(args.rerank), "--rerank-choice", args.rerank_choice)
        prompt_flags += ("--rerank-temperature", str(args.rerank_temperature))
    source = records.Source(args.model_path, args.base_model, args.load_in_4bit, prompt_flags)

    seed = args.seed if args.seed is not None else fresh_seed()

    def kept(prompt: str, candidates: list[str], seed: int) -> list[str]:
        """The samples: as drawn, or one of each --rerank candidates, by the judge."""
        if judge is None:
            return candidates
        from austen_gpt.sampling.generation import prompt_ids
        from austen_gpt.style.judge import keep_one_in

        ids, how, heat = prompt_ids(tokenizer, prompt), args.rerank_choice, args.rerank_temperature
        return keep_one_in(args.rerank, candidates, judge, model, tokenizer, ids, how, heat, seed)

    def keep(prompt: str, texts: list[str], settings, seed: int, prompts_file: str | None = None, few=None) -> None:
        if output:
            records.append(output, records.records(source, prompt, texts, settings, seed, prompts_file, few))

    if args.interactive:
        if at_terminal:
            print(f"{args.model_path} loaded. A line is a prompt; :help lists the commands, Ctrl-D ends.")
        lines = session.terminal_lines() if at_terminal else session.piped_lines(sys.stdin)
        check = functools.partial(check_settings, prefix=":")
        chat = session.Session(model, tokenizer, settings, args.n_return_seqs, args.seed, check, keep, few_shot)
        chat.candidates, chat.pick = args.rerank, kept
        return chat.run(lines)

    if few_shot:  # each prompt after its own excerpts: one call per prompt
        for number, prompt in enumerate(prompts, 1):
            texts, record = few_shot.write(model, tokenizer, prompt, args.n_return_seqs * args.rerank, settings, seed)
            texts = kept(prompt, texts, seed)
            print(f"\n[{number}/{len(prompts)}] {prompt}\n" if args.prompts_file else "", end="")
            print("\n\n".join(f"{k}. {text}" for k, text in enumerate(texts, 1)) + "\n")
            keep(prompt, texts, settings, seed, args.prompts_file, record)
        return 0
    if not args.prompts_file:
        candidates = generate_paragraphs(
            model, tokenizer, args.prompt, args.n_return_seqs * args.rerank, settings, seed
        )
        texts = kept(args.prompt, candidates, seed)
        print("\n\n".join(f"{number}. {text}" for number, text in enumerate(texts, 1)) + "\n")
        keep(args.prompt, texts, settings, seed)
        return 0
    print(f"{len(prompts)} prompts x {args.n_return_seqs} samples, up to {rows_per_call(model)} in one call")
    drawn = sample_prompts(model, tokenizer, prompts, args.n_return_seqs * args.rerank, settings, seed)
    for number, (prompt, candidates) in enumerate(zip(prompts, drawn, strict=True), 1):
        texts = kept(prompt, candidates, seed)
        print(f"\n[{number}/{len(prompts)}] {prompt}\n")
        print("\n\n".join(f"{k}. {text}" for k, text in enumerate(texts, 1)))
        keep(prompt, texts, settings, seed, args.prompts_file)
    return 0


def run_split(args: argparse.Namespace, given: set[str]):
    """The split the samples draw on (--few-shot's excerpts, --rerank's judge): the model's run's own where it is
    a run's output (flags given override it), else the flags'."""
    from austen_gpt.settings import DataSettings
    from austen_gpt.style.report import take_split_from_runs

    data = from_flags(DataSettings, argparse.Namespace(**{**vars(args), "seed": args.split_seed}))
    given = {"seed" if dest == "split_seed" else dest for dest in given}
    return take_split_from_runs(data, [args.model_path], given)[0]


def rerank_judge(args: argparse.Namespace, given: set[str], model, tokenizer, settings):
    """--rerank's judge of the model: saved beside it, or fit now on its training split."""
    from austen_gpt.data.paragraphs import load_split
    from austen_gpt.style.judge import judge_for

    data = run_split(args, given)
    return judge_for(args.model_path, model, tokenizer, load_split(data)[0], str(data.data), settings, data.seed)


def few_shot_setup(args: argparse.Namespace, given: set[str], tokenizer) -> tuple[FewShot | None, tuple[str, ...]]:
    """--few-shot's prompting (the training split's paragraphs, K, a chat model's instruction) and the flags that
    rebuild its prompts; None and none where it is not asked for. The split is the run's own where the model is
    a run's output."""
    if args.few_shot is None:
        return None, ()
    from austen_gpt.cli import UserError
    from austen_gpt.data.paragraphs import load_split
    from austen_gpt.models.saving import run_settings
    from austen_gpt.sampling.few_shot import FewShot, chat_instruction, has_chat_template

    data = run_split(args, given)
    train, _ = load_split(data)
    if args.few_shot > len(train):
        raise UserError(f"--few-shot {args.few_shot}: the training split has only {len(train)} passages; ask for fewer")
    if args.instruction and not has_chat_template(tokenizer):
        print(
            "warning: --instruction is ignored: the model has no chat template, so it gets plain paragraphs",
            file=sys.stderr,
        )
    instruction = chat_instruction(tokenizer, args.author, args.instruction, data.data)
    flags = ["--few-shot", str(args.few_shot), "--data", str(data.data), "--train-size", str(data.train_size)]
    flags += ["--split-seed", str(data.seed)]
    for flag, value in (("--data-config", data.data_config), ("--data-split", data.data_split)):
        flags += [flag, value] if value else []
    flags += ["--text-column", data.text_column] if data.text_column else []
    flags += ["--author", args.author] if args.author else []
    flags += ["--instruction", args.instruction] if args.instruction else []
    where = "the run's own" if run_settings(args.model_path) else "from the flags"
    print(
        f"few-shot excerpts from the training split of {data.data} ({where}; --split-seed {data.seed})", file=sys.stderr
    )
    return FewShot(train, args.few_shot, instruction), tuple(flags)


if __name__ == "__main__":
    run_cli(main)
