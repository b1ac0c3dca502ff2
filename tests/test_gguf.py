"""export.py --gguf, checked against a real llama.cpp (llama-cpp-python, built from source): its tokens are
ours, its logits are PyTorch's, its prompts start as ours, for GPT-2, Llama and Qwen2 briefly trained so that
their top tokens have margins (random tiny models' nearly flat logits flip greedy tokens on summation order)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import GPT2_TOKENIZER_DIR, TOKENIZER_DIR, run_in_process, skip_unless_installed, tiny_config
from families import FAMILIES, build_family

import export

pytestmark = pytest.mark.xdist_group("gguf")  # the trained fixtures are built once


def llama_cpp():
    """llama-cpp-python, its models loaded without llama.cpp's extra CPU buffer types (AMX, repacked weights):
    some virtual machines list AMX but stop at its tile instructions ('Illegal instruction' in llama.cpp's q8_0
    matrix products), and the plain kernels compute the same logits within every bound here."""
    try:
        import llama_cpp
        import llama_cpp.llama as llama_module
    except ImportError:
        skip_unless_installed("llama-cpp-python is not installed (requirements-dev.txt builds it from source)")
    if not getattr(llama_cpp.llama_model_default_params, "plain_kernels", False):
        default = llama_cpp.llama_model_default_params

        def plain_kernels():
            params = default()
            params.use_extra_bufts = False
            return params

        plain_kernels.plain_kernels = True
        llama_cpp.llama_model_default_params = llama_module.llama_cpp.llama_model_default_params = plain_kernels
    return llama_cpp


def blocks(tokenizer, paragraphs: list[str], length: int = 64) -> torch.Tensor:
    from austen_gpt.data.tokens import paragraph_frame

    start, end = paragraph_frame(tokenizer)
    ids = [t for p in paragraphs for t in [start, *tokenizer(p, add_special_tokens=False)["input_ids"], end]]
    usable = len(ids) // length * length
    return torch.tensor(ids[:usable]).view(-1, length)


def trained(folder: Path, paragraphs: list[str], steps: int) -> Path:
    """The model in `folder` trained for a few steps on Austen, saved back: its top tokens get margins."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(str(folder))
    data = blocks(tokenizer, paragraphs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, austen_paragraphs) -> dict[str, Path]:
    """Briefly trained tiny models: GPT-2 with this project's BPE, and Llama and Qwen2 with their families'
    special tokens (byte-level BPEs, the only kind testable offline)."""
    from transformers import GPT2LMHeadModel

    from austen_gpt.models.loading import load_tokenizer

    root, text = tmp_path_factory.mktemp("gguf-models"), austen_paragraphs[:600]
    gpt2 = root / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(n_positions=256)).save_pretrained(gpt2)
    load_tokenizer(str(TOKENIZER_DIR)).save_pretrained(gpt2)
    # Steps chosen so that the top tokens have margins and, for Llama, the rotary layout matters: without its
    # permutation the f32 logits then differ by 0.02 (measured), far over the 1e-3 bound
    found = {"gpt2": trained(gpt2, text, steps=30)}
    for name in ("llama", "qwen2"):
        found[name] = trained(build_family(root / name, FAMILIES[name], text), text, steps=60)
    return found


def export_gguf(model: Path, out: Path, kind: str) -> Path:
    assert export.main(["--model-path", str(model), "--gguf", str(out), "--gguf-type", kind]) == 0
    return out


def variant(source: Path, folder: Path, weights: Callable | None = None, **config) -> Path:
    """`source`'s model saved in `folder` with `config` changed, then, given `weights`, its weights changed by it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(source, folder)
    changed = AutoConfig.from_pretrained(folder)
    for key, value in config.items():
        setattr(changed, key, value)
    changed.save_pretrained(folder)
    if weights:
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            weights(dict(model.named_parameters()))
        model.save_pretrained(folder)
    return folder


def sharper_attention(weights: dict[str, torch.Tensor]) -> None:
    """Queries and keys 4 times longer: the briefly trained models barely attend by position (Llama 3's scaling
    moves the tiny Llama's logits by 0.009 only); sharper attention makes the rotary positions matter."""
    for name, weight in weights.items():
        if "q_proj" in name or "k_proj" in name:
            weight.mul_(4)


def random_biases(weights: dict[str, torch.Tensor]) -> None:
    """Every bias (where the model has them) drawn at random (seed 2): nonzero, so a layout mistake shows."""
    torch.manual_seed(2)
    for name, weight in weights.items():
        if name.endswith(".bias"):
            weight.normal_(0, 0.5)


def metadata(reader, name: str):
    """A GGUF metadata value: a string or a number."""
    import gguf

    field = reader.fields[name]
    value = field.parts[field.data[0]]
    return value.tobytes().decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0]


