"""Flags, bad input (one line, exit 2, nothing overwritten) and inference.py."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from conftest import REPO, assert_user_error, run_in_process, run_script

import inference
from austen_gpt.cli import UserError
from austen_gpt.training.flags import parse_args
from train import main

# ---- flags --------------------------------------------------------------------------------------------


def test_seed_defaults_are_kept():
    args = parse_args([])
    assert (args.data, args.batch_size, args.max_input_length, args.train_size, args.max_output_length) == (
        "austen_dataset.pkl",
        8,
        100,
        0.9,
        200,
    )
    assert (args.top_k, args.top_p, args.model, args.qlora, args.rank_lora, args.alpha_lora, args.targets_lora) == (
        50,
        0.95,
        "gpt2",
        False,
        64,
        16,
        ["auto"],  # c_attn on GPT-2, the seed's default (tests/test_lora.py)
    )
    assert (args.warmup_steps, args.sample_every, args.epochs, args.lr, args.eps) == (100, 100, 4, 5e-4, 1e-8)
    assert (args.check_dir, args.resume_from, args.save_interval, args.resume, args.output_dir) == (
        "Checkpoints",
        None,
        1,
        False,
        "GPT2_fine_tuned_Austen",
    )
    args = inference.parse_args([])
    assert (args.max_length, args.top_p, args.n_return_seqs, args.top_k) == (300, 0.95, 3, 50)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--qlora"], True),
        (["--qlora", "True"], True),
        (["--qlora", "False"], False),
        (["--qlora", "false"], False),
        (["--qlora", "1"], True),
    ],
)
def test_boolean_flags_accept_both_spellings(argv, expected):
    assert parse_args(argv).qlora is expected


def test_the_original_projects_spellings_still_work():
    argv = ["--rank_lora", "8", "--max_input_length=32", "--check_dir", "C", "--load_checkpoint", "True"]
    args = parse_args([*argv, "--restore_file", "Epoch_1"])
    assert (args.rank_lora, args.max_input_length, args.check_dir, args.resume_from) == (8, 32, "C", "Epoch_1")
    assert not hasattr(args, "restore_file") and not hasattr(args, "load_checkpoint")  # one name inside: resume_from
    assert parse_args(["--resume-from", "Step_3"]).resume_from == "Step_3"
    args = inference.parse_args(["--top_k", "5", "--top_p", "0.5", "--max-new-tokens", "9", "--n_return_seqs", "2"])
    assert (args.top_k, args.top_p, args.max_new_tokens, args.n_return_seqs) == (5, 0.5, 9, 2)
    args = inference.parse_args(["--model_path", "adapters", "--qlora", "True", "--base_model", "gpt2-medium"])
    assert (args.model_path, args.load_in_4bit, args.base_model) == ("adapters", True, "gpt2-medium")
    assert not inference.parse_args(["--qlora", "False"]).load_in_4bit


def test_bad_boolean_is_a_one_line_error(capsys):
    assert "expected True or False, got 'maybe'" in run_in_process(main, ["--qlora", "maybe"], capsys)


def test_help_does_not_import_torch():
    """`--help` and argument errors must answer at once: the scripts import torch only after parsing."""
    code = "import sys, train, inference; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ---- bad input to train.py ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr=-1e-3"], "--lr must be positive"),
        (["--epochs", "two"], "argument --epochs: invalid int value"),
        (["--train-size", "1.0"], "--train-size must be between 0 and 1"),
        (["--train-size", "0"], "--train-size must be between 0 and 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k must be 0 (off) or more"),
        (["--load-checkpoint", "True"], "--load-checkpoint True needs --restore-file"),
        (["--restore-file", "Epoch_1"], "needs --load-checkpoint True"),
        (["--resume", "--resume-from", "Epoch_1"], "--resume takes the newest checkpoint, --resume-from one"),
        (["--restore-file", "E", "--load-checkpoint", "--resume-from", "E"], "name the same thing: use one"),
    ],
)
def test_bad_flags(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in run_in_process(main, argv, capsys)


def test_bad_data_through_train(tmp_path, capsys, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert "broken.jsonl line 2 is not valid JSON" in run_in_process(
        main, ["--data", "broken.jsonl", "--model", str(tiny_model_dir)], capsys
    )
    assert "does not exist" in run_in_process(main, ["--data", "nope.pkl", "--model", str(tiny_model_dir)], capsys)
    (tmp_path / "rows.jsonl").write_text('{"body": "fine"}\n')
    assert "record 1 has no 'title' string field; its fields are body" in run_in_process(
        main, ["--data", "rows.jsonl", "--text-column", "title", "--model", str(tiny_model_dir)], capsys
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert "'nobody/no-such-novels' is neither a local path nor a dataset in the Hugging Face cache" in run_in_process(
        main, ["--data", "nobody/no-such-novels", "--data-config", "en", "--model", str(tiny_model_dir)], capsys
    )
    (tmp_path / "three.txt").write_text("a\n\nb\n\nc\n")
    assert "split empty" in run_in_process(
        main, ["--data", "three.txt", "--train-size", "0.9", "--model", str(tiny_model_dir)], capsys
    )


def test_sample_prompt_longer_than_the_samples(tmp_path, capsys, tiny_model_dir, small_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(small_data),
        "--sample-prompts",
        "Emma was here",
        "--max-output-length",
        "3",
    ]
    assert "leaves no room within --max-output-length" in run_in_process(main, argv, capsys)


def test_refused_pickle_through_the_real_cli(tmp_path):
    marker = tmp_path / "pwned"
    from conftest import Payload

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Payload(str(marker))]))
    result = run_script("train.py", "--data", "evil.pkl", cwd=tmp_path)
    assert_user_error(result, "refusing to unpickle", "convert it to .jsonl or .csv")
    assert not marker.exists()


def test_missing_or_incomplete_restore_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resume = ["--restore-file", "Epoch_3", "--load-checkpoint", "True"]
    assert "checkpoint Epoch_3 not found in Checkpoints" in run_in_process(main, resume, capsys)
    (tmp_path / "Checkpoints/Epoch_3").mkdir(parents=True)
    (tmp_path / "Checkpoints/Epoch_3/config.json").write_text("{}")
    assert "Epoch_3 is not a complete checkpoint" in run_in_process(main, resume, capsys)


def test_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.bin").write_text("precious")
    assert "--output-dir model.bin is a file" in run_in_process(main, ["--output-dir", "model.bin"], capsys)
    assert (tmp_path / "model.bin").read_text() == "precious"


def test_existing_outputs_are_never_overwritten(tmp_path, capsys, monkeypatch, tiny_model_dir, small_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/model.safetensors").write_text("an earlier model")
    assert "already holds files" in run_in_process(main, ["--output-dir", "out"], capsys)
    (tmp_path / "Checkpoints/Epoch_1").mkdir(parents=True)
    (tmp_path / "Checkpoints/Epoch_1/model.safetensors").write_text("an earlier checkpoint")
    (tmp_path / "Checkpoints/Epoch_1/training_state.pt").write_text("")
    (tmp_path / "Checkpoints/Epoch_1/trainer_state.json").write_text('{"global_step": 10, "epoch": 1}')
    argv = ["--model", str(tiny_model_dir), "--data", str(small_data), "--output-dir", "new"]
    assert "Checkpoints holds checkpoints (Epoch_1) from another run; continue with --resume" in run_in_process(
        main, argv, capsys
    )
    assert (tmp_path / "out/model.safetensors").read_text() == "an earlier model"
    assert (tmp_path / "Checkpoints/Epoch_1/model.safetensors").read_text() == "an earlier checkpoint"


def test_folder_without_weights_needs_from_scratch(tmp_path, capsys, tiny_config_dir, small_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = run_in_process(main, ["--model", str(tiny_config_dir), "--data", str(small_data)], capsys)
    assert "has a config but no weights; add --from-scratch" in message


def test_unreachable_hub_model(tmp_path, capsys, small_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = run_in_process(main, ["--model", "no-such-org/no-such-model", "--data", str(small_data)], capsys)
    assert (
        "nor in the Hugging Face cache, and the Hub is unreachable" in message
        and "--model configs/austen-tiny --from-scratch" in message
    )


# ---- inference.py ------------------------------------------------------------------------------------


def test_inference_prints_numbered_samples_reproducibly(tiny_model_dir, capsys):
    argv = [
        "--model_path",
        str(tiny_model_dir),
        "--prompt",
        "Emma was",
        "--n_return_seqs",
        "3",
        "--max-new-tokens",
        "12",
    ]
    assert inference.main([*argv, "--seed", "1"]) == 0
    first = capsys.readouterr()
    assert first.err.startswith("settings: from the flags") and len(first.err.splitlines()) == 1  # no run record
    samples = [line for line in first.out.splitlines() if line]
    assert [s.split(". ", 1)[0] for s in samples] == ["1", "2", "3"]
    assert all(s.split(". ", 1)[1].startswith("Emma was") for s in samples)
    inference.main([*argv, "--seed", "1"])
    assert capsys.readouterr().out == first.out
    inference.main([*argv, "--seed", "2"])
    assert capsys.readouterr().out != first.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top_p", "0"], "--top-p must be in (0, 1]"),
        (["--top-k", "-2"], "--top-k must be 0 (off) or more"),
        (["--n-return-seqs", "0"], "--n-return-seqs must be at least 1"),
        (["--temperature", "0"], "--temperature must be positive"),
    ],
)
def test_inference_bad_flags(argv, message, capsys):
    assert message in run_in_process(inference.main, argv, capsys)


def test_inference_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/readme.txt").write_text("hello")
    assert_user_error(
        run_script("inference.py", "--model_path", "notes", cwd=tmp_path),
        "notes is not a model folder (no config.json)",
    )
    assert_user_error(
        run_script("inference.py", "--model_path", "./missing", cwd=tmp_path), "model folder ./missing does not exist"
    )


# ---- run files ----------------------------------------------------------------------------------------


def test_a_run_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "model: configs/austen-tiny\nfrom-scratch: true\nepochs: 2\nlr: 3.0e-3\nsample_prompts: ['', A]\n"
    )
    args = parse_args(["--config", str(run_file), "--epochs", "5"])
    assert (args.model, args.from_scratch, args.epochs, args.lr, args.sample_prompts) == (
        "configs/austen-tiny",
        True,
        5,
        0.003,
        ["", "A"],
    )
    same = "--epochs 2 --max-input-length 128 --batch-size 16"
    for run_file, spelled_out in [
        (
            "quickstart.yaml",
            f"--model configs/base-tiny {same} --lr 1e-3 --check-dir Checkpoints/tiny --output-dir models/austen-tiny",
        ),
        (
            "quickstart-scratch.yaml",
            f"--model configs/austen-tiny --from-scratch {same} --lr 3e-3 --check-dir Checkpoints/tiny-scratch "
            "--output-dir models/austen-tiny-scratch",
        ),
        (
            "self-play.yaml",
            "--model models/austen-tiny --self-play-rounds 4 --batch-size 16 --lr 1e-4 --warmup-steps 10 "
            "--sample-every 0 --check-dir Checkpoints/self-play --output-dir models/austen-tiny-self-play",
        ),
    ]:
        from_file = vars(parse_args(["--config", str(REPO / "configs" / run_file)]))
        assert {**from_file, "config": None} == vars(parse_args(spelled_out.split())), run_file


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("learning_rate: 1\n", ["unknown key 'learning_rate'"]),
        ("lr: fast\n", ["lr: 'fast' is not a float"]),
        ("epochs: [1, 2]\n", ["epochs takes one value"]),
        ("precision: fp64\n", ["precision: 'fp64' is not one of"]),
        ("from-scratch: maybe\n", ["from-scratch: 'maybe' is not a boolean"]),
        ("- just\n- a list\n", ["expected `flag: value` lines"]),
        ("a: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_a_bad_run_file_is_one_line_naming_the_key(tmp_path, capsys, content, fragments):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(content)
    line = run_in_process(main, ["--config", str(run_file)], capsys)
    assert all(fragment in line for fragment in [str(run_file), *fragments]), line


def test_the_model_config_flag_keeps_its_earlier_spelling():
    """bench.py and `dataset.py tokenizer` called it --config; a path that is not a .yaml run file reads as
    --model-config."""
    from austen_gpt.cli import ArgumentParser, add_flag

    parser = ArgumentParser(run_files=True)
    add_flag(parser, "--model-config", default="gpt2")
    assert parser.parse_args(["--config", "gpt2-tiny"]).model_config == "gpt2-tiny"
    config_json = "configs/gpt2-tiny/config.json"
    assert parser.parse_args([f"--config={config_json}"]).model_config == config_json


def test_the_settings_a_command_line_or_its_run_file_gives_are_told_from_defaults(tmp_path):
    from style_report import build_parser

    run_file = tmp_path / "report.yaml"
    run_file.write_text("train-size: 0.8\n")
    given = build_parser().given_dests(["--models", "m", "--config", str(run_file), "--split_seed", "3"])
    assert given == {"models", "config", "train_size", "split_seed"}


# ---- typed settings ------------------------------------------------------------------------------------


def test_the_flags_defaults_are_the_settings_defaults():
    """One place for every default: train.py's flags read theirs from TrainSettings, the report's from
    ReportSettings, so a notebook's settings and a bare command line train and score alike."""
    from austen_gpt.settings import from_flags
    from austen_gpt.style.settings import ReportSettings
    from austen_gpt.training.settings import TrainSettings
    from style_report import parse_args as report_args
    from style_report import report_settings

    assert from_flags(TrainSettings, parse_args([])) == TrainSettings()
    assert report_settings(report_args([])) == ReportSettings()


