"""Every script as a new user first meets it: `--help`, and the invocation with no flags at all."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, assert_user_error, run_script

SCRIPTS = ["train.py", "inference.py", "export.py", "style_report.py", "bench.py", "dataset.py", "serve.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    result = run_script(script, "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith("usage: ") and "--help" in result.stdout


def test_the_defaults_offline_say_what_is_missing(tmp_path):
    """No flags on a machine without the Hub: one line each, exit 2, nothing written.

    train.py runs from the repo root, as users run it (its default --data is the bundled dataset there).
    """
    cache = {"HF_HOME": str(tmp_path / "hf-home")}  # an empty Hugging Face cache, whatever this machine has
    before = sorted(REPO.iterdir())
    assert_user_error(run_script("train.py", cwd=REPO, env_extra=cache), "'gpt2' is neither a local folder")
    assert sorted(REPO.iterdir()) == before
    assert_user_error(run_script("inference.py", cwd=tmp_path, env_extra=cache), "'GPT2_fine_tuned_Austen'")
    assert_user_error(run_script("export.py", cwd=tmp_path), "--adapter", "--out")
    assert_user_error(run_script("style_report.py", cwd=tmp_path), "--models")
    assert_user_error(run_script("dataset.py", cwd=tmp_path), "build")
    assert_user_error(run_script("serve.py", cwd=tmp_path, env_extra=cache), "'GPT2_fine_tuned_Austen'")
    assert [p.name for p in tmp_path.iterdir()] in ([], ["hf-home"])


@pytest.mark.slow
def test_bench_quick_with_its_defaults(tmp_path):
    """`python bench.py --quick` as the docs give it: every default contender, then generation, then the table."""
    result = run_script("bench.py", "--quick", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for mode in ["ours", "ours-unfused", "ours-fp32", "seed", "trainer-ours", "trainer-amp", "trainer-collator"]:
        assert f"| {mode} |" in table
    assert "| ours | " in table and "1.00x" in table and "MFU" not in table
    assert "one batched call (inference.py)" in table


@pytest.mark.slow
def test_bench_adapters_and_mfu_against_a_stated_peak(tmp_path):
    """The adapter contenders and the compiled loop, the JSON and Markdown outputs and MFU (no timing assertions:
    the machine is shared)."""
    modes = ["lora", "qlora", "ours-compile"]
    argv = ["--quick", "--modes", *modes, "--gen-samples", "0", "--card-peak-tflops", "1.5"]
    result = run_script("bench.py", *argv, "--json", "bench.json", "--markdown", "bench.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    assert [r["mode"] for r in rows] == modes and report["generation"] is None
    assert all(r["trainable_params"] < r["total_params"] / 10 for r in rows[:2])
    assert all(r["useful_tokens_per_s"] > 0 < r["flops_share_of_matmul_peak"] and r["data_prep_s"] > 0 for r in rows)
    assert all(0 < r["data_prep_cached_s"] < r["data_prep_s"] for r in rows)  # ours, from its tokenized cache
    assert all(
        r["achieved_tflops"] == pytest.approx(r["flops_share_of_matmul_peak"] * r["matmul_peak_tflops"]) for r in rows
    )
    markdown = (tmp_path / "bench.md").read_text()
    assert "MFU (1.5 TFLOP/s peak)" in markdown and "| qlora |" in markdown


def test_the_gpu_check_asks_bench_for_what_it_has():
    """scripts/gpu_check.sh runs only where a GPU is lent: its bench.py lines must parse here, or the rare GPU
    session is lost to a typo."""
    import shlex

    import bench

    script = (REPO / "scripts/gpu_check.sh").read_text().replace("\\\n", " ")
    invocations = [shlex.split(line)[2:] for line in script.splitlines() if line.startswith("python bench.py ")]
    assert len(invocations) == 3
    for argv in invocations:
        for variable, value in {
            "$peak": "989",
            "$out": "out",
            "$steps": "20",
            "$warmup": "5",
            "$medium_steps": "50",
        }.items():
            argv = [a.replace(variable, value) for a in argv]
        args = bench.parse_args(argv)
        assert args.markdown and set(args.modes) <= set(bench.CONTENDERS)
    assert "--card-peak-tflops" in invocations[0] and "16" in invocations[0] and "1024" in invocations[0]


@pytest.mark.slow
def test_bench_serving_quick(tmp_path):
    """`python bench.py --serving --quick`: serve.py under 1 then 4 streams, every request run to its length."""
    result = run_script("bench.py", "--serving", "--quick", "--json", "serving.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "serving.json").read_text())
    levels, late = report["serving"], report["late_arrival"]
    assert [level["streams"] for level in levels] == [1, 4]
    assert all(level["tokens"] == 4 * 20 and level["ttft_p95_s"] >= level["ttft_p50_s"] > 0 for level in levels)
    assert "| 4 | " in result.stdout and "1.00x" in result.stdout and "No continuous batching" in result.stdout
    assert 0 < late["late_ttft_s"] <= late["batch_seconds"]  # it waited for the batch that was running
