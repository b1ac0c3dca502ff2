"""Few-shot prompts: excerpts from the training split only, seeded, fitting the context, in a chat model's
template with the prompt prefilled (austen_gpt/sampling/few_shot.py)."""

from __future__ import annotations

import pytest
from conftest import CHATML

from austen_gpt.cli import UserError
from austen_gpt.data.paragraphs import split_paragraphs
from austen_gpt.sampling import few_shot


@pytest.fixture
def chat_tokenizer(tokenizer):
    """The GPT-2 tokenizer given ChatML's turn tokens and template, as Qwen2.5's instruct models have them."""
    chat = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chat.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    return chat


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_the_seed_picks_the_excerpts_from_the_training_split_only(tokenizer, austen_paragraphs):
    train, held_out = split_paragraphs(austen_paragraphs[:400], 0.9, seed=42)
    built = few_shot.build_prompt(tokenizer, train, "Emma", k=3, seed=1, context=1024, new_tokens=100)
    again = few_shot.build_prompt(tokenizer, train, "Emma", k=3, seed=1, context=1024, new_tokens=100)
    other = few_shot.build_prompt(tokenizer, train, "Emma", k=3, seed=2, context=1024, new_tokens=100)
    assert built == again and built.passages != other.passages
    assert all(train[i].startswith(excerpt) for i, excerpt in zip(built.passages, built.excerpts, strict=True))
    assert not any(held.startswith(excerpt) for excerpt in built.excerpts for held in held_out)
    assert built.text == "\n\n".join([*built.excerpts, "Emma"])  # a base model: plain paragraphs, then the prompt


def test_prompt_and_new_tokens_fit_a_256_token_context_with_excerpts_cut_at_sentence_ends(tokenizer, austen_paragraphs):
    long = [p for p in austen_paragraphs if tokens(tokenizer, p) > 200]  # each must be cut
    built = few_shot.build_prompt(tokenizer, long, "It was a fine morning", k=3, seed=5, context=256, new_tokens=100)
    assert tokens(tokenizer, built.text) + 1 + 100 <= 256  # + the start token sampling puts first
    assert len(built.excerpts) == 3 and all(excerpt.endswith((".", "!", "?", '"')) for excerpt in built.excerpts)
    assert all(len(excerpt.split()) >= 10 for excerpt in built.excerpts)  # whole sentences, not scraps


def test_a_chat_model_gets_its_template_with_the_instruction_excerpts_and_the_prompt_prefilled(
    chat_tokenizer, austen_paragraphs
):
    instruction = few_shot.default_instruction(few_shot.DEFAULT_AUTHOR)
    built = few_shot.build_prompt(
        chat_tokenizer,
        austen_paragraphs[:50],
        "Emma",
        k=2,
        seed=3,
        context=1024,
        new_tokens=100,
        instruction=instruction,
    )
    assert built.text.startswith("<|im_start|>system\n" + instruction + "<|im_end|>")
    assert all(excerpt in built.text for excerpt in built.excerpts)
    assert built.text.endswith("<|im_start|>assistant\nEmma")  # the turn left open: the model continues
    eot = chat_tokenizer.get_vocab()["<|im_end|>"]
    assert few_shot.turn_end_id(chat_tokenizer) == eot and tokens(chat_tokenizer, built.text) + 101 <= 1024


@pytest.mark.parametrize(
    "k, new_tokens, message",
    [
        (-1, 100, "--few-shot -1: the number of excerpts must be 0 or more"),
        (51, 100, "the training split has only 50 passages"),
        (10, 100, "leaves each excerpt 13 of the model's 256 context tokens, under 32; --few-shot 4 or fewer$"),
        (3, 170, "--few-shot 2 or fewer or --max-new-tokens 152 or fewer"),
    ],
)
def test_bad_requests_get_one_line(tokenizer, austen_paragraphs, k, new_tokens, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        few_shot.build_prompt(
            tokenizer, austen_paragraphs[:50], "Emma", k=k, seed=0, context=256, new_tokens=new_tokens
        )


def test_a_template_without_system_messages_gets_the_instruction_from_the_user(chat_tokenizer, austen_paragraphs):
    refuses = "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    chat_tokenizer.chat_template = CHATML.replace("{% for m in messages %}", "{% for m in messages %}" + refuses)
    built = few_shot.build_prompt(
        chat_tokenizer, austen_paragraphs[:50], "Emma", k=1, seed=0, context=1024, new_tokens=10, instruction="Write."
    )
    assert built.text.startswith("<|im_start|>user\nWrite.") and built.text.endswith("assistant\nEmma")
    chat_tokenizer.chat_template = "{{ raise_exception('broken template') }}{{ messages[-1]['content'] }}"
    with pytest.raises(UserError, match="chat template cannot render a few-shot prompt: broken template"):
        few_shot.build_prompt(chat_tokenizer, austen_paragraphs[:50], "Emma", k=1, seed=0, context=1024, new_tokens=10)


def test_a_base_model_continues_the_prompt_after_the_excerpts_reproducibly(tiny_model_dir, austen_paragraphs):
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.generation import context_length
    from austen_gpt.settings import SamplingSettings

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))
    settings = SamplingSettings(max_new_tokens=30, paragraphs=1, repetition_penalty=1.3)
    built = few_shot.build_prompt(tokenizer, austen_paragraphs[:100], "Emma", 2, 7, context_length(model), 30)
    texts = few_shot.sample(model, tokenizer, built, "Emma", 2, settings, seed=7)
    assert texts == few_shot.sample(model, tokenizer, built, "Emma", 2, settings, seed=7)
    assert all(text.startswith("Emma") for text in texts) and texts[0] != texts[1]
    assert not any(excerpt[:40] in text for excerpt in built.excerpts for text in texts)  # only what follows


