"""The training step's hot path: no device-to-host reads between log points, and a non-finite loss that
never updates the weights, skipped on the device."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from conftest import on_native_bf16, train_args
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from austen_gpt.cli import CliError
from austen_gpt.models.evaluation import lm_loss_sum
from austen_gpt.training import loop, step
from train import main

# Steps of the run below: 24 (one epoch of 187 examples in batches of 8), a log point every 10.
SETTINGS = ["--epochs", "1", "--max-input-length", "64", "--sample-every", "0", "--precision", "fp32"]
SETTINGS += ["--data-cache", "", "--log-every", "10"]


class ScalarReads(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: every `.item()`, `int(t)`, `float(t)` or `if t:` on a tensor, each
    of which makes the host wait for the device, outside the functions that are allowed to. The DataLoader
    draws each epoch's worker seed from a CPU generator: a read of the host's own memory, not counted."""

    def __init__(self):
        super().__init__()
        self.allowed, self.outside = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.allowed:
            callers = [f"{frame.filename}:{frame.lineno}" for frame in traceback.extract_stack()[:-1]]
            if not any("torch/utils/data/" in caller for caller in callers):
                self.outside.append(callers[-1])
        return func(*args, **(kwargs or {}))


def allowed_in(reads: ScalarReads, function):
    def wrapper(*args, **kwargs):
        reads.allowed += 1
        try:
            return function(*args, **kwargs)
        finally:
            reads.allowed -= 1

    return wrapper


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=on_native_bf16)])
def test_no_host_waits_for_the_device_between_log_points(precision, tmp_path, tiny_model_dir, small_data, monkeypatch):
    """The whole training loop runs under the counter; set-up, log points, validation, checkpoints and the
    export may read, the steps between them must not (in bf16 too: autocast, dropout masks from random bits)."""
    reads, log_points = ScalarReads(), []
    log_step = loop.log_step
    monkeypatch.setattr(
        loop, "log_step", lambda run, state, *a: log_points.append(state.global_step) or log_step(run, state, *a)
    )
    for name in ("set_up", "log_step", "validate", "save", "log_samples", "write_final_model"):
        monkeypatch.setattr(loop, name, allowed_in(reads, getattr(loop, name)))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # this process may have trained at another precision
    with reads:
        assert main(train_args(tmp_path, tiny_model_dir, small_data, *SETTINGS, "--precision", precision)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert log_points == [10, 20, 24]  # every 10 steps, and the epoch's last step
    assert reads.outside == []


def test_a_non_finite_loss_is_skipped_on_the_device_and_named_at_the_next_log_point(
    tmp_path, tiny_model_dir, small_data, monkeypatch, capsys
):
    """Step 3's loss is made infinite: the weights after the run stops are those of steps 1-2 and 4-..., never
    an update from step 3; the run stops at the log point of step 10 and names step 3."""
    calls = [0]

    def infinite_at_step_3(model, batch):
        loss, n = lm_loss_sum(model, batch)
        calls[0] += model.training
        return (loss * float("inf") if calls[0] == 3 else loss), n

    monkeypatch.setattr(step, "lm_loss_sum", infinite_at_step_3)
    updates = []
    optimizer_step = loop.optimizer_step

    def recording_step(model, optimizer, *args):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer_step(model, optimizer, *args)
        updates.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)))

    monkeypatch.setattr(loop, "optimizer_step", recording_step)
    with pytest.raises(CliError, match="the loss became inf at step 3; stopped without saving"):
        main(train_args(tmp_path, tiny_model_dir, small_data, *SETTINGS, "--warmup-steps", "0"))
    assert updates == [True, True, False, *[True] * 7]  # stopped at the log point of step 10
    assert not (tmp_path / "out").exists() and not list((tmp_path / "Checkpoints").glob("Step_*"))


