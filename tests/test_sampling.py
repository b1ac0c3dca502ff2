"""inference.py's sampling: texts longer than the context, stops after paragraphs, many prompts in batched
calls, the files it keeps, the interactive session (piped and at a terminal), and its bad input."""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, assert_user_error, run_in_process, run_script, script_env, tiny_config

import inference
from austen_gpt.sampling import generation
from austen_gpt.sampling.generation import RepetitionPenalty, sample_ids, window_tokens
from austen_gpt.sampling.records import read_jsonl
from austen_gpt.settings import SamplingSettings

CONTEXT = 32
EOT = 0  # the tiny tokenizer's end-of-text


def short_context_model(eot_bias: float | None = None):
    """A tiny random GPT-2 with a 32-token context; `eot_bias` makes end-of-text likelier (paragraphs end)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(n_positions=CONTEXT)).eval()
    if eot_bias is not None:
        head = torch.nn.Linear(64, model.config.vocab_size, bias=True)
        head.weight = model.lm_head.weight  # still tied
        with torch.no_grad():
            head.bias.zero_()[EOT] = eot_bias
        model.lm_head = head
    return model


GREEDY = dict(top_k=1, top_p=1.0, paragraphs=None)


def test_a_sample_longer_than_the_context_has_no_seam():
    """Greedy, so every token is the one the model picks given what it sees: 100 new tokens from a 32-token
    context, each equal to a fresh forward over the window the docs describe (the whole text until the
    context fills, then the newest 3/4 of a context, then writing on to a full context): nothing repeated,
    nothing lost, the KV cache and positions right across every slide."""
    model = short_context_model()
    prompt = [EOT, 5, 6, 7]
    new = sample_ids(model, [prompt], SamplingSettings(max_new_tokens=100, **GREEDY), seed=0, eot=EOT)[0]
    assert len(new) == 100 > CONTEXT
    text, keep = prompt + new, window_tokens(CONTEXT)
    assert keep == 24
    starts, end = {}, CONTEXT  # the window each new token is written from
    starts.update({j: 0 for j in range(len(prompt), CONTEXT)})
    while end < len(text):
        starts.update({j: end - keep for j in range(end, min(end + CONTEXT - keep, len(text)))})
        end += CONTEXT - keep
    with torch.no_grad():
        for j in range(len(prompt), len(text)):
            window = torch.tensor([text[starts[j] : j]])
            assert model(input_ids=window).logits[0, -1].argmax().item() == text[j], f"token {j}"


def test_paragraphs_stop_each_sample_of_a_long_batch():
    """Three samples in one call, end-of-text made likely: each stops right after its fourth paragraph, some
    after more tokens than the context holds."""
    model = short_context_model(eot_bias=1.5)
    settings = SamplingSettings(max_new_tokens=2000, paragraphs=4)
    rows = sample_ids(model, [[EOT, 5, 6]] * 3, settings, seed=1, eot=EOT)
    assert all(row.count(EOT) == 4 and row[-1] == EOT for row in rows), rows
    assert min(len(row) for row in rows) > CONTEXT
    assert len({tuple(row) for row in rows}) == 3


def test_prompts_of_different_lengths_batch_as_they_sample_alone():
    """Left padding: the padded rows see the same text at the same positions, so greedy samples are equal."""
    model = short_context_model()
    settings = SamplingSettings(max_new_tokens=40, **GREEDY)
    prompts = [[EOT, 5, 6, 7, 8, 9], [EOT, 11], [EOT, 12, 13, 14]]
    together = sample_ids(model, prompts, settings, seed=0, eot=EOT)
    assert together == [sample_ids(model, [p], settings, seed=0, eot=EOT)[0] for p in prompts]


# ---- each sample its own random stream; the repetition penalty -----------------------------------------

A, B, C = [EOT, 5, 6], [EOT, 11, 12, 13, 14, 15, 16, 17], [EOT, 20, 21, 22, 23]


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(max_new_tokens=50, paragraphs=None),  # past the context: each row's windows slide
        SamplingSettings(max_new_tokens=70, paragraphs=3, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3),
    ],
    ids=["long", "paragraphs"],
)
def test_a_sample_is_the_same_whatever_shares_its_call(settings):
    """A sample is a function of (prompt, sample number, seed, settings): drawn alone, with other prompts of
    other lengths (left padding, windows that fill at other moments, rows that stop earlier), or in another
    order, its tokens are the same. Another sample number or another seed gives another sample."""
    model = short_context_model(eot_bias=1.0)
    alone = {
        (tuple(p), k): sample_ids(model, [p], settings, seed=3, eot=EOT, samples=[k])[0]
        for p in (A, B, C)
        for k in (0, 1)
    }
    rows = [A, B, C, A, B, C]  # sample numbers by default: 0, 0, 0, 1, 1, 1
    assert sample_ids(model, rows, settings, seed=3, eot=EOT) == [alone[tuple(p), j // 3] for j, p in enumerate(rows)]
    mixed = sample_ids(model, [C, A, B], settings, seed=3, eot=EOT, samples=[1, 0, 1])
    assert mixed == [alone[tuple(C), 1], alone[tuple(A), 0], alone[tuple(B), 1]]
    assert sample_ids(model, [A], settings, seed=3, eot=EOT)[0] == alone[tuple(A), 0]  # the same seed
    assert alone[tuple(A), 0] != alone[tuple(A), 1]
    assert sample_ids(model, [A], settings, seed=4, eot=EOT)[0] != alone[tuple(A), 0]


def test_a_prompts_file_draws_the_same_samples_in_any_batching(tiny_model_dir, tokenizer, monkeypatch):
    """--prompts-file's rows per call follow free GPU memory: one row a call or all in one, the prompts in
    another order, the samples stay; a prompt's samples equal those of --prompt with the same seed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts, settings = ["Emma was", "Mr Knightley", "It was a truth"], SamplingSettings(max_new_tokens=12)

    def drawn(rows_per_call: int, order: list[str]) -> dict[str, list[str]]:
        monkeypatch.setattr(generation, "rows_per_call", lambda model: rows_per_call)
        return dict(zip(order, generation.sample_prompts(model, tokenizer, order, 3, settings, 5), strict=True))

    together = drawn(64, prompts)
    assert drawn(1, prompts[::-1]) == together == drawn(2, prompts[1:] + prompts[:1])
    assert generation.generate_paragraphs(model, tokenizer, "Mr Knightley", 3, settings, 5) == together["Mr Knightley"]
    assert len({text for texts in together.values() for text in texts}) == 9


