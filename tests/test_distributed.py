"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch, and resume exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, assert_user_error, logged_step, on_native_bf16, run_script, train_args
from safetensors.torch import load_file

COMMON = ["--max-input-length", "64", "--sample-every", "0", "--lr", "1e-3"]
# bf16 rounding or dropout masks would differ by design
EXACT = ["--precision", "fp32", "--dropout", "0", "--epochs", "1"]
# The launches run on one worker, one after another: they share the one-process runs (a module fixture), and
# two launches at once would put four processes, waiting on each other's collectives, on two cores.
launches = pytest.mark.xdist_group("processes")


def launch(launcher: list[str], *args: str, cwd: Path, env: dict[str, str], while_running=None):
    """train.py in two CPU processes started by `python -m <launcher...>`.

    `while_running(launcher)` is called once the processes are started (e.g. to signal one of them).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env}
    command = [sys.executable, "-m", *launcher, str(REPO / "train.py"), *args]
    options = dict(cwd=cwd, env=env, text=True, stdout=PIPE, stderr=PIPE, start_new_session=True)
    with subprocess.Popen(command, **options) as run:
        try:
            if while_running:
                while_running(run)
            stdout, stderr = run.communicate(timeout=300)
        except BaseException:
            os.killpg(run.pid, signal.SIGKILL)  # the workers too, not only the launcher
            raise
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def torchrun(*args: str, cwd: Path, while_running=None) -> subprocess.CompletedProcess:
    """As the README's multi-process command on a machine without GPUs runs it."""
    launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return launch(launcher, *args, cwd=cwd, env={"ACCELERATE_USE_CPU": "true"}, while_running=while_running)