def test_the_logged_loss_is_the_mean_since_the_last_log_point(tmp_path, tiny_model_dir, small_data):
    assert main(train_args(tmp_path, tiny_model_dir, small_data, *SETTINGS)) == 0
    lines = [json.loads(line) for line in (tmp_path / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "train_loss" in line]
    assert steps == [10, 20, 24] and all(line["train_loss"] > 0 for line in lines if "train_loss" in line)
    assert load_file(Path(tmp_path / "out/model.safetensors"))


def tiny_model(architecture: str, vocab: int = 300):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    small = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    config = {
        "gpt2": GPT2Config(n_layer=2, n_embd=64, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **small),
        "llama": LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            **small,
        ),
    }[architecture]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_right_padding_needs_no_attention_mask_in_training(architecture):
    """Why lm_loss_sum passes none: under causal attention the real tokens' logits are bitwise the same."""
    from austen_gpt.data.batches import collate

    model = tiny_model(architecture).eval()
    batch = collate([[1, 5, 7, 9, 11, 13], [1, 4, 4]], pad_id=0)
    masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    unmasked = model(input_ids=batch["input_ids"]).logits
    real = batch["attention_mask"].bool()
    assert torch.equal(masked[real], unmasked[real])


# ---- the chunked output layer and loss ---------------------------------------------------------------


def loss_and_gradients(model, batch: dict, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """As train.py computes them: under bf16, autocast is on inside the model's forward only (accelerate
    wraps it), and the loss is computed outside."""
    model.zero_grad()
    forward = model.forward
    if precision == "bf16":
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(forward)
    loss, n = lm_loss_sum(model, batch)
    model.forward = forward
    (loss / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_chunked_loss_has_the_same_value_and_gradients(architecture, precision, tolerance, monkeypatch):
    """GPT-2 ties its output layer to the embeddings, this Llama does not; a padded batch (targets -100) in
    chunks of 7 tokens, so that chunks end mid-row and one is short."""
    from austen_gpt.data.batches import collate
    from austen_gpt.models import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_TOKENS", 7)
    model = tiny_model(architecture)
    batch = collate([list(range(1, 20)), [5, 6, 7, 8, 9], list(range(100, 112))], pad_id=0)
    expected_loss, expected = loss_and_gradients(model, batch, precision)
    assert chunked_loss.install(model)
    loss, grads = loss_and_gradients(model, batch, precision)
    head = chunked_loss.chunked_head(model)
    assert head.compute_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)  # as the layer would
    assert grads.keys() == expected.keys()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=tolerance)
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        assert (grad - expected[name]).abs().max().item() <= tolerance * scale + 1e-8, name
    if architecture == "gpt2":  # still tied: one tensor, named as before
        assert model.lm_head.weight is model.transformer.wte.weight
    assert set(model.state_dict()) == set(tiny_model(architecture).state_dict())


def test_the_chunked_loss_trains_lora_adapters_the_same(monkeypatch):
    from austen_gpt.data.batches import collate
    from austen_gpt.models import chunked_loss
    from austen_gpt.models.lora import add_lora

    monkeypatch.setattr(chunked_loss, "CHUNK_TOKENS", 7)
    batch = collate([list(range(1, 20)), [5, 6, 7, 8, 9]], pad_id=0)
    results = []
    for chunked in (False, True):
        model = add_lora(tiny_model("gpt2"), 4, 8, 0.0, ["c_attn", "c_fc"], quantized=False, base_name="tiny")
        for name, p in model.named_parameters():
            if "lora_B" in name:  # not zero, so that every adapter gets a gradient
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        assert not chunked or chunked_loss.install(model)
        results.append(loss_and_gradients(model, batch, "fp32"))
    (loss, grads), (chunked_loss_value, chunked_grads) = results
    assert chunked_loss_value.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grads.keys() == chunked_grads.keys() and all("lora_" in name for name in grads)
    assert all(torch.allclose(grads[k], chunked_grads[k], rtol=1e-4, atol=1e-7) for k in grads)


def test_an_output_layer_that_is_more_than_a_projection_keeps_its_own_path():
    """Soft-capped logits (as Gemma 2's) are caught by the check at installation. (Scaled ones need no
    catching: a scale commutes with the projection, so the chunked loss computes them right.)"""
    from austen_gpt.models import chunked_loss

    model = tiny_model("llama")
    forward = model.forward

    def soft_capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        return type(out)(logits=2.0 * torch.tanh(out.logits / 2.0))

    model.forward = soft_capped
    head = model.lm_head
    assert not chunked_loss.install(model)
    assert model.lm_head is head and chunked_loss.chunked_head(model) is None


