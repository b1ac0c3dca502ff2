"""Process state and the rules of several processes: starting them, stopping them together, FSDP and DeepSpeed.

One process or many, the loop is the same; what differs is decided here. Every process must take
every decision (stop, save) at the same step, or the others wait forever in their next collective call.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, parse_flag_from_env

from austen_gpt.cli import UserError
from austen_gpt.training.checkpoints import continue_from_weights


def start_processes():
    """Accelerate's process state, set up before anything asks for it.

    Launched by torchrun on a machine without CUDA, the processes train on CPU over gloo; accelerate
    does so only when told (ACCELERATE_USE_CPU=true), and otherwise runs each process alone. DeepSpeed
    has a CPU accelerator of its own, which accelerate starts only when given the gloo backend.
    """

    launched_without_cuda = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if launched_without_cuda and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return PartialState(backend="gloo")
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or launched_without_cuda)


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) asks the loop to stop after the current
    optimizer step, with a checkpoint. A second signal exits at once: checkpoint writes are atomic,
    so an interrupted save leaves only a `.tmp` folder that is never resumed from.

    `received` is this process's own news, set by the handler at any moment; `agreed` is what all
    processes learnt at the last `agree()`, and is the only thing the loop may act on: a process that
    acted on its own news alone would leave the others waiting in their next collective call.
    """

    def __init__(self):
        self.received: int | None = None
        self.agreed: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again quits at once)", file=sys.stderr)

    def agree(self, accelerator) -> int | None:
        """The signal any process received, now known to all of them (a collective call).

        `received` is read, never written, here: a signal that lands during the collective call stays
        in it for the next agreement instead of being overwritten by this one's answer."""
        self.agreed = max_over_processes(accelerator, self.received or 0) or None
        return self.agreed

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def max_over_processes(accelerator, value: int) -> int:
    """The largest `value` of all processes, so that they all take the same decision at the same step."""

    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def parallelism(accelerator) -> str:
    """How several processes share the work, for the log: DDP, FSDP2 or DeepSpeed ZeRO-2, say."""

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return "DDP"


def unwrapped(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model inside any DDP, FSDP, DeepSpeed or torch.compile wrapper. Where there is none, the model itself
    without asking accelerate: its unwrap_model imports DeepSpeed (about 2 s) wherever that is installed."""
    if accelerator.distributed_type == DistributedType.NO and not hasattr(model, "_orig_mod"):
        return model
    return accelerator.unwrap_model(model)


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered from FSDP shards or DeepSpeed partitions (a collective call: on every
    process); in one process, the model's own (see `unwrapped`)."""
    if accelerator.distributed_type == DistributedType.NO:
        return unwrapped(accelerator, model).state_dict()
    return accelerator.get_state_dict(model)


def optimizer_state_is_split(accelerator) -> bool:
    """FSDP and DeepSpeed hold each process's part of the optimizer state only (DDP: all of it on each)."""

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def refuse_unsupported(accelerator, checkpoint: Path | None, load_in_8bit: bool, grad_accum_steps: int) -> None:
    """What this loop does not do under FSDP and DeepSpeed (`checkpoint`: the one to resume from, if any)."""

    if optimizer_state_is_split(accelerator) and checkpoint:
        raise UserError(
            "resuming under FSDP or DeepSpeed is not supported (the optimizer state is split over the processes); "
            "resume with DDP (torchrun or configs/accelerate/ddp.yaml), or " + continue_from_weights(checkpoint)
        )
    if accelerator.distributed_type == DistributedType.FSDP and load_in_8bit:
        # bitsandbytes' 8-bit layers lose their quantization state when FSDP2 shards their weights
        raise UserError(
            "--load-in-8bit is not supported under FSDP; use --qlora, or DDP (torchrun or configs/accelerate/ddp.yaml)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and grad_accum_steps > 1:
        raise UserError("under DeepSpeed use --grad-accum-steps 1 (DeepSpeed steps at every backward)")


def configure_deepspeed(accelerator, batch_size: int, max_grad_norm: float) -> None:
    """DeepSpeed reads the batch size off prepare()d loaders, which ours are not, and clips inside its
    own step (accelerator.clip_grad_norm_ only reports the norm there): both come from the flags."""

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = batch_size
        config["gradient_clipping"] = max_grad_norm