def test_the_repetition_penalty_leaves_the_special_tokens_alone():
    """End-of-text (every prompt's first token, and the padding) and the other special tokens keep their
    scores; a seen ordinary token is penalised from either sign; an unseen one is not."""
    input_ids = torch.tensor([[EOT, EOT, 5, 6, 5, 1]])
    scores = torch.tensor([[3.0, 3.0, 0.5, 1.0, 4.0, 2.0, -2.0, 1.5]])
    assert RepetitionPenalty(2.0, [EOT, 1])(input_ids, scores).tolist() == [[3.0, 3.0, 0.5, 1.0, 4.0, 1.0, -4.0, 1.5]]


def test_the_repetition_penalty_can_leave_each_rows_prompt_alone():
    """Row 0's prompt is its first 3 positions, row 1's its first 5 (left padding included): only the tokens
    after them count as seen."""
    penalty = RepetitionPenalty(2.0, [EOT])
    penalty.counted_from = torch.tensor([3, 5])
    input_ids = torch.tensor([[EOT, 5, 6, 6, 7], [EOT, EOT, 5, 6, 7]])
    scores = torch.full((2, 8), 2.0)
    assert penalty(input_ids, scores).tolist() == [[2.0] * 6 + [1.0, 1.0], [2.0] * 7 + [2.0]]