def prompts(tokenizer, paragraphs: list[str], tokens: int) -> list[list[int]]:
    from austen_gpt.sampling.generation import prompt_ids

    return [prompt_ids(tokenizer, paragraph)[:tokens] for paragraph in paragraphs]


def pytorch_logits(model_dir: Path, paragraphs: list[str], tokens: int = 128) -> np.ndarray:
    """PyTorch's logits at every position of each paragraph's first `tokens` prompt tokens, stacked."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        found = [
            model(torch.tensor([ids])).logits[0].numpy()
            for ids in prompts(load_tokenizer(str(model_dir)), paragraphs, tokens)
        ]
    return np.concatenate(found)


def teacher_forced(
    model_dir: Path, gguf: Path, paragraphs: list[str], tokens: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(PyTorch's logits, llama.cpp's) at every position of each paragraph's first `tokens` prompt tokens, stacked."""
    from austen_gpt.models.loading import load_tokenizer

    llm = llama_cpp().Llama(str(gguf), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    theirs = []
    for paragraph, ids in zip(paragraphs, prompts(load_tokenizer(str(model_dir)), paragraphs, tokens), strict=True):
        assert llm.tokenize(paragraph.encode(), add_bos=True, special=False)[:tokens] == ids  # llama.cpp's prompt
        llm.reset()
        llm.eval(ids)
        theirs.append(np.array(llm.scores[: len(ids)]))
    llm.close()
    return pytorch_logits(model_dir, paragraphs, tokens), np.concatenate(theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_llama_cpp_computes_pytorchs_logits_in_every_type(name, models, tmp_path, austen_paragraphs):
    """Teacher-forced on 5 held-out paragraphs; `pytest -s` prints each type's agreement (docs/export.md)."""
    llama_cpp()
    paragraphs, found = austen_paragraphs[1000:1005], {}
    for kind in ("f32", "f16", "q8_0", "q4_k_m"):
        out = export_gguf(models[name], tmp_path / f"{kind}.gguf", kind)
        ours, theirs = teacher_forced(models[name], out, paragraphs)
        found[kind] = (ours.argmax(-1) == theirs.argmax(-1)).mean(), np.abs(ours - theirs).max()
        print(f"{name} {kind}: {out.stat().st_size / 2**20:.2f} MiB, {len(ours)} positions, same next token "
              f"{found[kind][0]:.1%}, largest logit difference {found[kind][1]:.2e}")  # fmt: skip
    assert found["f32"][0] == 1 and found["f32"][1] <= F32_BOUND
    assert found["f16"][0] == 1 and found["f16"][1] <= F16_BOUND
    assert found["q8_0"][0] >= 0.95 and found["q4_k_m"][0] >= 0.8
    assert not list(tmp_path.glob(".*"))  # no partial file, nor the f16 that q4_k_m was quantized from, is left


F32_BOUND = 1e-3  # llama.cpp's f32 sums in another order than PyTorch's: up to 5e-4 on these models' logits
# f16 rounds each weight by up to 2^-11 of itself: on these models' logits (up to about 6) that moved the largest
# logit by 0.0010 (GPT-2), 0.0009 (Llama) and 0.0012 (Qwen2) on 2026-12-07; the bound leaves 8x room
F16_BOUND = 0.01


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_dir", [TOKENIZER_DIR, GPT2_TOKENIZER_DIR], ids=["austen-bpe", "gpt2"])
def test_llama_cpps_tokens_are_ours_on_1000_paragraphs(tokenizer_dir, tmp_path, austen_paragraphs):
    from transformers import GPT2LMHeadModel

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.generation import prompt_ids

    tokenizer = load_tokenizer(str(tokenizer_dir))
    folder = tmp_path / "model"
    GPT2LMHeadModel(tiny_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gguf = export_gguf(folder, tmp_path / "vocab.gguf", "f16")
    llm = llama_cpp().Llama(str(gguf), vocab_only=True, verbose=False)
    paragraphs = austen_paragraphs[:1000]
    for paragraph in paragraphs:
        ours = tokenizer(paragraph, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(paragraph.encode(), add_bos=False, special=False) == ours, paragraph
    for prompt in ["It was a fine morning", "Emma", "", "Mr. Knightley said"]:
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == prompt_ids(tokenizer, prompt)
    llm.close()


def test_the_modelfile_and_metadata(models, tmp_path):
    import gguf

    out = export_gguf(models["gpt2"], tmp_path / "austen.gguf", "f32")
    modelfile = (tmp_path / "austen.Modelfile").read_text()
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "FROM ./austen.gguf" in modelfile
    assert "# ollama create austen -f austen.Modelfile" in modelfile
    reader = gguf.GGUFReader(str(out))
    assert metadata(reader, "general.architecture") == "gpt2" and metadata(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert metadata(reader, "gpt2.context_length") == 256 and metadata(reader, "tokenizer.ggml.add_bos_token")
    assert metadata(reader, "general.name") == "gpt2"
    assert metadata(reader, "tokenizer.ggml.bos_token_id") == 0  # <|endoftext|> starts


def modelfile_parameters(text: str) -> dict:
    """The Modelfile's PARAMETER lines, each name once, values read as JSON (numbers, a quoted stop)."""
    found = [line.split(" ", 2)[1:] for line in text.splitlines() if line.startswith("PARAMETER ")]
    assert len(found) == len(dict(found))
    return {name: json.loads(value) for name, value in found}


def inference_parameters(settings, context: int) -> dict:
    """How inference.py samples with `settings`, in Ollama's names: its penalty over the whole window (-1: num_ctx),
    no min-p cut, as many new tokens as it draws for an empty prompt, one paragraph."""
    return {
        "stop": "<|endoftext|>",
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "min_p": 0,
        "repeat_penalty": settings.repetition_penalty,
        "repeat_last_n": -1,
        "num_predict": settings.new_tokens(0),
        "num_ctx": context,
    }


@pytest.mark.parametrize("recorded", [None, {"top_k": 20, "top_p": 0.8}], ids=["no-run", "a-runs-sampling"])
def test_the_modelfile_samples_as_inference_py_does(recorded, models, tmp_path):
    """Every PARAMETER is what inference.py takes for the model (sampling_of_run: a run's recorded top-k and
    top-p), so none of Ollama's own defaults (a repeat penalty of 1.1 over 64 tokens, ...) is left in place."""
    from austen_gpt.models.saving import EXPORT_NOTE
    from austen_gpt.sampling.loading import sampling_of_run
    from austen_gpt.settings import SamplingSettings

    folder = tmp_path / "model"
    shutil.copytree(models["gpt2"], folder)
    if recorded:
        (folder / EXPORT_NOTE).write_text(json.dumps({"settings": recorded}))
    export_gguf(folder, tmp_path / "austen.gguf", "f32")
    settings, _ = sampling_of_run(str(folder), SamplingSettings(), set())
    assert not recorded or (settings.top_k, settings.top_p) == (20, 0.8)
    found = modelfile_parameters((tmp_path / "austen.Modelfile").read_text())
    assert found == inference_parameters(settings, 256)


def test_the_modelfile_follows_every_sampling_setting(tokenizer, tmp_path):
    """Settings unlike the defaults (runs record only top-k and top-p): each reaches its PARAMETER."""
    from austen_gpt.models.gguf_file import modelfile
    from austen_gpt.settings import SamplingSettings

    settings = SamplingSettings(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.3, max_new_tokens=40)
    found = modelfile_parameters(modelfile(tmp_path / "austen.gguf", tokenizer, settings, 128))
    assert found == inference_parameters(settings, 128) and found["num_predict"] == 40


@pytest.mark.slow
def test_llama_cpp_computes_the_logits_of_a_model_trained_from_random_weights(models, tmp_path, austen_paragraphs):
    """Past the positions it trained on, such a model's weights are noise: llama.cpp is told the trained length
    and given that many rows of GPT-2's position table (it refuses a table of another length), so the file
    loads and llama.cpp computes PyTorch's logits on prompts within the length."""
    import gguf

    folder = variant(models["gpt2"], tmp_path / "scratch", trained_positions=63)
    out = export_gguf(folder, tmp_path / "scratch.gguf", "f32")
    assert metadata(gguf.GGUFReader(str(out)), "gpt2.context_length") == 63
    assert "PARAMETER num_ctx 63" in (tmp_path / "scratch.Modelfile").read_text()
    ours, theirs = teacher_forced(folder, out, austen_paragraphs[1000:1005], tokens=63)
    same, difference = (ours.argmax(-1) == theirs.argmax(-1)).mean(), np.abs(ours - theirs).max()
    print(f"gpt2 from random weights, context 63, f32: {len(ours)} positions, same next token {same:.1%}, "
          f"largest logit difference {difference:.2e}")  # fmt: skip
    assert difference <= F32_BOUND


# Rotary scalings llama.cpp computes from what the export writes. With a trained length of 16, Llama 3's scaling
# slows each of the tiny models' 4 rotary frequencies (head size 8): the fastest by 1.74 (between its thresholds),
# the others by the full factor 8; the prompts run to 128 positions
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16,
)  # fmt: skip
LINEAR_ROPE = dict(rope_type="linear", rope_theta=10000.0, factor=4.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, weights, config",
    [
        ("llama", sharper_attention, dict(rope_parameters=LLAMA3_ROPE)),
        ("llama", sharper_attention, dict(rope_parameters=LINEAR_ROPE)),
        ("qwen2", sharper_attention, dict(rope_parameters=LINEAR_ROPE)),
        ("llama", random_biases, dict(attention_bias=True)),
    ],
    ids=["llama-llama3-rope", "llama-linear-rope", "qwen2-linear-rope", "llama-attention-biases"],
)
def test_llama_cpp_computes_the_logits_of_rope_scaling_and_attention_biases(
    name, weights, config, models, tmp_path, austen_paragraphs, request
):
    """Each config change moves PyTorch's logits far past the f32 bound (a file without it fails), and llama.cpp
    computes the changed logits within the bound: Llama 3's scaling (rope_freqs), linear scaling (rope.scaling.*),
    and Llama's query and key biases in llama.cpp's rotary order."""
    paragraphs = austen_paragraphs[1000:1003]
    unchanged = variant(models[name], tmp_path / "unchanged", weights)  # the same weights, without the change
    folder = variant(models[name], tmp_path / "variant", weights, **config)
    ours, theirs = teacher_forced(folder, export_gguf(folder, tmp_path / "variant.gguf", "f32"), paragraphs)
    change, difference = np.abs(ours - pytorch_logits(unchanged, paragraphs)).max(), np.abs(ours - theirs).max()
    print(f"{request.node.callspec.id} f32: {len(ours)} positions, PyTorch's logits move by up to {change:.2f}; "
          f"largest logit difference from llama.cpp's {difference:.2e}")  # fmt: skip
    assert change > 50 * F32_BOUND and difference <= F32_BOUND


@pytest.mark.parametrize(
    "name, rope",
    [
        ("llama", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)),
        ("llama", dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
        ("llama", dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                       original_max_position_embeddings=64)),
        ("qwen2", LLAMA3_ROPE),  # llama.cpp's Qwen2 reads no rope_freqs
    ],
    ids=["yarn", "dynamic", "longrope", "qwen2-llama3"],
)  # fmt: skip
def test_other_rope_scalings_are_refused_in_one_line(name, rope, models, tmp_path, capsys):
    folder = variant(models[name], tmp_path / "variant", rope_parameters=rope)
    capsys.readouterr()  # the fixtures' own output is not the script's
    line = run_in_process(export.main, ["--model-path", str(folder), "--gguf", str(tmp_path / "a.gguf")], capsys)
    assert f"--gguf: rope scaling {rope['rope_type']!r} is not supported by this export; supported: linear, " in line
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "rope_scaling, found",
    [({"type": "linear", "factor": 4.0}, "linear"), ({"type": "default"}, None), (None, None), ({"type": "yarn"}, "")],
)
def test_older_configs_rope_scaling_is_read(rope_scaling, found):
    """Configs older than transformers 5 keep the scaling in `rope_scaling` (its type as `type`), rope_theta
    beside it; a type this export does not write is refused there too ("")."""
    from austen_gpt.cli import UserError
    from austen_gpt.models import gguf_file

    config = SimpleNamespace(rope_scaling=rope_scaling, rope_theta=500000.0)
    assert gguf_file.rope_theta(config) == 500000.0
    if found == "":
        with pytest.raises(UserError, match="rope scaling 'yarn' is not supported"):
            gguf_file.rope_scaling(config, "LLAMA")
    else:
        assert gguf_file.rope_scaling(config, "LLAMA") == found


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model-path", "MODEL", "--gguf", "OUT/a.txt"], "name the file OUT.gguf"),
        (["--model-path", "MODEL", "--gguf", "OUT/nowhere/a.gguf"], "does not exist"),
        (["--model-path", "MODEL", "--gguf", "OUT/kept.gguf"], "already exists; pass --overwrite"),
        (["--model-path", "NEOX", "--gguf", "OUT/a.gguf"], "GGUF export supports gpt2, llama, qwen2"),
        (["--model-path", "DAMAGED", "--gguf", "OUT/a.gguf"], "is damaged"),
        (["--gguf", "OUT/a.gguf"], "give --adapter FOLDER"),
        (["--model-path", "MODEL", "--gguf", "OUT/a.gguf", "--gguf-type", "q3_k"], "invalid choice: 'q3_k'"),
    ],
)
def test_bad_exports_get_one_line_and_keep_what_exists(flags, message, models, tmp_path, capsys, austen_paragraphs):
    kept = tmp_path / "kept.gguf"
    kept.write_text("an earlier export")
    neox = build_family(tmp_path / "neox", FAMILIES["gpt_neox"], austen_paragraphs[:200])
    damaged = tmp_path / "damaged"
    shutil.copytree(models["gpt2"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    names = {"MODEL": str(models["gpt2"]), "NEOX": str(neox), "DAMAGED": str(damaged), "OUT": str(tmp_path)}
    argv = [names.get(flag, flag) for flag in flags]
    argv = [next((arg.replace(k, v) for k, v in names.items() if arg.startswith(k + "/")), arg) for arg in argv]
    capsys.readouterr()  # the fixtures' own output (progress bars) is not the script's
    assert message in run_in_process(export.main, argv, capsys)
    assert kept.read_text() == "an earlier export" and not list(tmp_path.glob("*.partial"))


def test_q4_k_m_needs_llama_cpps_quantizer_or_is_refused(models, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where llama-cpp-python is not installed
    argv = ["--model-path", str(models["gpt2"]), "--gguf", str(tmp_path / "q.gguf"), "--gguf-type", "q4_k_m"]
    assert "needs llama.cpp's quantizer: pip install llama-cpp-python" in run_in_process(export.main, argv, capsys)


@pytest.mark.parametrize(
    "split, name",
    [("LLAMA3_SPLIT", "llama-bpe"), ("QWEN2_SPLIT", "qwen2"), (r"\s+", None)],
)
def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it_or_refused(split, name, austen_paragraphs):
    """Llama 3's and Qwen2's splits (a regex, then bytes) map to their llama.cpp names; any other is refused."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from austen_gpt.cli import UserError
    from austen_gpt.data.bpe import train_bpe
    from austen_gpt.models import gguf_file

    backend = train_bpe(austen_paragraphs[:100], 300)
    pattern = getattr(gguf_file, split, split)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    if name:
        assert gguf_file.pre_tokenizer(tokenizer) == name
    else:
        with pytest.raises(UserError, match="llama.cpp would split this tokenizer's text another way"):
            gguf_file.pre_tokenizer(tokenizer)


@pytest.mark.slow
def test_an_adapter_folder_is_merged_first(models, tmp_path, austen_paragraphs):
    """--adapter with --gguf: the adapters (nonzero, so the merge shows) merged into their base in fp32, then
    written: llama.cpp computes the adapter model's logits."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.models.lora import add_lora
    from austen_gpt.sampling.generation import prompt_ids

    llama = llama_cpp()
    torch.manual_seed(1)
    model = add_lora(AutoModelForCausalLM.from_pretrained(models["gpt2"]), 4, 8, 0.0, ["c_attn"], False, "-")
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    model.peft_config["default"].base_model_name_or_path = str(models["gpt2"])
    model.save_pretrained(tmp_path / "adapters")
    tokenizer = load_tokenizer(str(models["gpt2"]))
    tokenizer.save_pretrained(tmp_path / "adapters")
    out = tmp_path / "merged.gguf"
    assert export.main(["--adapter", str(tmp_path / "adapters"), "--gguf", str(out), "--gguf-type", "f32"]) == 0
    ids = prompt_ids(tokenizer, austen_paragraphs[1000])[:100]
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids])).logits[0].numpy()
        base = AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()(torch.tensor([ids])).logits[0].numpy()
    llm = llama.Llama(str(out), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    llm.close()
    assert np.abs(ours - theirs).max() <= 1e-3 < np.abs(ours - base).max()  # the adapters' change, in the file
