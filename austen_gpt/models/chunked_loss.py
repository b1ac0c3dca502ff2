"""The output layer and the cross-entropy, chunk by chunk: the logits of a whole batch never exist at once.

With GPT-2's 50,257-token vocabulary the logits dominate a step's activation memory (8 x 512 tokens: 0.8 GB
in fp32, then as much again for the log-softmax and for its gradient), and their fp32 log-softmax is a
fifth of a CPU step. Here the hidden states are projected a chunk of tokens at a time; each chunk's loss
and its gradients (softmax minus one-hot, times the weight and times the hidden states) are computed at
once, and the chunk's logits are dropped before the next (the approach of Liger's fused linear
cross-entropy, in plain PyTorch). Backward then only scales the stored gradients. On CUDA, where Apple's
Cut Cross-Entropy is installed (`pip install cut-cross-entropy`), its Triton kernel does the same without
writing even a chunk's logits to memory.

The model keeps its output layer: `HiddenStatesHead` takes its place and its weight (under the same name,
so checkpoints and tied embeddings are unchanged), passing hidden states through while the loss is
computed, and computing logits as before everywhere else (sampling, generation, export).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

CHUNK_TOKENS = 1024  # logits in flight: 1,024 x vocabulary floats (200 MB for GPT-2, against 0.8 GB at 8 x 512)


class HiddenStatesHead(torch.nn.Module):
    """A bias-free output layer that can pass its input through: the loss then projects it chunk by chunk."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight, self.pass_through, self.compute_dtype = weight, False, weight.dtype
        self.workspace = Workspace()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.pass_through:
            return F.linear(hidden, self.weight)
        # The dtype the projection would have run in here, inside the model's forward, where accelerate's
        # autocast is on (the loss runs outside it).
        device = hidden.device.type
        self.compute_dtype = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        )
        return hidden


def install(model) -> bool:
    """Put a HiddenStatesHead in place of the model's output layer, if the logits are exactly that layer's
    projection of the hidden states (no bias, scaling, soft-capping or adapter on it): checked on a few
    tokens, so any architecture either qualifies or keeps its own layer. Returns whether it was installed."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    parent_name, _, name = _module_name(model, head).rpartition(".")
    parent = model.get_submodule(parent_name)
    tokens = torch.arange(4, device=head.weight.device)[None] % head.weight.shape[0]
    was_training = model.training
    model.eval()
    # A model whose frozen base is stored in bf16 (lora.frozen_matmul_weights_in) runs under autocast only.
    stored = {p.dtype for p in model.parameters()}
    low = next((dtype for dtype in (torch.bfloat16, torch.float16) if dtype in stored), None)
    with torch.no_grad(), torch.autocast(head.weight.device.type, dtype=low, enabled=low is not None):
        expected = model(input_ids=tokens).logits
        replacement = HiddenStatesHead(head.weight)
        setattr(parent, name, replacement)
        with hidden_states_out(replacement):
            hidden = model(input_ids=tokens).logits
        exact = hidden.shape[-1] == head.in_features and torch.allclose(
            F.linear(hidden, head.weight).float(), expected.float(), atol=1e-5, rtol=1e-4
        )
    model.train(was_training)
    if not exact:
        setattr(parent, name, head)
    return exact


def _module_name(model, module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def chunked_head(model) -> HiddenStatesHead | None:
    """The model's HiddenStatesHead, through any wrapper (DDP, PEFT), or None."""
    return next((m for m in model.modules() if isinstance(m, HiddenStatesHead)), None)


@contextlib.contextmanager
def hidden_states_out(head: HiddenStatesHead) -> Iterator[None]:
    """Within: the forward of the model that holds `head` returns hidden states as its `logits`."""
    head.pass_through = True
    try:
        yield
    finally:
        head.pass_through = False


def loss_sum(model, head: HiddenStatesHead, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the targets that are not -100, the logits computed chunk by chunk."""
    with hidden_states_out(head):
        hidden = model(input_ids=input_ids).logits
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if uses_fused_kernel(hidden.device, head.compute_dtype):
        from cut_cross_entropy import linear_cross_entropy

        compute = head.compute_dtype
        return linear_cross_entropy(hidden.to(compute), head.weight.to(compute), targets, reduction="sum").float()
    return LinearCrossEntropy.apply(hidden, head.weight, targets, head.compute_dtype, head.workspace)


def uses_fused_kernel(device: torch.device, compute: torch.dtype) -> bool:
    """Whether the loss runs in Cut Cross-Entropy's kernel: on CUDA, in bf16 or fp16, where it is installed."""
    return device.type == "cuda" and compute in (torch.bfloat16, torch.float16) and _cut_cross_entropy_installed()


@functools.cache
def _cut_cross_entropy_installed() -> bool:
    return importlib.util.find_spec("cut_cross_entropy") is not None


class Workspace:
    """The chunk's logits and fp32 scores, kept from one step to the next. Freed, a tensor this large goes
    back to the system, and the next one is page-faulted in afresh: on a CPU, allocating and casting the
    chunk's tensors took longer than its softmax (GPT-2 124M at 8 x 100: 190 ms a step, 45 ms in these)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A (rows x like's columns) tensor of `dtype` on like's device, its values undefined."""
        held = self.tensors.get(name)
        shape = (max(rows, held.shape[0] if held is not None else 0), like.shape[0])
        if held is None or held.shape != shape or held.dtype != dtype or held.device != like.device:
            held = self.tensors[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return held[:rows]


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows i with targets[i] != -100 of -log softmax(hidden[i] @ weight.T)[targets[i]], with its
    gradients computed in the same pass. Matmuls run in `compute` (the autocast dtype), the softmax in fp32,
    as in the unchunked path; the weight's gradient accumulates in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute: torch.dtype, workspace: Workspace):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None  # fp32, from the first chunk's product: no pass to zero a vocabulary-sized tensor
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)
            for start in range(0, hidden.shape[0], CHUNK_TOKENS):
                rows = slice(start, start + CHUNK_TOKENS)
                h, t = hidden[rows].to(compute), targets[rows]
                logits = torch.mm(h, w.T, out=workspace.get("logits", len(h), w, compute))
                scores = logits if compute == torch.float32 else workspace.get("scores", len(h), w, torch.float32)
                scores.copy_(logits)  # (a no-op in fp32)
                torch.log_softmax(scores, dim=-1, out=scores)  # in place (logsumexp: 5x slower on CPU)
                valid, picked = (t != -100)[:, None], t.clamp(min=0)[:, None]
                total -= (scores.gather(1, picked) * valid).sum()
                if not (want_hidden or want_weight):
                    continue
                grad = scores.exp_()  # the softmax
                grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))  # minus one-hot
                grad = logits.copy_(grad)  # in the compute dtype (a no-op in fp32)
                # Rows without a target get no gradient: masked in the (tokens x width) tensors, not in this one.
                if want_hidden:
                    torch.mul(grad @ w, valid, out=grad_hidden[rows])
                if want_weight:
                    part = grad.T @ (h * valid)
                    grad_weight = part.to(torch.float32) if grad_weight is None else grad_weight.add_(part)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:  # scaled in place: a vocabulary-sized tensor, and backward runs once
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