# ---- the fused GELU ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_the_fused_gelu_has_the_same_value_and_gradients(precision, tolerance):
    """GPT-2's gelu_new as PyTorch's one kernel: the model's loss and every gradient as before, its config and
    weights' names unchanged (so saved models are the same)."""
    from transformers.activations import NewGELUActivation

    from austen_gpt.data.batches import collate
    from austen_gpt.models import lean_layers

    model = tiny_model("gpt2")
    assert model.config.activation_function == "gelu_new"
    batch = collate([list(range(1, 20)), [5, 6, 7, 8, 9]], pad_id=0)
    expected_loss, expected = loss_and_gradients(model, batch, precision)
    assert lean_layers.fuse_activations(model) == 2 == lean_layers.fused_activations(model)  # one per block
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    loss, grads = loss_and_gradients(model, batch, precision)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=tolerance)
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        assert (grad - expected[name]).abs().max().item() <= tolerance * scale + 1e-8, name
    assert model.config.activation_function == "gelu_new"
    assert set(model.state_dict()) == set(tiny_model("gpt2").state_dict())
    assert lean_layers.fuse_activations(tiny_model("llama")) == 0  # SiLU: already one kernel


def test_the_fused_gelu_keeps_less_for_backward():
    """What it is for: the tensors autograd keeps for one MLP activation, before and after."""
    from torch.autograd.graph import saved_tensors_hooks

    from austen_gpt.models import lean_layers

    def saved_bytes(activation) -> int:
        kept = []
        with saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
            activation(torch.randn(64, 256, requires_grad=True))
        return sum(kept)

    model = tiny_model("gpt2")
    unfused = saved_bytes(model.transformer.h[0].mlp.act)
    lean_layers.fuse_activations(model)
    assert saved_bytes(model.transformer.h[0].mlp.act) * 4 <= unfused