def fixed_choice_model(tokenizer, probabilities: dict[int, float]):
    """A real GPT-2 whose next token ignores its input: its last layer norm outputs a constant (weight 0, bias
    set), so every step draws from `probabilities` (token id -> probability); any other token has ~e^-28."""
    import math

    import torch
    from conftest import tiny_config
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(vocab_size=len(tokenizer), n_positions=256, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.lm_head.weight.zero_()
        for dimension, (token, probability) in enumerate(probabilities.items()):
            model.lm_head.weight[token, dimension] = 1.0
            model.transformer.ln_f.bias[dimension] = math.log(probability) + 30
    return model


def chat_samples(chat_tokenizer, austen_paragraphs, probabilities, **settings) -> list[str]:
    from austen_gpt.settings import SamplingSettings

    model = fixed_choice_model(chat_tokenizer, probabilities)
    built = few_shot.build_prompt(chat_tokenizer, austen_paragraphs[:50], "Emma", 2, 0, 256, 60, "Write.")
    return few_shot.sample(model, chat_tokenizer, built, "Emma", 16, SamplingSettings(**settings), seed=1)


def test_a_chat_answer_stops_at_the_end_of_its_turn(chat_tokenizer, austen_paragraphs):
    the, turn_end = chat_tokenizer(" the")["input_ids"][0], chat_tokenizer.get_vocab()["<|im_end|>"]
    # half the draws end the turn: 16 answers of 60 tokens would each run past it ~1e-18 of the time
    texts = chat_samples(
        chat_tokenizer, austen_paragraphs, {the: 0.5, turn_end: 0.5}, max_new_tokens=60, paragraphs=None
    )
    lengths = [len(text.split()) - 1 for text in texts]  # " the"s after "Emma"
    assert all(text == "Emma" + " the" * n for text, n in zip(texts, lengths, strict=True)), texts
    assert max(lengths) < 60 and len(set(lengths)) > 1  # each stopped at its own end of turn, none ran on


@pytest.mark.parametrize("paragraphs", [1, 2, 3])
def test_paragraphs_counts_the_paragraphs_of_a_chat_answer(paragraphs, chat_tokenizer, austen_paragraphs):
    import re

    the, newline = chat_tokenizer(" the")["input_ids"][0], chat_tokenizer("\n")["input_ids"][0]
    choices = {the: 0.6, newline: 0.4}  # no end of turn: only the paragraph count can stop them early
    texts = chat_samples(chat_tokenizer, austen_paragraphs, choices, max_new_tokens=60, paragraphs=paragraphs)
    assert all(len(re.split(r"\n\s*\n", text)) == paragraphs for text in texts), texts  # the prompt's is the first
    unbounded = chat_samples(chat_tokenizer, austen_paragraphs, choices, max_new_tokens=60, paragraphs=None)
    counts = [len(re.split(r"\n\s*\n", text)) for text in unbounded]  # without --paragraphs: on past them
    assert sum(counts) / len(counts) > 4 and any(count > 3 for count in counts), counts


@pytest.mark.slow
def test_inference_few_shot_samples_are_recorded_and_drawn_again_by_their_command(tiny_model_dir, small_data, tmp_path):
    import json
    import shlex

    from conftest import run_script

    def draw(*argv: str, out: str) -> list[dict]:
        result = run_script("inference.py", *argv, "--output", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]

    base = ["--model-path", str(tiny_model_dir), "--data", str(small_data), "--prompt", "Emma", "--few-shot", "2"]
    first = draw(*base, "--seed", "3", "--max-new-tokens", "20", "--n-return-seqs", "2", out="a.jsonl")
    assert len(first) == 2 and all(r["text"].startswith("Emma") for r in first)
    few = first[0]["few_shot"]
    assert few["k"] == 2 and len(few["passages"]) == 2 and few["prompt_text"].endswith("\n\nEmma")
    again = draw(*shlex.split(first[0]["command"])[2:], out="b.jsonl")  # the recorded command
    assert [r["text"] for r in again] == [r["text"] for r in first] and again[0]["few_shot"] == few
    other = draw(*base, "--seed", "4", "--max-new-tokens", "20", out="c.jsonl")
    assert other[0]["few_shot"]["passages"] != few["passages"]  # another seed, other excerpts


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--few-shot", "-1"], "--few-shot must be 0 or more excerpts"),
        (["--few-shot", "500"], "--few-shot 500: the training split has only 100 passages"),
    ],
)
def test_inference_few_shot_bad_requests(extra, message, tiny_model_dir, small_data, capsys):
    from conftest import run_in_process

    import inference

    line = run_in_process(
        inference.main, ["--model-path", str(tiny_model_dir), "--data", str(small_data), *extra], capsys
    )
    assert message in line