def test_train_runs_from_settings_without_a_command_line(tmp_path, tiny_config_dir, small_data, monkeypatch):
    """A notebook's run: settings objects, no argv; it writes the model and a run file that repeats it."""
    from austen_gpt.settings import DataSettings, ModelSettings, flat_settings
    from austen_gpt.training.loop import train
    from austen_gpt.training.settings import (
        CheckpointSettings,
        OptimizationSettings,
        TrainingSamplesSettings,
        TrainSettings,
        ValidationSettings,
    )

    monkeypatch.chdir(tmp_path)
    settings = TrainSettings(
        data=DataSettings(data=str(small_data), max_input_length=32, data_cache=""),
        model=ModelSettings(str(tiny_config_dir), from_scratch=True),
        optimization=OptimizationSettings(epochs=1, batch_size=16, precision="fp32", warmup_steps=0, lr=3e-3),
        samples=TrainingSamplesSettings(sample_every=0),
        validation=ValidationSettings(report_to=["none"]),
        checkpoints=CheckpointSettings(check_dir="run", output_dir="out"),
    )
    assert train(settings) == 0
    assert (tmp_path / "out/model.safetensors").is_file()
    again = parse_args(["--config", str(tmp_path / "run/logs/run.yaml")])
    assert {**vars(again), "config": None} == {**vars(parse_args([])), **flat_settings(settings), "config": None}
    with pytest.raises(UserError, match="--batch-size must be at least 1"):  # checked as the flags are
        train(TrainSettings(optimization=OptimizationSettings(batch_size=0)))