def test_attention_with_dropout_is_recomputed_on_the_cpu_with_bitwise_the_same_result(tmp_path):
    """GPT-2's attention dropout sends PyTorch's CPU attention to its unfused path, which keeps the whole score
    matrices for backward; recomputing them there instead changes no bit of the loss, the gradients or the
    random stream (the dropout masks are drawn again from the saved state), and keeps far less."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from austen_gpt.data.batches import collate
    from austen_gpt.models import lean_layers

    settings = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300, attn_pdrop=0.1, n_positions=512)
    settings.update(bos_token_id=0, eos_token_id=0)
    batch = collate([list(range(1, 300)), list(range(50, 120))], pad_id=0)  # 299 tokens: long enough

    def step(recompute: bool, batch: dict = batch):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**settings)).train()
        assert lean_layers.recompute_attention(model, from_tokens=256) if recompute else True
        kept = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        return model, loss, grads, torch.rand(3), sum(kept)

    _, loss, grads, after, kept = step(recompute=False)
    model, recomputed_loss, recomputed_grads, recomputed_after, recomputed_kept = step(recompute=True)
    assert torch.equal(loss, recomputed_loss) and torch.equal(after, recomputed_after)
    assert all(torch.equal(grads[k], recomputed_grads[k]) for k in grads)
    scores = 2 * 4 * 299 * 299 * 4  # one layer's attention probabilities alone, fp32
    assert recomputed_kept < kept - 2 * scores
    short = collate([list(range(1, 100))], pad_id=0)  # short: the scores are small, kept as they are
    assert step(recompute=False, batch=short)[-1] == step(recompute=True, batch=short)[-1]
    assert lean_layers.recomputes_attention(model)
    model.save_pretrained(tmp_path)
    assert "sdpa" not in (tmp_path / "config.json").read_text()  # saved models are as before
    no_dropout = GPT2LMHeadModel(GPT2Config(**{**settings, "attn_pdrop": 0.0}))
    assert not lean_layers.recompute_attention(no_dropout, from_tokens=256)


def test_dropout_masks_from_random_bits_drop_at_the_rate_and_keep_the_expectation():
    """Each of the four 16-bit lanes of a random word (the sign bit included) is kept at 1 - p; the kept values
    are scaled so that the mean is kept; backward uses the forward's mask."""
    from austen_gpt.models.lean_layers import drawn_dropout, keep_mask

    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1000]), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and scale == pytest.approx(1 / 0.9, rel=1e-4)
    for lane in range(4):  # the random words' lanes, element i in lane i % 4
        assert keep.flatten()[lane::4].float().mean().item() == pytest.approx(0.9, abs=0.003)
    assert keep_mask(torch.Size([5]), 0.0, torch.device("cpu"))[0].all()

    x = torch.full((400, 1000), 3.0, dtype=torch.bfloat16, requires_grad=True)
    y = drawn_dropout(x, 0.25)
    assert y.dtype == torch.bfloat16 and y.float().mean().item() == pytest.approx(3.0, rel=0.01)
    assert set(y.unique().tolist()) == {0.0, 4.0}
    y.float().sum().backward()
    assert torch.equal(x.grad == 0, y == 0) and x.grad.max().item() == pytest.approx(4 / 3, rel=1e-2)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_written_out_attention_is_pytorchs_without_dropout(architecture):
    """At rate 0 the attention written out for the masks (causal, or a padding mask; Llama's grouped heads)
    equals transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from austen_gpt.models.lean_layers import attention_with_drawn_dropout

    model = tiny_model(architecture)
    module = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    torch.manual_seed(0)
    groups = getattr(module, "num_key_value_groups", 1)
    query = torch.randn(2, 4, 9, 16)
    key, value = torch.randn(2, 4 // groups, 9, 16), torch.randn(2, 4 // groups, 9, 16)
    padding = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril_()
    padding[1, :, :, 6:] = False
    for mask in (None, padding):
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=0.25)
        written, _ = attention_with_drawn_dropout(module, query, key, value, mask, dropout=0.0, scaling=0.25)
        assert torch.allclose(written, expected, atol=1e-5), mask is None


def test_in_bf16_on_the_cpu_dropout_draws_masks_from_random_bits_and_attention_is_still_recomputed_exactly(
    monkeypatch,
):
    """bf16 on a CPU: GPT-2's dropout layers draw their masks from random bits (fp32 keeps the model's own), the
    loss is about the same as with the model's own dropout, and recomputing the attention in backward changes
    no bit."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from austen_gpt.data.batches import collate
    from austen_gpt.models import lean_layers

    settings = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=512, bos_token_id=0, eos_token_id=0)
    batch = collate([list(range(1, 300)), list(range(50, 120))], pad_id=0)  # long enough to recompute

    draws, keep_mask = [], lean_layers.keep_mask
    monkeypatch.setattr(lean_layers, "keep_mask", lambda *a: draws.append(a[0]) or keep_mask(*a))

    def loss_and_gradients_of(draw: bool):
        draws.clear()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**settings)).train()
        assert lean_layers.recompute_attention(model, from_tokens)
        if draw:  # embeddings; attention, output and MLP in each block
            assert lean_layers.draw_masks(model) == 1 + 3 * 2 == lean_layers.draws_masks(model)
        torch.manual_seed(1)
        return loss_and_gradients(model, batch, "bf16")

    from_tokens = 256
    own, _ = loss_and_gradients_of(draw=False)
    assert not draws
    drawn, grads = loss_and_gradients_of(draw=True)
    attention = [shape for shape in draws if len(shape) == 4]  # batch x heads x tokens x tokens
    assert len(draws) == 1 + 3 * 2 + 2 and len(attention) == 2 * 2  # the attention's drawn again in backward
    assert drawn.item() == pytest.approx(own.item(), rel=0.02) and not torch.equal(drawn, own)  # other masks
    from_tokens = 10**6  # the attention kept for backward
    kept, kept_grads = loss_and_gradients_of(draw=True)
    assert torch.equal(drawn, kept) and all(torch.equal(g, kept_grads[k]) for k, g in grads.items())


