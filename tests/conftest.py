"""Shared fixtures: a tiny GPT-2 (2 layers, 64 wide), small Austen data.

The tiny model uses the quickstart's real 4,096-token tokenizer (configs/austen-tiny): with GPT-2's 50,257
tokens its output layer would be 95% of every step's compute. One fixture keeps GPT-2's own tokenizer, for
the path a pretrained GPT-2 takes. Everything runs offline on a CPU; the models are built at test time,
never committed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from austen_gpt.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "configs" / "austen-tiny"
GPT2_TOKENIZER_DIR = REPO / "configs" / "gpt2-tiny"
os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never touch the network
os.environ["AUSTEN_GPT_CPU_BF16"] = "0"  # --precision auto is fp32 on every CPU: the same numbers and times

# Tests of the bf16 path on a CPU run where the CPU computes bf16 natively (AVX512-BF16 or AMX), as users' do;
# elsewhere PyTorch emulates bf16, a path --precision auto never takes there.
_CPU_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
on_native_bf16 = pytest.mark.skipif(
    not any(flag in _CPU_FLAGS for flag in ("avx512_bf16", "amx_bf16")),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX), where the bf16 path runs",
)


def skip_unless_installed(missing: str | None) -> None:
    """Skip a test whose real part (a browser, a llama.cpp build) is not installed here, saying which; in CI
    (.ci/run installs them all) that is a failure instead."""
    if missing and os.environ.get("CI"):
        pytest.fail(f"{missing}, and CI installs it (.ci/run)")
    if missing:
        pytest.skip(missing)


if "PYTEST_XDIST_WORKER" in os.environ:
    # Under `pytest -n 2` each worker (and every training it starts) computes on one thread: two workers then
    # share the two cores without fighting over them, while each one's single-threaded start-up (imports,
    # model loading) overlaps the other's work. Compared runs always use the same thread count.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, the tests of one `xdist_group` run on one worker and share its module fixtures.
    pytest-xdist marks them by a suffix to the test's id, which it writes where pytest 8 kept it (`_nodeid`);
    pytest 9 keeps it in `_id`, so the suffix is written here too (once: a fixed xdist's is kept)."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id  # pytest 9's id type; private, hence only here

    for item in items:
        groups = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        if groups and hasattr(item, "_id") and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")


def script_env(env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the repo's scripts run in under test: offline, the repo importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    return {**env, **(env_extra or {})}


def run_script(
    script: str,
    *args: str,
    cwd: Path,
    timeout: float = 300,
    env_extra: dict[str, str] | None = None,
    stdin: str | int | None = None,
) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, capturing its output (`env_extra`: more environment
    variables; `stdin`: text piped in, or subprocess.DEVNULL)."""
    command = [sys.executable, str(REPO / script), *args]
    given = {"input": stdin} if isinstance(stdin, str) else {"stdin": stdin}
    return subprocess.run(
        command, cwd=cwd, env=script_env(env_extra), capture_output=True, text=True, timeout=timeout, **given
    )


def train_args(tmp: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """train.py arguments that keep every output of a test run inside its tmp folder."""
    return [
        "--model",
        str(model),
        "--data",
        str(data),
        "--check-dir",
        str(tmp / "Checkpoints"),
        "--output-dir",
        str(tmp / "out"),
        *extra,
    ]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', no traceback, naming the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_config(**overrides):
    from transformers import GPT2Config

    settings = dict(vocab_size=4096, n_positions=128, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**{**settings, **overrides})


@pytest.fixture(scope="session")
def tokenizer():
    from austen_gpt.models.loading import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 'pretrained' tiny GPT-2: random weights saved with the real tokenizer, like a Hub model folder."""
    import torch
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny GPT-2 with GPT-2's own tokenizer and 50,257-token vocabulary, as a pretrained GPT-2 has."""
    import torch
    from transformers import GPT2LMHeadModel

    from austen_gpt.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2-vocab")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(vocab_size=50257, bos_token_id=50256, eos_token_id=50256)).save_pretrained(folder)
    load_tokenizer(str(GPT2_TOKENIZER_DIR)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_config_dir(tmp_path_factory, tokenizer) -> Path:
    """The same architecture as a config-only folder (no weights), for --from-scratch."""
    folder = tmp_path_factory.mktemp("tiny-config")
    tiny_config().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def austen_paragraphs() -> list[str]:
    from austen_gpt.data.paragraphs import load_paragraphs

    return load_paragraphs(REPO / "austen_dataset.pkl")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, austen_paragraphs) -> Path:
    """111 real Austen paragraphs as JSONL: enough to see the loss fall in seconds. With the tiny model's
    tokenizer their training split (--train-size 0.9) packs into 179 to 187 blocks of 64 tokens for the seeds
    the tests use; the resume trials' kill moments assume 12 optimizer steps of 16 blocks an epoch."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in austen_paragraphs[:111]))
    return path


def run_in_process(main, argv, capsys) -> str:
    """Run a script's main as the CLI does; return its single stderr line after asserting exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def logged_step(run_dir: Path) -> int:
    """The last optimizer step the run has logged (log points come every --log-every steps and at saves)."""
    metrics = run_dir / "Checkpoints/logs/metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


CHATML = (  # Qwen2.5-Instruct's turn layout, without its tool calls
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def qwen_chat_dir(tmp_path_factory, austen_paragraphs):
    """A tiny random Qwen2 with its family's special tokens, given ChatML's template as Qwen2.5-Instruct has."""
    from families import FAMILIES, build_family

    from austen_gpt.models.loading import load_tokenizer

    folder = build_family(tmp_path_factory.mktemp("qwen2-chat"), FAMILIES["qwen2"], austen_paragraphs[:400])
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 'pretrained' tiny GPT-2 with 512 positions: room for few-shot excerpts before 100 new tokens."""
    import torch
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2-512")
    torch.manual_seed(1)
    GPT2LMHeadModel(tiny_config(n_positions=512)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def script_commands(script: str) -> list[tuple[str, list[str]]]:
    """(script run, its arguments) of each `python` line of a shell script (continued lines joined, an
    environment prefix or `time` dropped, cut at a pipe), shell variables filled in with plain words."""
    import shlex

    text = (REPO / script).read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line.split(" | ")[0].split(" 2>&1")[0], comments=True)
        while words and (words[0] == "time" or "=" in words[0]):
            words = words[1:]
        if words[:1] == ["python"]:
            commands.append((words[1], [re.sub(r"\$\{?(\w+)\}?", lambda m: m.group(1), word) for word in words[2:]]))
    return commands
