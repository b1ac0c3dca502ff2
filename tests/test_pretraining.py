"""Pretraining a base on a folder of works: the recursive read, the split by whole work, --keep-out, --max-steps,
token blocks in one tensor, the recipe's run files end to end on a slice of the corpus, and their bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, run_script, script_commands, train_args
from safetensors import safe_open

from austen_gpt.cli import UserError
from austen_gpt.data.paragraphs import blank_line_paragraphs, folder_works, refuse_kept_out, split_data
from austen_gpt.data.tokens import TokenBlocks, chunk_with_overlap, tokenize_paragraphs
from austen_gpt.settings import DataSettings

SLICE = REPO / "tests/fixtures/gutenberg-slice"  # six works by three authors, one folder per author
WORKS = sorted(p.relative_to(SLICE).as_posix() for p in SLICE.rglob("*.txt"))


def by_work(train_size: float = 0.7, seed: int = 42, data: Path = SLICE) -> DataSettings:
    return DataSettings(data=str(data), split_by="work", train_size=train_size, seed=seed)


def test_a_folder_is_read_recursively_in_path_order():
    works = folder_works(SLICE)
    assert [name for name, _ in works] == WORKS and len(WORKS) == 6  # subfolders: one per author
    assert works[0][1] == blank_line_paragraphs((SLICE / WORKS[0]).read_text())


def test_validation_holds_out_whole_works_from_the_seed():
    split = split_data(by_work())
    assert sorted(split.train_works + split.val_works) == WORKS and split.val_works and split.train_works
    assert not set(split.train_works) & set(split.val_works)
    held = [p for name in split.val_works for p in blank_line_paragraphs((SLICE / name).read_text())]
    assert split.val == held  # every paragraph of a held-out work, in order, and nothing else
    assert split.train == [p for name in split.train_works for p in blank_line_paragraphs((SLICE / name).read_text())]
    assert "works (held out whole)" in split.describe()
    assert split_data(by_work()).val_works == split.val_works  # a function of the seed
    assert any(split_data(by_work(seed=s)).val_works != split.val_works for s in range(5))


def test_the_held_out_share_is_counted_in_characters():
    sizes = {name: sum(map(len, paragraphs)) for name, paragraphs in folder_works(SLICE)}
    for train_size in (0.5, 0.7, 0.9):
        split = split_data(by_work(train_size))
        held = sum(sizes[name] for name in split.val_works)
        assert held >= (1 - train_size) * sum(sizes.values())  # at least the share asked for ...
        assert held - min(sizes[name] for name in split.val_works) < (1 - train_size) * sum(
            sizes.values()
        )  # ... no more works


def test_a_split_by_work_needs_works(tmp_path):
    with pytest.raises(UserError, match="--split-by work needs --data to be a folder"):
        split_data(by_work(data=REPO / "austen_dataset.pkl"))
    (tmp_path / "only").mkdir()
    shutil.copy(SLICE / WORKS[0], tmp_path / "only")
    with pytest.raises(UserError, match="without a work among 1"):
        split_data(by_work(data=tmp_path))


def test_keep_out_refuses_shared_paragraphs_but_not_short_common_ones(tmp_path):
    work = SLICE / WORKS[2]
    refuse_kept_out([p for p in blank_line_paragraphs(work.read_text()) if len(p) < 100], [str(work)])
    with pytest.raises(UserError, match="shares .* paragraphs with --keep-out"):
        refuse_kept_out(
            split_data(DataSettings(data=str(SLICE))).train + blank_line_paragraphs(work.read_text()), [str(work)]
        )


def test_token_blocks_hold_what_lists_would_and_count_targets_as_collate_does():
    rng = random.Random(0)
    blocks = [[rng.choice([1, 2, 3, 7]) for _ in range(rng.randint(1, 9))] for _ in range(50)]
    held = TokenBlocks.from_lists(blocks)
    assert held.tolist() == blocks and held.tokens.dtype == torch.int32 and held.longest() == max(map(len, blocks))
    for unpredicted in (None, 1, 7):
        expected = [len(b) - 1 - (b[1:].count(unpredicted) if unpredicted else 0) for b in blocks]
        assert held.targets(unpredicted) == expected
    stream = [rng.randrange(100) for _ in range(1000)]
    for size in (2, 64, 999, 1000, 5000):
        assert TokenBlocks.windows(torch.tensor(stream, dtype=torch.int32), size).tolist() == chunk_with_overlap(
            stream, size
        )


# ---- the recipe: configs/base-tiny-tokenizer.yaml, then configs/pretrain-base.yaml --------------------------


def fit_tokenizer(tmp: Path, *extra: str):
    return run_script(
        "dataset.py",
        *("tokenizer", "--config", "configs/base-tiny-tokenizer.yaml", "--data", str(SLICE)),
        *("--train-size", "0.7", "--vocab-size", "512", "--out", str(tmp / "init"), *extra),
        cwd=REPO,
    )


def pretrain(tmp: Path, *extra: str):
    outputs = ["--check-dir", str(tmp / "ck"), "--output-dir", str(tmp / "out"), "--data-cache", str(tmp / "cache")]
    return run_script(
        "train.py",
        *("--config", "configs/pretrain-base.yaml", "--data", str(SLICE), "--train-size", "0.7"),
        *("--model", str(tmp / "init"), "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2"),
        *("--save-steps", "0", "--sample-every", "0", "--report-to", "none", "--precision", "fp32", *outputs, *extra),
        cwd=REPO,
    )


@pytest.mark.slow
def test_the_recipe_pretrains_end_to_end_on_a_slice_and_ends_at_max_steps(tmp_path):
    fitted = fit_tokenizer(tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert json.loads((tmp_path / "init/config.json").read_text())["vocab_size"] == 512
    run = pretrain(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    split = split_data(by_work())
    assert f"from {len(split.train_works)} / {len(split.val_works)} works (held out whole)" in run.stdout
    assert "tokens to predict" in run.stdout and "(packed)" in run.stdout
    steps = [json.loads(line) for line in (tmp_path / "ck/logs/metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == 6  # --max-steps ends it mid-epoch ...
    assert any("val_bits_per_char" in s and s["step"] == 6 for s in steps)  # ... validated ...
    assert (tmp_path / "ck/Step_6").is_dir() and (tmp_path / "out/model.safetensors").is_file()  # ... and saved
    assert len(list((tmp_path / "cache").glob("blocks-*.pt"))) == 2  # training and validation blocks, cached
    again = pretrain(tmp_path, "--resume", "--overwrite-output-dir")  # resumed at its last step: nothing more to train
    assert again.returncode == 0, again.stderr[-3000:]
    later = [json.loads(line) for line in (tmp_path / "ck/logs/metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in later) == 6


@pytest.mark.slow
def test_the_recipe_refuses_bad_input_in_one_line_writing_nothing(tmp_path):
    empty = tmp_path / "empty"
    (empty / "an_author").mkdir(parents=True)
    (empty / "an_author/notes.md").write_text("no works here\n")
    assert_user_error(fit_tokenizer(tmp_path, "--data", str(empty)), "holds no .txt files (subfolders included)")
    assert_user_error(pretrain(tmp_path, "--data", str(empty), "--model", "configs/austen-tiny"), "no .txt files")
    corpus = tmp_path / "corpus"
    shutil.copytree(SLICE, corpus)
    shutil.copy(REPO / "data/austen/persuasion.txt", corpus / "Twain_Mark")  # the fine-tuning author slipped in
    assert_user_error(
        fit_tokenizer(tmp_path, "--data", str(corpus)), "--keep-out austen_dataset.pkl", "remove it from --data"
    )
    assert_user_error(pretrain(tmp_path, "--data", str(corpus), "--model", "configs/austen-tiny"), "--keep-out")
    assert not (tmp_path / "init").exists() and not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_base_whose_tokenizer_outgrows_its_embedding_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    AutoTokenizer.from_pretrained(REPO / "configs/gpt2-tiny").save_pretrained(base)  # 50,257 tokens, 4,096 rows
    result = run_script("train.py", "--model", str(base), "--check-dir", str(tmp_path / "ck"), cwd=tmp_path)
    assert_user_error(result, "50,257 tokens but the model's embedding only 4,096 rows")
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_max_steps_at_an_epoch_end_ends_the_run_there(tmp_path, tiny_model_dir, small_data, tokenizer):
    blocks = tokenize_paragraphs(tokenizer, split_data(DataSettings(data=str(small_data))).train, 64, pack=True)
    per_epoch = -(-len(blocks) // 16)
    flags = ["--epochs", "3", "--max-steps", str(per_epoch), "--batch-size", "16", "--max-input-length", "64"]
    flags += ["--sample-every", "0", "--report-to", "none", "--precision", "fp32", "--save-interval", "2"]
    run = run_script("train.py", *train_args(tmp_path, tiny_model_dir, small_data, *flags), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{per_epoch} steps per epoch, {per_epoch} in all" in run.stdout
    assert sorted(p.name for p in (tmp_path / "Checkpoints").glob("Epoch_*")) == ["Epoch_1"]  # saved where it ends
    metrics = (tmp_path / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in metrics) == per_epoch


def test_whole_works_train_on_each_work_as_one_document_and_validate_by_paragraph():
    split = split_data(DataSettings(data=str(SLICE), split_by="work", train_size=0.7, whole_works=True))
    by_paragraph = split_data(by_work())
    works = dict(folder_works(SLICE))
    assert split.train == ["\n\n".join(works[name]) for name in by_paragraph.train_works]
    assert split.val == by_paragraph.val  # validation means the same either way
    assert split.describe().startswith(f"{len(split.train)} training works / ")
    with pytest.raises(UserError, match="add --split-by work"):
        split_data(DataSettings(data=str(SLICE), whole_works=True))


def test_a_bf16_copy_is_half_the_size(tmp_path, tiny_model_dir):
    """export.py --dtype bf16, as the recipe ships the base; that training reads such a copy back as fp32 master
    weights, tests/test_base.py checks on the shipped base itself."""
    import export

    copy = tmp_path / "bf16"
    assert export.main(["--model-path", str(tiny_model_dir), "--out", str(copy), "--dtype", "bf16"]) == 0
    full, half = (folder / "model.safetensors" for folder in (tiny_model_dir, copy))
    assert half.stat().st_size < 0.55 * full.stat().st_size
    with safe_open(half, "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_the_recipe_scripts_ask_each_step_for_what_it_has():
    """scripts/pretrain_base.sh runs for 45 minutes to 2 hours, scripts/gpu_pretrain.sh on a lent GPU: a typo in a
    late step's flags must fail here, not at its end."""
    import export
    import style_report
    from austen_gpt.training.flags import parse_args

    cpu = dict(script_commands("scripts/pretrain_base.sh"))
    assert list(cpu) == ["dataset.py", "train.py", "export.py", "scripts/base_numbers.py"]
    train = parse_args(cpu["train.py"])
    assert train.split_by == "work" and train.whole_works and train.epochs == 1 and train.data == "corpus"
    assert export.parse_args(cpu["export.py"]).dtype == "bf16"
    helped = run_script("scripts/base_numbers.py", "--help", cwd=REPO)
    assert helped.returncode == 0 and "held-out works" in helped.stdout

    gpu = script_commands("scripts/gpu_pretrain.sh")
    assert [name for name, _ in gpu] == ["train.py", "train.py", "style_report.py"]
    pretrain, fine_tune = (parse_args(arguments) for _, arguments in gpu[:2])
    assert (pretrain.split_by, pretrain.whole_works, pretrain.from_scratch) == ("work", True, True)
    assert pretrain.keep_out == train.keep_out and pretrain.train_size == train.train_size
    assert pretrain.model == "models/base-small-init" and pretrain.output_dir == "models/base-small"
    assert fine_tune.model == "models/base-small" and not fine_tune.from_scratch
    report = style_report.parse_args(gpu[2][1])
    assert report.models == ["models/base-small", "models/austen-small"] and report.few_shot == [0, 3, 10]
    small = json.loads((REPO / "configs/base-small/config.json").read_text())
    tiny = json.loads((REPO / "configs/base-tiny/config.json").read_text())
    assert (small["n_layer"], small["n_embd"], small["n_positions"]) == (12, 768, 1024)  # GPT-2 small's shape
    assert small["vocab_size"] == tiny["vocab_size"]  # the script gives it the shipped base's tokenizer