# ---- on CUDA (the GPU check, scripts/gpu_check.sh, runs these; skipped elsewhere) --------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["chunks", "cut-cross-entropy"])
def test_on_cuda_the_chunked_loss_has_the_same_value_and_gradients(kernel, monkeypatch):
    """bf16 on the GPU, GPT-2 with its tied output layer: our chunks, and Cut Cross-Entropy's kernel where it
    is installed, against the model's own output layer and a whole-batch loss."""
    from austen_gpt.data.batches import collate
    from austen_gpt.models import chunked_loss

    if kernel == "cut-cross-entropy":
        pytest.importorskip("cut_cross_entropy")
    else:
        monkeypatch.setattr(chunked_loss, "_cut_cross_entropy_installed", lambda: False)
    monkeypatch.setattr(chunked_loss, "CHUNK_TOKENS", 7)
    model = tiny_model("gpt2", vocab=5000).cuda()
    batch = {k: v.cuda() for k, v in collate([list(range(1, 40)), [5, 6, 7, 8, 9]], pad_id=0).items()}

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        return loss.item(), {k: p.grad.float().clone() for k, p in model.named_parameters()}

    expected_loss, expected = loss_and_grads()
    assert chunked_loss.install(model)
    assert chunked_loss.uses_fused_kernel(batch["input_ids"].device, torch.bfloat16) == (kernel != "chunks")
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(expected_loss, rel=2e-2)
    for name, grad in grads.items():
        assert (grad - expected[name]).abs().max().item() <= 2e-2 * expected[name].abs().max().item() + 1e-6, name


def test_the_device_table_decides_the_lean_layers_and_a_recorded_row_wins():
    from austen_gpt.training.hot_path import DeviceChoices, device_choices, record

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert device_choices(cpu, torch.bfloat16, None).drawn_masks  # bf16 on a CPU draws masks from random bits
    assert not device_choices(cpu, torch.float32, None).drawn_masks  # fp32 keeps the model's own dropout
    assert device_choices(gpu, torch.bfloat16, None) == DeviceChoices()  # GPUs: PyTorch's fused kernels
    started = device_choices(cpu, torch.float32, None)
    assert device_choices(cpu, torch.bfloat16, record(started)) == started  # a resumed run keeps its row
    newer = {**record(started), "a_choice_of_later_code": True}
    assert device_choices(cpu, torch.bfloat16, newer) == started


def test_freed_memory_is_reused_on_glibc():
    import platform

    from austen_gpt.models.device import reuse_freed_memory

    assert reuse_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_in_bf16_each_weight_is_cast_once_per_step_however_many_micro_batches():
    """Two micro-batches in one accumulation window: autocast casts each weight to bf16 once, not once per
    micro-batch, and the accumulated gradients are bitwise those of casting at every forward. After the
    window, the weights are cast again. (The chunked loss casts the output layer itself, in each forward.)"""
    from collections import Counter

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import GPT2Config, GPT2LMHeadModel

    from austen_gpt.data.batches import collate
    from austen_gpt.models import chunked_loss
    from austen_gpt.training.step import CastsPerStep, forward_backward

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self, weights: dict[int, str]):
            super().__init__()
            self.weights, self.casts = weights, Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.weights:
                self.casts[self.weights[args[0].data_ptr()]] += 1
            return func(*args, **(kwargs or {}))

    batches = [collate([list(range(1, 40)), list(range(7, 30))], pad_id=0), collate([list(range(3, 50))], pad_id=0)]
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def window(once_per_step: bool):
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.manual_seed(0)
        dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64, **dropout))
        assert chunked_loss.install(model)
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        model = accelerator.prepare(model)
        casts = CastsPerStep(accelerator, sharded=False)
        casts.enabled = once_per_step
        counter = CountWeightCasts({p.data_ptr(): name for name, p in model.named_parameters() if p.dim() == 2})
        with counter:
            for i, batch in enumerate(batches):
                casts.open()
                forward_backward(model, batch, accelerator, targets, sync=i == len(batches) - 1)
            casts.close()
            with torch.no_grad():  # as an optimizer step would
                model.transformer.wte.weight.add_(1e-3)
            forward_backward(model, batches[0], accelerator, targets, sync=True)
        return counter.casts, {name: p.grad for name, p in model.named_parameters()}

    once, grads = window(once_per_step=True)
    each, each_grads = window(once_per_step=False)
    # attention and MLP weights, 4 a block (c_attn, c_proj, c_fc, mlp.c_proj), then one more forward
    autocast_once = {k: n for k, n in once.items() if "wte" not in k}
    assert len(autocast_once) == 2 * 4 and all(n == 1 + 1 for n in autocast_once.values())
    assert all(n == 2 + 1 for k, n in each.items() if "wte" not in k)
    assert all(torch.equal(g, each_grads[k]) for k, g in grads.items())
    AcceleratorState._reset_state(reset_partial_state=True)