def test_a_repetition_penalty_does_not_lengthen_paragraphs():
    """With end-of-text penalised (transformers' processor counts every token), a paragraph's end is less
    likely from the first step: on this model, where paragraphs end after about 5 tokens, a penalty of 2 made
    them over 3 times as long. Left alone, end-of-text only gains on the penalised tokens (about 1.0 times)."""
    model = short_context_model(eot_bias=3.0)

    def mean_length(penalty: float) -> float:
        settings = SamplingSettings(max_new_tokens=60, paragraphs=1, repetition_penalty=penalty)
        rows = sample_ids(model, [[EOT, 5, 6]] * 48, settings, seed=0, eot=EOT)
        return sum(map(len, rows)) / len(rows)

    assert mean_length(2.0) < 1.5 * mean_length(1.0)


# ---- inference.py: files worth keeping, many prompts -------------------------------------------------


def sample(tiny_model_dir, capsys, *argv: str) -> str:
    assert inference.main(["--model-path", str(tiny_model_dir), "--max-new-tokens", "15", *argv]) == 0
    out = capsys.readouterr()
    assert [line for line in out.err.splitlines() if not line.startswith("settings: from the flags")] == []
    return out.out


def test_jsonl_output_holds_what_drew_each_sample_and_draws_it_again(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    printed = sample(tiny_model_dir, capsys, "--prompt", "Emma was", "--n-return-seqs", "2", "--output", str(out))
    records = read_jsonl(out)
    assert [r["sample"] for r in records] == [1, 2] and {r["of"] for r in records} == {2}
    assert printed == "\n\n".join(f"{r['sample']}. {r['text']}" for r in records) + "\n\n"
    first = records[0]
    assert first["prompt"] == "Emma was" and first["model"] == str(tiny_model_dir) and first["date"]
    assert first["settings"] == {**SamplingSettings(max_new_tokens=15).as_dict(), "paragraphs": 1}
    assert isinstance(first["seed"], int)  # drawn, as no --seed was given, and kept
    again = shlex.split(first["command"])
    assert again[:2] == ["python", "inference.py"] and "--seed" in again
    assert sample(tiny_model_dir, capsys, *again[2:]) == printed  # the same samples, from the record alone
    sample(tiny_model_dir, capsys, *again[2:], "--output", str(out))  # appended, not overwritten
    assert [r["text"] for r in read_jsonl(out)] == [r["text"] for r in records] * 2


def test_markdown_output_is_for_reading(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples.md"
    argv = ["--prompt", "Emma was", "--paragraphs", "2", "--seed", "4", "--output", str(out)]
    printed = sample(tiny_model_dir, capsys, *argv)
    text = out.read_text()
    assert text.startswith("## Emma was\n\n") and "seed 4" in text and "paragraphs 2" in text
    assert "`python inference.py --model-path" in text
    for number, sample_text in enumerate(printed.strip().split("\n\n"), 1):
        assert sample_text.split(". ", 1)[1].split("\n\n")[0] in text, number


def test_a_prompts_file_samples_in_batched_calls(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\nEmma was\n\nMr Knightley\nIt was\n")
    calls = []
    real = generation.sample_ids
    monkeypatch.setattr(generation, "rows_per_call", lambda model: 4)
    monkeypatch.setattr(
        generation, "sample_ids", lambda model, rows, *a, **k: calls.append(len(rows)) or real(model, rows, *a, **k)
    )
    out = tmp_path / "samples.jsonl"
    argv = ["--prompts-file", str(prompts), "--n-return-seqs", "2", "--seed", "9", "--output", str(out)]
    printed = sample(tiny_model_dir, capsys, *argv)
    assert calls == [4, 2]  # 3 prompts x 2 samples, 4 to a call
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == ["Emma was"] * 2 + ["Mr Knightley"] * 2 + ["It was"] * 2
    assert all(r["text"].startswith(r["prompt"]) and r["text"] in printed for r in records)
    assert "[3/3] It was" in printed
    again = shlex.split(records[0]["command"])
    assert "--prompts-file" in again and again[again.index("--seed") + 1] == "9"
    assert sample(tiny_model_dir, capsys, *again[2:]) == printed


# ---- the interactive session ----------------------------------------------------------------------------


def test_an_interactive_session_with_piped_prompts(tiny_model_dir, tmp_path):
    lines = ["Emma was", ":temperature 0.5", ":n 2", "Harriet", ":top-p 2", ":seed 3", ":settings", "", ":quit"]
    argv = ["--interactive", "--model-path", str(tiny_model_dir), "--max-new-tokens", "10", "--n-return-seqs", "1"]
    out = tmp_path / "session.jsonl"
    result = run_script("inference.py", *argv, "--output", str(out), cwd=tmp_path, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout
    assert "temperature 0.5" in printed and "n 2" in printed
    assert "error: :top-p must be in (0, 1]" in printed  # refused; the session goes on
    assert "n 2 · seed 3 · max_length 300 · max_new_tokens 10 · top_k 50 · top_p 0.95 · temperature 0.5" in printed
    records = read_jsonl(out)
    assert [(r["prompt"], r["sample"], r["of"]) for r in records] == [
        ("Emma was", 1, 1),
        ("Harriet", 1, 2),
        ("Harriet", 2, 2),
        ("", 1, 2),
        ("", 2, 2),
    ]
    assert records[0]["text"] in printed  # streamed, then the same text kept
    assert "1. Harriet" in printed and "2. Harriet" in printed
    assert records[1]["settings"]["temperature"] == 0.5 and records[3]["seed"] == 3


def test_an_interactive_session_on_an_adapter_folder(tiny_model_dir, tokenizer, tmp_path):
    """LoRA adapters load on their base once; a piped prompt streams its sample, the file keeps it."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.lora import add_lora

    adapters = tmp_path / "adapters"
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["c_attn"], False, "-")
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    model.save_pretrained(adapters)
    tokenizer.save_pretrained(adapters)
    argv = ["--interactive", "--model-path", str(adapters), "--max-new-tokens", "8", "--n-return-seqs", "1"]
    out = tmp_path / "kept.md"
    result = run_script("inference.py", *argv, "--output", str(out), cwd=tmp_path, stdin="Emma was\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("Emma was") and "## Emma was" in out.read_text()
    assert f"model `{adapters}`" in out.read_text()


def read_until(fd: int, wanted: bytes, seen: bytearray, after: int = 0, timeout: float = 120) -> int:
    """Read the terminal into `seen` until `wanted` shows after offset `after`; returns where it ends."""
    deadline = time.monotonic() + timeout
    while wanted not in seen[after:]:
        assert time.monotonic() < deadline, f"no {wanted!r} in {bytes(seen)[-800:]!r}"
        read_some(fd, seen)
    return seen.index(wanted, after) + len(wanted)


def read_some(fd: int, seen: bytearray) -> None:
    if select.select([fd], [], [], 1)[0]:
        seen += os.read(fd, 4096)


@pytest.mark.slow
def test_an_interactive_session_at_a_terminal_keeps_going_after_ctrl_c(tiny_model_dir):
    """Through a pseudo-terminal, as a person types: a sample far too long to finish streams until Ctrl-C,
    which stops it and not the session; a setting changes; a short sample completes; Ctrl-D ends."""
    argv = [sys.executable, str(REPO / "inference.py"), "--interactive", "--model-path", str(tiny_model_dir)]
    argv += ["--max-new-tokens", "1000000", "--paragraphs", "100000", "--n-return-seqs", "1"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its stdin and stdout; Ctrl-C as in a shell (an xdist worker ignores it)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(sys.executable, argv, script_env())
    seen = bytearray()
    try:
        at = read_until(fd, b"> ", seen)
        os.write(fd, b"Emma was\n")
        at = read_until(fd, b"Emma was\r\nEmma was", seen, at)  # the typed line's echo, then the sample
        deadline = time.monotonic() + 120
        while len(seen) < at + 200 and time.monotonic() < deadline:  # it streams
            read_some(fd, seen)
        assert len(seen) >= at + 200, bytes(seen)[-800:]
        os.write(fd, b"\x03")  # Ctrl-C
        at = read_until(fd, b"[stopped]", seen, at)
        at = read_until(fd, b"> ", seen, at)
        os.write(fd, b":max-new-tokens 5\n")
        at = read_until(fd, b"max-new-tokens 5\r\n> ", seen, at)
        os.write(fd, b"Harriet\n")
        at = read_until(fd, b"Harriet\r\nHarriet", seen, at)
        at = read_until(fd, b"> ", seen, at)  # five tokens later, the next prompt
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)[-2000:]
    assert b"Traceback" not in seen


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--paragraphs", "0"], "--paragraphs must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--prompts-file", "missing.txt"], "--prompts-file missing.txt: no such file"),
        (["--output", "samples.txt"], "give a .jsonl file (a record per sample) or a .md file"),
        (["--output", "no/such/folder/s.jsonl"], "the folder no/such/folder does not exist"),
        (["--interactive", "--prompts-file", "p.txt"], "--interactive and --prompts-file: choose one"),
    ],
)
def test_bad_sampling_input(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in run_in_process(inference.main, argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_prompts_file_that_holds_nothing_or_cannot_be_read(capsys, tmp_path):
    empty, binary, folder = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "folder.md"
    empty.write_text("# only a comment\n\n")
    binary.write_bytes(b"\xff\xfe\x00prompt")
    folder.mkdir()
    assert "holds no prompt" in run_in_process(inference.main, ["--prompts-file", str(empty)], capsys)
    assert "is not UTF-8 text" in run_in_process(inference.main, ["--prompts-file", str(binary)], capsys)
    assert "is a folder" in run_in_process(inference.main, ["--output", str(folder)], capsys)


def test_interactive_without_a_terminal_or_a_pipe(tmp_path, tiny_model_dir):
    result = run_script(
        "inference.py", "--interactive", "--model-path", str(tiny_model_dir), cwd=tmp_path, stdin=subprocess.DEVNULL
    )
    assert_user_error(result, "--interactive needs a terminal, or prompts piped in")


def test_the_sample_files_in_sample_outputs_were_written_by_inference():
    """sample_outputs/ holds what `inference.py --output` wrote, and its README gives the commands."""
    kept = sorted(REPO.glob("sample_outputs/*/samples.*"))
    assert kept, "no samples file in sample_outputs/"
    for path in kept:
        readme = (path.parent / "README.md").read_text()
        assert f"--output sample_outputs/{path.parent.name}/{path.name}" in readme, path
        if path.suffix == ".jsonl":
            records = read_jsonl(path)
            assert records and all(r["command"].startswith("python inference.py") for r in records)
        else:
            assert path.read_text().startswith("## ") and "`python inference.py " in path.read_text()


def test_the_session_help_names_every_command():
    from austen_gpt.sampling import session

    assert all(f":{name}" in session.HELP for name in session.SETTINGS if name != "n-return-seqs")


def test_a_static_cache_samples_the_same_tokens():
    """--static-cache, across window slides and with left padding: the same greedy tokens as the default cache."""
    model = short_context_model()
    prompts = [[EOT, 5, 6, 7], [EOT, 9]]
    dynamic = sample_ids(model, prompts, SamplingSettings(max_new_tokens=60, **GREEDY), seed=0, eot=EOT)
    static = SamplingSettings(max_new_tokens=60, static_cache=True, **GREEDY)
    assert sample_ids(model, prompts, static, seed=0, eot=EOT) == dynamic


def test_the_notebook_api_loads_and_samples_repeatably(tiny_model_dir):
    """utils.load and utils.sample: the README's notebook example, on a model folder."""
    from utils import load, sample

    model, tokenizer = load(str(tiny_model_dir))
    first = sample(model, tokenizer, "Emma was", n=2, seed=3, max_new_tokens=8)
    assert len(first) == 2 and all(text.startswith("Emma was") for text in first)
    assert sample(model, tokenizer, "Emma was", n=2, seed=3, max_new_tokens=8) == first


def test_inference_samples_as_the_models_run_did_unless_a_flag_says_otherwise(tmp_path):
    """A folder a run of ours wrote records how its model samples (train.py's --top-k, --top-p); inference.py
    takes those unless its own flags are given, and says where its settings come from; a folder with no record
    (a Hub model) keeps the flags'."""
    from austen_gpt.sampling.loading import sampling_of_run

    export = tmp_path / "export"
    export.mkdir()
    (export / "training_metrics.json").write_text(json.dumps({"settings": {"top_k": 7, "top_p": 0.5}}))
    settings, line = sampling_of_run(str(export), SamplingSettings(), given=set())
    assert (settings.top_k, settings.top_p) == (7, 0.5) and "--top-k 7 --top-p 0.5 as the run" in line
    settings, _ = sampling_of_run(str(export), SamplingSettings(top_k=3), given={"top_k"})
    assert (settings.top_k, settings.top_p) == (3, 0.5)
    settings, line = sampling_of_run(str(tmp_path), SamplingSettings(), given=set())
    assert settings == SamplingSettings() and line.startswith("settings: from the flags")


def first_inputs(model) -> list[list[int]]:
    """The tokens each generate call feeds the model at its first step (the whole window it reads), as a list
    filled while the model samples."""
    fed: list[list[int]] = []

    def look(_, args, kwargs) -> None:
        if kwargs["input_ids"].shape[1] > 1:  # later steps read one new token each, from the cache
            fed.append(kwargs["input_ids"][0].tolist())

    model.register_forward_pre_hook(look, with_kwargs=True)
    return fed


def test_the_model_reads_the_whole_prompt_until_the_context_fills():
    """A prompt of 31 tokens in a 32-token context (more than the 24 a slide keeps): the model reads all of it,
    and the window slides only once the text fills the context. A prompt as long as the context leaves no room
    to write: the model reads its newest 24 tokens, and the note says so."""
    model = short_context_model()
    fed = first_inputs(model)
    prompt = [EOT, *range(5, 35)]
    new = sample_ids(model, [prompt], SamplingSettings(max_new_tokens=3, **GREEDY), seed=0, eot=EOT)[0]
    filled = prompt + new[:1]  # the context is full after one new token: then the window slides
    assert fed[0] == prompt and fed[1] == filled[-window_tokens(CONTEXT) :]
    assert generation.prompt_cut_note(model, len(prompt)) is None
    full = [EOT, *range(5, 36)]
    sample_ids(model, [full], SamplingSettings(max_new_tokens=1, **GREEDY), seed=0, eot=EOT)
    assert fed[2] == full[-window_tokens(CONTEXT) :]
    assert "the prompt is 32 tokens, the model's context 32" in generation.prompt_cut_note(model, len(full))


def test_inference_says_so_where_the_prompt_is_too_long_to_read_whole(tiny_model_dir, capsys):
    assert inference.main(["--model-path", str(tiny_model_dir), "--prompt", "Emma " * 200, "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "the model's context 128: it leaves no room to write, so the model reads the prompt's last 96" in err
    assert inference.main(["--model-path", str(tiny_model_dir), "--prompt", "Emma " * 20, "--seed", "1"]) == 0
    assert "leaves no room" not in capsys.readouterr().err