def accelerate_launch(config: str, *args: str, cwd: Path, fsdp: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch` with one of the repo's config files, on two CPU processes and a free port.

    DeepSpeed runs on its own CPU accelerator; FSDP (`fsdp=True`), which accelerate offers on GPUs
    only, runs through tests/fsdp_on_cpu.py.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launcher = ["accelerate.commands.launch", "--config_file", str(REPO / config), "--num_processes", "2"]
    launcher += ["--main_process_port", port]
    if fsdp:
        launcher.append(str(REPO / "tests" / "fsdp_on_cpu.py"))
    return launch(launcher, *args, cwd=cwd, env={"DS_ACCELERATOR": "cpu"})


def sigterm_one_worker_after_step(step: int, run_dir: Path):
    """A while_running hook: once optimizer step `step` (or a later one) is logged, SIGTERM the second worker
    alone. The processes agree on it at their next log point."""

    def hook(launcher: subprocess.Popen) -> None:
        deadline = time.monotonic() + 240
        while logged_step(run_dir) < step:
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(max(workers, key=int)), signal.SIGTERM)

    return hook


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def val_losses(run: Path) -> list[float]:
    lines = (run / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["val_loss"] for line in lines if "val_loss" in line]


# --sample-every: samples are drawn on every process, printed by one. Padded batches (--packing False) hold
# different numbers of targets, and accumulation spreads a step over micro-batches: each token must still
# weigh the same whichever process and micro-batch holds it.
SAME_AS_ONE_PROCESS = [*COMMON, *EXACT, "--sample-every", "10"]
ACCUMULATED = [*SAME_AS_ONE_PROCESS, "--packing", "False", "--grad-accum-steps", "2"]
LORA = ["--rank-lora", "4", "--lora-dropout", "0", *COMMON, *EXACT]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, small_data):
    """`one_process(*settings)`: the run that several processes with the same global batch (8) must
    reproduce, trained once per module for each setting."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(*settings: str) -> Path:
        if settings not in runs:
            folder = tmp_path_factory.mktemp("one-process")
            args = train_args(folder, tiny_model_dir, small_data, *settings, "--batch-size", "8")
            single = run_script("train.py", *args, cwd=folder)
            assert single.returncode == 0, single.stderr[-3000:]
            runs[settings] = folder
        return runs[settings]

    return run


@pytest.mark.slow
@launches
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, small_data, one_process):
    one, two = one_process(*ACCUMULATED), tmp_path / "two"
    args = train_args(two, tiny_model_dir, small_data, *ACCUMULATED, "--batch-size", "4")
    double = torchrun(*args, cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "16 examples per optimizer step (4 x 2 accumulated x 2 processes, DDP)" in double.stdout
    assert "linear decay to 0 at step 15" in double.stdout  # 235 padded examples in windows of 16
    assert max_difference(weights(one / "out"), weights(two / "out")) < 1e-4
    assert val_losses(one) == pytest.approx(val_losses(two), rel=1e-5)
    # only the first process writes: one log line per step, one checkpoint message
    metrics = (two / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len((one / "Checkpoints/logs/metrics.jsonl").read_text().splitlines())
    assert double.stdout.count("saved ") == 1 and double.stdout.count("final model in") == 1
    samples = (two / "Checkpoints/logs/samples.jsonl").read_text().splitlines()
    assert len(samples) == len((one / "Checkpoints/logs/samples.jsonl").read_text().splitlines()) == 3
    assert double.stdout.count("[step 10]") == 3  # three prompts, printed once


@pytest.mark.slow
@launches
@on_native_bf16
def test_two_processes_in_bf16_equal_one_process_to_bf16_precision(tmp_path, tiny_model_dir, small_data, one_process):
    """bf16 autocast on a CPU, with the lean layers bf16 gets there (dropout layers that draw their masks from
    random bits, here at rate 0 so that the two runs can agree): each process's bf16 gradients are reduced
    into one step, as one process would take it."""
    in_bf16 = [*COMMON, "--precision", "bf16", "--dropout", "0", "--epochs", "1", "--packing", "False"]
    one, two = one_process(*in_bf16), tmp_path / "two"
    double = torchrun(*train_args(two, tiny_model_dir, small_data, *in_bf16, "--batch-size", "4"), cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "mixed precision bf16" in double.stdout and "masks from random bits" in double.stdout
    assert "8 examples per optimizer step (4 x 1 accumulated x 2 processes, DDP)" in double.stdout
    # Adam turns a gradient's last bits into a whole step where it is near zero: weights agree to a few steps'
    # size, the validation loss to bf16's last bits (1.2e-7 relative on the development CPU)
    assert max_difference(weights(one / "out"), weights(two / "out")) < 1e-2
    assert val_losses(one) == pytest.approx(val_losses(two), rel=1e-5)


@pytest.mark.slow
@launches
def test_sigterm_to_one_process_stops_both_and_the_run_resumes_exactly(tmp_path, gpt2_tiny_model_dir, small_data):
    """Dropout on: each process draws its own masks, and its random state is in the checkpoint. GPT-2's
    50,257-token output layer makes each step slow enough for the signal to land mid-run."""
    settings = [*COMMON, "--batch-size", "4", "--epochs", "1"]
    whole = torchrun(*train_args(tmp_path / "whole", gpt2_tiny_model_dir, small_data, *settings), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    cut = tmp_path / "cut"
    hook = sigterm_one_worker_after_step(5, cut)
    stopped = torchrun(*train_args(cut, gpt2_tiny_model_dir, small_data, *settings), cwd=tmp_path, while_running=hook)
    assert stopped.returncode != 0 and stopped.stdout.count("stopped by SIGTERM at step") == 1, stopped.stderr[-3000:]
    step = int(stopped.stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 5 <= step < 24 and [p.name for p in (cut / "Checkpoints").glob("Step_*")] == [f"Step_{step}"]

    again = train_args(cut, gpt2_tiny_model_dir, small_data, *settings, "--resume")
    assert_user_error(run_script("train.py", *again, cwd=tmp_path), "2 processes")  # one process would differ
    result = torchrun(*again, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {cut / 'Checkpoints' / f'Step_{step}'}" in result.stdout
    assert max_difference(weights(tmp_path / "whole/out"), weights(cut / "out")) == 0.0

    one = tmp_path / "one"  # the same global batch in one process: other masks, about the same loss
    single = run_script(
        "train.py",
        *train_args(one, gpt2_tiny_model_dir, small_data, *COMMON, "--batch-size", "8", "--epochs", "1"),
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert val_losses(one)[-1] == pytest.approx(val_losses(tmp_path / "whole")[-1], rel=0.02)


@pytest.mark.slow
@launches
@pytest.mark.parametrize("mode", ["--lora", "--qlora"])
def test_adapters_in_two_processes_equal_one_process(mode, tmp_path, tiny_model_dir, small_data, one_process):
    one, two = one_process(mode, "True", *LORA), tmp_path / "two"
    double = torchrun(
        *train_args(two, tiny_model_dir, small_data, mode, "True", *LORA, "--batch-size", "4"), cwd=tmp_path
    )
    assert double.returncode == 0, double.stderr[-3000:]
    adapters = "adapter_model.safetensors"
    assert max_difference(weights(one / "out", adapters), weights(two / "out", adapters)) < 1e-4


@pytest.mark.slow
@launches
def test_a_nan_loss_stops_both_processes_at_the_same_step(tmp_path, tiny_model_dir, small_data):
    settings = [*COMMON, "--batch-size", "4", "--lr", "1e30", "--warmup-steps", "0", "--save-steps", "1"]
    result = torchrun(*train_args(tmp_path, tiny_model_dir, small_data, *settings), cwd=tmp_path)
    assert result.returncode != 0  # and no process left waiting for the other
    assert "the loss became nan at step 2" in result.stderr
    assert [p.name for p in (tmp_path / "Checkpoints").glob("Step_*")] == ["Step_1"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@launches
def test_deepspeed_zero2_config_trains_like_one_process(tmp_path, tiny_model_dir, small_data, one_process):
    """configs/accelerate/deepspeed_zero2.yaml as shipped, on DeepSpeed's CPU accelerator: gradients and
    optimizer state split over two processes, the same weights as one process with the same global batch."""
    pytest.importorskip("deepspeed")
    zero2 = tmp_path / "zero2"
    args = train_args(zero2, tiny_model_dir, small_data, *SAME_AS_ONE_PROCESS, "--batch-size", "4")
    result = accelerate_launch("configs/accelerate/deepspeed_zero2.yaml", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 examples per optimizer step (4 x 1 accumulated x 2 processes, DeepSpeed ZeRO-2)" in result.stdout
    assert "mixed precision no" in result.stdout  # --precision fp32 wins over the file's bf16
    assert result.stdout.count("[step 10]") == 3 and result.stdout.count("final model in") == 1
    # the same tensors (GPT-2's tied lm_head written once, as from one process) and values
    one = one_process(*SAME_AS_ONE_PROCESS)
    assert max_difference(weights(one / "out"), weights(zero2 / "out")) < 1e-4
    assert val_losses(one) == pytest.approx(val_losses(zero2), rel=1e-5)
    # each process held part of the optimizer state: the checkpoint has its weights, not a resumable state
    again = train_args(zero2, tiny_model_dir, small_data, *SAME_AS_ONE_PROCESS, "--epochs", "2", "--resume")
    again += ["--output-dir", str(tmp_path / "resumed")]
    assert_user_error(run_script("train.py", *again, cwd=tmp_path), "no optimizer state", "--model", "--check-dir")


@pytest.mark.slow
@launches
def test_fsdp_config_trains_like_one_process(tmp_path, tiny_model_dir, small_data, one_process):
    """configs/accelerate/fsdp.yaml as shipped (FSDP2, a GPT2Block per unit, full state dict) on CPU processes."""
    fsdp, config = tmp_path / "fsdp", "configs/accelerate/fsdp.yaml"
    args = train_args(fsdp, tiny_model_dir, small_data, *SAME_AS_ONE_PROCESS, "--batch-size", "4")
    result = accelerate_launch(config, *args, cwd=tmp_path, fsdp=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 examples per optimizer step (4 x 1 accumulated x 2 processes, FSDP2)" in result.stdout
    assert result.stdout.count("[step 10]") == 3 and result.stdout.count("final model in") == 1
    one = one_process(*SAME_AS_ONE_PROCESS)
    assert max_difference(weights(one / "out"), weights(fsdp / "out")) < 1e-4
    assert val_losses(one) == pytest.approx(val_losses(fsdp), rel=1e-5)
    again = train_args(fsdp, tiny_model_dir, small_data, *SAME_AS_ONE_PROCESS, "--epochs", "2", "--resume")
    again += ["--output-dir", str(tmp_path / "resumed")]  # each process held a shard of the optimizer
    assert_user_error(run_script("train.py", *again, cwd=tmp_path), "no optimizer state", "--check-dir")

    # LoRA: every process must start from the same random adapters (FSDP2 copies none between them)
    lora = tmp_path / "lora"
    args = train_args(lora, tiny_model_dir, small_data, "--lora", "True", *LORA, "--batch-size", "4")
    result = accelerate_launch(config, *args, cwd=tmp_path, fsdp=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, adapters = one_process("--lora", "True", *LORA), "adapter_model.safetensors"
    assert max_difference(weights(one / "out", adapters), weights(lora / "out", adapters)) < 1e-4


def test_the_way_on_from_a_checkpoint_without_optimizer_state(tmp_path):
    from austen_gpt.training.checkpoints import continue_from_weights

    full, adapters = tmp_path / "Epoch_1", tmp_path / "Step_5"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    assert f"--model {full} --check-dir" in continue_from_weights(full)
    assert f"python export.py --adapter {adapters} --out" in continue_from_weights(adapters)


def test_what_fsdp_and_deepspeed_refuse_and_what_deepspeed_is_told():
    """Checked on stand-in accelerators: launching FSDP or DeepSpeed for each refusal would take minutes."""
    from accelerate.utils import DistributedType

    from austen_gpt.cli import UserError
    from austen_gpt.training.distributed import configure_deepspeed, refuse_unsupported

    def under(kind: DistributedType, config: dict | None = None) -> SimpleNamespace:
        plugin = SimpleNamespace(deepspeed_config=config)
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    def flags(load_in_8bit: bool = False, grad_accum_steps: int = 1) -> tuple[bool, int]:
        return load_in_8bit, grad_accum_steps

    fsdp, deepspeed, ddp = (
        under(DistributedType.FSDP),
        under(DistributedType.DEEPSPEED),
        under(DistributedType.MULTI_GPU),
    )
    resumed = Path("Checkpoints/Epoch_1")
    for accelerator, args, resume, message in [
        (fsdp, flags(load_in_8bit=True), None, "--load-in-8bit is not supported under FSDP"),
        (deepspeed, flags(grad_accum_steps=2), None, "under DeepSpeed use --grad-accum-steps 1"),
        (fsdp, flags(), resumed, "resuming under FSDP or DeepSpeed is not supported"),
        (deepspeed, flags(), resumed, "resuming under FSDP or DeepSpeed is not supported"),
    ]:
        with pytest.raises(UserError, match=message):
            refuse_unsupported(accelerator, resume, *args)
    refuse_unsupported(ddp, resumed, *flags(load_in_8bit=True, grad_accum_steps=2))  # all fine under DDP
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0}
    configure_deepspeed(under(DistributedType.DEEPSPEED, config), batch_size=4, max_grad_norm=0.5)
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}


def test_a_signal_during_the_agreement_is_kept_for_the_next_one(monkeypatch):
    """The handler may run while `agree` waits in its collective call. The signal must survive that
    call's answer (no signal yet), and the loop must act on agreements only: a process acting on its own
    news would leave the other in its next collective call."""
    from austen_gpt.training import distributed

    stop, accelerator = distributed.StopSignals(), SimpleNamespace(num_processes=2)
    try:

        def signal_arrives_during_the_call(accelerator, value: int) -> int:
            stop._handle(signal.SIGTERM, None)  # what Python does once the C call returns
            return value  # the other process had no signal either

        monkeypatch.setattr(distributed, "max_over_processes", signal_arrives_during_the_call)
        assert stop.agree(accelerator) is None and stop.agreed is None
        assert stop.received == signal.SIGTERM

        monkeypatch.setattr(distributed, "max_over_processes", lambda accelerator, value: value)
        assert stop.agree(accelerator) == signal.SIGTERM and stop.name == "SIGTERM"
    finally:
        stop.restore()
