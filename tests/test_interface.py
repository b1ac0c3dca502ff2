"""The interface users rely on outlives any refactor: every script's flags, and checkpoints written by older code."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "scripts"))
from flag_lists import script_flags  # noqa: E402

OLD_CHECKPOINT = REPO / "tests" / "fixtures" / "old_checkpoint"
# flags that scripts gained since tests/fixtures/flags.json was recorded, per command
ADDED = {
    "train.py": {"--config", "--split-seed"}  # a run file; the split's seed by the style report's name (--seed too)
    | {
        "--split-by",
        "--keep-out",
        "--max-steps",
        "--whole-works",
    }  # pretraining a base: held-out works, a kept-out author, a budget
    | {
        f"--self-play-{name}"
        for name in ("rounds", "pairs", "beta", "likelihood-weight", "prompt-tokens", "new-tokens")
    },
    "inference.py": {"--config", "--few-shot", "--author", "--instruction"}  # few-shot prompting, and its split:
    | {"--data", "--data-config", "--data-split", "--text-column", "--train-size", "--split-seed", "--split-by"}
    | {"--rerank", "--rerank-choice", "--rerank-temperature"},  # reranking by a judge of the model
    "style_report.py": {"--config", "--few-shot-models", "--few-shot-names", "--few-shot", "--author", "--instruction"}
    | {"--split-by"}
    | {"--rerank", "--rerank-choice", "--rerank-temperature"},  # rerank rows
    "export.py": {"--config", "--model-path", "--gguf", "--gguf-type", "--dtype"},  # GGUF export; a bf16 folder
    "bench.py": {"--model-config"}  # was --config (still read so), which now takes a run file
    | {"--serving", "--serving-streams", "--serving-requests", "--serving-model"},  # serve.py under load
    "dataset.py build": {"--config"},
    "dataset.py tokenizer": {
        "--model-config",
        "--split-seed",
        "--split-by",
        "--keep-out",
        "--positions",
        "--whole-works",
    },
}


def test_every_recorded_flag_is_still_there():
    recorded = json.loads((REPO / "tests" / "fixtures" / "flags.json").read_text())
    now = script_flags()
    assert now.keys() == recorded.keys()
    for command, flags in recorded.items():
        assert set(now[command]) == set(flags) | ADDED.get(command, set()), command


def old_run_args(epochs: int) -> list[str]:
    """train.py's command line for the fixture's run (scripts/build_old_checkpoint.sh), paths relative to it."""
    return [
        *("--model", "model", "--from-scratch", "--data", "data.jsonl", "--max-input-length", "64"),
        *("--epochs", str(epochs), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "4"),
        *("--sample-every", "0", "--eval-steps", "0", "--precision", "fp32"),
        *("--check-dir", "Checkpoints", "--output-dir", "out"),
    ]


def final_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_checkpoint_written_by_older_code_resumes(tmp_path):
    """The fixture's checkpoint, written by train.py before the package existed, resumes today. The resumed run
    ends on the older code's final weights up to the float rounding another CPU may differ in; and where this
    CPU's first epoch rounds exactly as the fixture's machine's did, on an uninterrupted run's weights today,
    bitwise."""
    import torch
    from safetensors.torch import load_file

    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    shutil.copytree(OLD_CHECKPOINT, resumed)
    shutil.copytree(OLD_CHECKPOINT, whole, ignore=shutil.ignore_patterns("Checkpoints"))
    one_thread = {"OMP_NUM_THREADS": "1"}
    result = run_script("train.py", *old_run_args(2), "--resume", cwd=resumed, env_extra=one_thread)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from Checkpoints/Epoch_1: step 15" in result.stdout + result.stderr
    result = run_script("train.py", *old_run_args(2), cwd=whole, env_extra=one_thread)
    assert result.returncode == 0, result.stderr[-3000:]
    now, again = final_weights(resumed / "out"), final_weights(whole / "out")
    old = load_file(OLD_CHECKPOINT / "final.safetensors")
    assert now.keys() == again.keys() == old.keys()
    first_epoch, fixtures_first_epoch = (final_weights(run / "Checkpoints/Epoch_1") for run in (whole, OLD_CHECKPOINT))
    same_rounding = all(torch.equal(first_epoch[name], fixtures_first_epoch[name]) for name in first_epoch)
    for name in now:
        torch.testing.assert_close(now[name], old[name], rtol=1e-4, atol=1e-5)
        if same_rounding:
            assert torch.equal(now[name], again[name]), name
        else:
            torch.testing.assert_close(now[name], again[name], rtol=1e-4, atol=1e-5)