def test_a_chat_model_on_another_authors_data_needs_author_and_a_base_model_ignores_instruction(
    tiny_model_dir, small_data, tmp_path, capsys
):
    import shutil

    from conftest import run_in_process

    import inference
    from austen_gpt.models.loading import load_tokenizer

    chat_model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat_model)
    tokenizer = load_tokenizer(str(chat_model))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(chat_model)
    line = run_in_process(
        inference.main, ["--model-path", str(chat_model), "--data", str(small_data), "--few-shot", "1"], capsys
    )
    assert "--few-shot on a chat model needs --author" in line
    argv = [
        "--model-path",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--few-shot",
        "1",
        "--instruction",
        "Write.",
    ]
    assert inference.main([*argv, "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert "warning: --instruction is ignored" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interactive_few_shot_session_on_a_chat_model(qwen_chat_dir, small_data, tmp_path):
    """Each prompt after its own excerpts in the template; one that cannot fit is refused and the session goes
    on; the kept record's command draws the same answers again outside the session."""
    import json
    import shlex

    from conftest import run_script

    lines = ["Emma was", ":max-new-tokens 100000", "Harriet", ":max-new-tokens 12", ":n 2", "Mr. Knightley", ":quit"]
    argv = ["--interactive", "--model-path", str(qwen_chat_dir), "--data", str(small_data), "--few-shot", "2"]
    argv += ["--author", "Jane Austen"]
    argv += ["--max-new-tokens", "10", "--n-return-seqs", "1", "--seed", "5", "--output", "kept.jsonl"]
    result = run_script("inference.py", *argv, cwd=tmp_path, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "error: --few-shot 2 with 100000 new tokens leaves each excerpt" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in records] == [
        ("Emma was", 1),
        ("Mr. Knightley", 1),
        ("Mr. Knightley", 2),
    ]
    assert records[0]["text"] in result.stdout and "<|im_end|>" not in result.stdout  # streamed, as kept
    few = records[1]["few_shot"]
    assert few["k"] == 2 and few["prompt_text"].startswith("<|im_start|>system\nYou are a novelist writing in")
    assert few["prompt_text"].endswith("<|im_start|>assistant\nMr. Knightley")
    again = run_script("inference.py", *shlex.split(records[1]["command"])[2:], "--output", "b.jsonl", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    redrawn = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["text"] for r in redrawn] == [r["text"] for r in records[1:]] and redrawn[0]["few_shot"] == few


def test_few_shot_prompts_file_on_an_adapter_whose_base_has_no_template_gets_a_base_models_prompt(
    tiny_model_dir, tokenizer, small_data, tmp_path
):
    import json

    from transformers import AutoModelForCausalLM

    import inference
    from austen_gpt.models.lora import add_lora

    adapters = tmp_path / "adapters"
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["c_attn"], False, "-")
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    model.save_pretrained(adapters)
    tokenizer.save_pretrained(adapters)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Emma\n# a comment\nIt was\n")
    argv = ["--model-path", str(adapters), "--data", str(small_data), "--few-shot", "2", "--prompts-file", str(prompts)]
    out = tmp_path / "kept.jsonl"
    assert inference.main([*argv, "--max-new-tokens", "6", "--seed", "2", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Emma"] * 3 + ["It was"] * 3
    shown = [r["few_shot"]["prompt_text"] for r in records]
    assert shown[0].endswith("\n\nEmma") and shown[3].endswith("\n\nIt was") and "<|im_start|>" not in shown[0]


def test_a_base_models_0_shot_row_in_the_style_report_is_its_plain_row(wide_model_dir, austen_paragraphs):
    """Few-shot rows get the model rows' prompts, sample numbers and seed: with no excerpts, a base model's
    samples are exactly the ones its plain row draws."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.generation import generate_samples
    from austen_gpt.settings import SamplingSettings
    from austen_gpt.style.report import few_shot_samples
    from austen_gpt.style.settings import ReportSettings

    model = AutoModelForCausalLM.from_pretrained(wide_model_dir).eval()
    tokenizer = load_tokenizer(str(wide_model_dir))
    settings = ReportSettings(n_samples=7, sampling=SamplingSettings(max_new_tokens=20, paragraphs=None), seed=3)
    prompts = ["Emma", "It was a truth", "Mr. Darcy"]
    plain = generate_samples(model, tokenizer, prompts, 7, settings.sampling, settings.seed)
    samples, copied = few_shot_samples(model, tokenizer, prompts, austen_paragraphs[:50], 0, None, settings)
    assert [(s["prompt"], s["text"]) for s in samples] == [(s["prompt"], s["text"]) for s in plain]
    assert copied == 0.0 and all(s["passages"] == [] for s in samples)
    shown, _ = few_shot_samples(model, tokenizer, prompts, austen_paragraphs[:50], 2, None, settings)
    assert [s["prompt"] for s in shown] == [s["prompt"] for s in plain] and shown != samples


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--few-shot", "-1"], "--few-shot takes numbers of excerpts, 0 or more"),
        (["--few-shot", "500"], "--few-shot 500: the training split has only 100 passages"),
        (["--few-shot-names", "a", "b"], "give one --few-shot-names label per --few-shot-models entry"),
        (["--chat"], "--few-shot on a chat model needs --author"),
    ],
)
def test_style_report_few_shot_bad_requests(
    extra, message, tiny_model_dir, qwen_chat_dir, small_data, tmp_path, capsys
):
    from conftest import run_in_process

    import style_report

    model = str(qwen_chat_dir if extra == ["--chat"] else tiny_model_dir)
    extra = [] if extra == ["--chat"] else extra
    argv = ["--few-shot-models", model, "--data", str(small_data), "--out", str(tmp_path / "r"), *extra]
    assert message in run_in_process(style_report.main, argv, capsys)
    assert not (tmp_path / "r").exists()


def test_the_budget_counts_each_separator_as_the_prompt_tokenizes_it():
    """Passages without sentence ends fill each share to the token, so the prompt is as long as the budget lets
    it be: the separators between the excerpts must be counted as they are tokenized in the real prompt (GPT-2
    merges the newlines of empty excerpts into fewer tokens than it gives them between words)."""
    from conftest import GPT2_TOKENIZER_DIR

    from austen_gpt.models.loading import load_tokenizer

    gpt2 = load_tokenizer(str(GPT2_TOKENIZER_DIR))
    words = ["and", "she", "said", "that", "he", "was", "not"] * 50  # a token each
    passages = [" ".join(words[i : i + 310]) for i in range(7)]
    for k in (3, 7):
        built = few_shot.build_prompt(gpt2, passages, "It was a fine morning", k, seed=0, context=1024, new_tokens=200)
        used = tokens(gpt2, built.text) + 1 + 200  # + the start token sampling puts first
        assert 1024 - k <= used <= 1024, (k, used)  # it fits, and leaves less than a token an excerpt unused


@pytest.mark.slow
def test_the_model_reads_the_whole_few_shot_prompt(austen_paragraphs):
    """K = 10 excerpts and 200 new tokens on a 1,024-token GPT-2: the model is fed every token of the prompt,
    the paragraph's start token first, however much of the context it takes (more than a window slide keeps)."""
    import torch
    from conftest import GPT2_TOKENIZER_DIR, tiny_config
    from transformers import GPT2LMHeadModel

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.settings import SamplingSettings

    gpt2 = load_tokenizer(str(GPT2_TOKENIZER_DIR))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(vocab_size=50257, n_positions=1024, bos_token_id=50256, eos_token_id=50256))
    fed: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    no_ends = str.maketrans(".!?", ",,,")  # no sentence ends: each excerpt fills its share
    passages = [" ".join(paragraph.translate(no_ends).split()[:400]) for paragraph in austen_paragraphs[:2000]]
    passages = [passage for passage in passages if tokens(gpt2, passage) > 150]
    built = few_shot.build_prompt(gpt2, passages, "It was a fine morning", 10, seed=1, context=1024, new_tokens=200)
    assert tokens(gpt2, built.text) > 800  # more than the newest 3/4 of the context a slide keeps
    settings = SamplingSettings(max_new_tokens=200, paragraphs=None)
    texts = few_shot.sample(model.eval(), gpt2, built, "It was a fine morning", 1, settings, seed=0)
    assert fed[0] == [gpt2.eos_token_id, *gpt2(built.text, add_special_tokens=False)["input_ids"]]
    assert len(fed) == 200 and texts[0].startswith("It was a fine morning")  # one call: no window slid
