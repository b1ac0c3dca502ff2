"""Data: the bundled Austen build, every input format, safe unpickling, splitting, tokenization, labels."""

from __future__ import annotations

import copy
import csv
import io
import json
import pickle
from pathlib import Path

import pytest
from conftest import REPO, Payload

from austen_gpt.cli import UserError
from austen_gpt.data import tokens
from austen_gpt.data.batches import EpochBatches, collate
from austen_gpt.data.paragraphs import load_paragraphs, novel_paragraphs, split_paragraphs
from austen_gpt.data.tokens import cache_key, chunk_with_overlap, encode_batch, tokenize_cached, tokenize_paragraphs
from dataset import main

# ---- the bundled dataset -----------------------------------------------------------------------------


def test_build_is_byte_identical_to_the_committed_pickle(tmp_path):
    first, second = tmp_path / "a.pkl", tmp_path / "b.pkl"
    main(["build", "--src", str(REPO / "data/austen"), "--out", str(first)])
    main(["build", "--src", str(REPO / "data/austen"), "--out", str(second)])
    assert first.read_bytes() == second.read_bytes() == (REPO / "austen_dataset.pkl").read_bytes()


def test_bundled_dataset_counts_and_cleaning():
    records = pickle.loads((REPO / "austen_dataset.pkl").read_bytes())
    assert all(set(r) == {"sentence", "novel"} and type(r["sentence"]) is str for r in records)
    assert len(records) == 9_997
    assert sum(len(r["sentence"].split()) for r in records) == 716_698
    novels = {r["novel"] for r in records}
    assert novels == {
        "Emma",
        "Mansfield Park",
        "Northanger Abbey",
        "Persuasion",
        "Pride and Prejudice",
        "Sense and Sensibility",
    }
    texts = [r["sentence"] for r in records]
    assert not any(t.upper().startswith(("CHAPTER ", "VOLUME ")) and len(t) < 16 for t in texts)
    assert not any(t.upper() in {"THE END", "FINIS"} or "A NOTE ON THE TEXT" in t for t in texts)
    assert not any("_" in t or (t.startswith("[") and t.endswith("]")) for t in texts)
    assert not any("\n" in t or "  " in t for t in texts)  # lines joined by single spaces
    first = {}
    for r in records:
        first.setdefault(r["novel"], r["sentence"])
    assert first["Pride and Prejudice"].startswith("It is a truth universally acknowledged")
    assert first["Emma"].startswith("Emma Woodhouse, handsome, clever, and rich")


def test_novel_cleaning_rules():
    text = (
        "TITLE\n\nBy Someone\n\nCHAPTER I\n\nFirst _para_\nline two.\n\n[An editor's note.]\n\n"
        "Chapter 2\n\nSecond.\n\nTHE END\n\nAfterword."
    )
    assert novel_paragraphs(text) == ["First para line two.", "Second."]


# ---- every input format ---------------------------------------------------------------------------

PARAGRAPHS = [
    "It is a truth universally acknowledged.",
    "Mr. Bennet replied that he had not.",
    "\u00a3 and \u201cquotes\u201d",
]


def write_formats(folder: Path) -> dict[str, Path]:
    paths = {
        "pkl_dicts": folder / "dicts.pkl",
        "pkl_strings": folder / "strings.pkl",
        "txt": folder / "text.txt",
        "jsonl": folder / "data.jsonl",
        "json": folder / "data.json",
        "csv": folder / "data.csv",
        "folder": folder / "novels",
    }
    paths["pkl_dicts"].write_bytes(pickle.dumps([{"sentence": p, "novel": "X"} for p in PARAGRAPHS]))
    paths["pkl_strings"].write_bytes(pickle.dumps(PARAGRAPHS))
    paths["txt"].write_text("\n\n".join(p.replace(" ", "\n", 1) for p in PARAGRAPHS) + "\n", encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS), encoding="utf-8")
    paths["json"].write_text(json.dumps([{"sentence": p} for p in PARAGRAPHS]), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, p] for i, p in enumerate(PARAGRAPHS))
    paths["folder"].mkdir()
    (paths["folder"] / "a.txt").write_text(PARAGRAPHS[0] + "\n\n" + PARAGRAPHS[1] + "\n", encoding="utf-8")
    (paths["folder"] / "b.txt").write_text(PARAGRAPHS[2] + "\n", encoding="utf-8")
    return paths


def write_columnar_formats(folder: Path) -> dict[str, Path]:
    """The same paragraphs as parquet, Arrow, saved datasets and compressed text, in a `body` column or field."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet
    import zstandard
    from datasets import Dataset, DatasetDict

    rows = {"id": list(range(len(PARAGRAPHS))), "body": PARAGRAPHS}
    paths = {kind: folder / name for kind, name in [("parquet", "d.parquet"), ("arrow", "d.arrow")]}
    paths |= {"saved": folder / "saved", "saved_dict": folder / "saved_dict", "txt.gz": folder / "t.txt.gz"}
    paths |= {"jsonl.zst": folder / "d.jsonl.zst", "csv.gz": folder / "d.csv.gz"}
    pyarrow.parquet.write_table(pa.table(rows), paths["parquet"])
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, pa.table(rows).schema) as writer:
        writer.write_table(pa.table(rows))
    Dataset.from_dict(rows).save_to_disk(str(paths["saved"]))
    DatasetDict(train=Dataset.from_dict(rows), test=Dataset.from_dict({"id": [0], "body": ["x"]})).save_to_disk(
        str(paths["saved_dict"])
    )
    paths["txt.gz"].write_bytes(gzip.compress("\n\n".join(PARAGRAPHS).encode()))
    jsonl = "".join(json.dumps({"body": p}) + "\n" for p in PARAGRAPHS).encode()
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    with io.StringIO() as text:
        csv.writer(text).writerows([["id", "body"], *([i, p] for i, p in enumerate(PARAGRAPHS))])
        paths["csv.gz"].write_bytes(gzip.compress(text.getvalue().encode()))
    return paths


@pytest.mark.parametrize("kind", ["pkl_dicts", "pkl_strings", "txt", "jsonl", "json", "csv", "folder"])
def test_every_format_gives_the_same_paragraphs(tmp_path, kind):
    assert load_paragraphs(write_formats(tmp_path)[kind]) == PARAGRAPHS


@pytest.mark.parametrize("kind", ["parquet", "arrow", "saved", "saved_dict", "txt.gz", "jsonl.zst", "csv.gz"])
def test_columnar_and_compressed_data_give_the_same_paragraphs(tmp_path, kind):
    path = write_columnar_formats(tmp_path)[kind]
    assert load_paragraphs(path, text_column="body") == PARAGRAPHS
    if kind not in ("txt.gz",):  # plain text has no columns: every other source names the ones it has
        with pytest.raises(UserError, match="'text'.*id, body|'text'.*body"):
            load_paragraphs(path)
        with pytest.raises(UserError, match="'title'"):
            load_paragraphs(path, text_column="title")


def test_tokenizer_command_reads_any_source_with_its_flags(tmp_path):
    """The data flags reach load_paragraphs: a saved DatasetDict's split and text column."""
    saved = write_columnar_formats(tmp_path)["saved_dict"]
    argv = ["tokenizer", "--data", str(saved), "--data-split", "train", "--text-column", "body"]
    assert main([*argv, "--train-size", "0.5", "--vocab-size", "300", "--out", str(tmp_path / "bpe")]) == 0
    assert json.loads((tmp_path / "bpe/config.json").read_text())["vocab_size"] <= 300


def test_a_compressed_pickle_still_goes_through_the_restricted_unpickler(tmp_path):
    import gzip

    (tmp_path / "ok.pkl.gz").write_bytes(gzip.compress(pickle.dumps(PARAGRAPHS)))
    assert load_paragraphs(tmp_path / "ok.pkl.gz") == PARAGRAPHS
    (tmp_path / "evil.pkl.gz").write_bytes(gzip.compress(pickle.dumps([Payload(str(tmp_path / "pwned"))])))
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_paragraphs(tmp_path / "evil.pkl.gz")
    assert not (tmp_path / "pwned").exists()


def test_a_saved_dataset_dict_takes_its_split(tmp_path):
    path = write_columnar_formats(tmp_path)["saved_dict"]
    assert load_paragraphs(path, text_column="body", split="test") == ["x"]
    with pytest.raises(UserError, match="has no split 'validation'; its splits are train, test"):
        load_paragraphs(path, text_column="body", split="validation")


def test_a_hub_dataset_id_goes_to_load_dataset_with_its_config_and_split(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"content": PARAGRAPHS})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_paragraphs("someone/gothic-novels", "content", "en", "train[:90%]") == PARAGRAPHS
    assert load_paragraphs("gothic", "content") == PARAGRAPHS
    assert calls == [("someone/gothic-novels", "en", "train[:90%]"), ("gothic", None, "train")]


def test_an_uncached_hub_dataset_offline_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        load_paragraphs("nobody/no-such-novels")
    message = str(error.value)
    assert "nobody/no-such-novels" in message and "\n" not in message
    assert "hf download --repo-type dataset nobody/no-such-novels" in message and "save_to_disk" in message


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"sentence": "hello"}, Payload(str(marker))]))
    with pytest.raises(UserError, match=r"refusing to unpickle .*system.*convert it to \.jsonl or \.csv"):
        load_paragraphs(path)
    assert not marker.exists()


def test_pickled_objects_of_other_classes_are_refused(tmp_path):
    path = tmp_path / "frame.pkl"
    path.write_bytes(pickle.dumps([Path("x")]))  # stands in for a pandas DataFrame: any class is refused
    with pytest.raises(UserError, match="refusing to unpickle pathlib"):
        load_paragraphs(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "does not exist"),
        ("data.xyz", b"x", "unknown extension"),
        ("data.parquet", b"x", "data.parquet is not a readable parquet file"),
        ("data.arrow", b"x", "data.arrow is not a readable arrow file"),
        ("text.txt.gz", b"x", "text.txt.gz is not a readable gz file"),
        ("text.jsonl.zst", b"x", "text.jsonl.zst is not a readable zst file"),
        ("empty.txt", b"\n\n  \n", "no non-empty paragraph"),
        ("blank.jsonl", b'{"text": "  "}\n', "no non-empty paragraph"),
        ("nofield.jsonl", b'{"body": "hi"}\n', "record 1 has no 'text' string field; its fields are body"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "line 2 is not valid JSON"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "latin1.txt is not UTF-8"),
        ("nocol.csv", b"id,body\n1,hi\n", "record 1 has no 'text' string field; its fields are id, body"),
        ("dict.json", b'{"text": "hi"}', "expected a list"),
        ("notpickle.pkl", b"plain text", "not a readable pickle"),
    ],
)
def test_bad_data_gives_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_paragraphs(path)


def test_unreadable_file_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.jsonl"
    path.write_text('{"text": "hi"}\n')

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod 000 does not stop root, who runs CI
    with pytest.raises(UserError, match="cannot read .*locked.jsonl \\(Permission denied\\)"):
        load_paragraphs(path)


def test_folder_without_txt_files_is_an_error(tmp_path):
    with pytest.raises(UserError, match="holds no .txt files"):
        load_paragraphs(tmp_path)


# ---- split -----------------------------------------------------------------------------------------------


def test_split_is_by_paragraph_seeded_and_disjoint(austen_paragraphs):
    unique = list(dict.fromkeys(austen_paragraphs))  # "Yes." occurs many times; judge by distinct texts
    train, val = split_paragraphs(unique, 0.9, seed=1)
    assert len(train) == round(0.9 * len(unique)) and sorted(train + val) == sorted(unique)
    assert not set(train) & set(val)
    assert split_paragraphs(unique, 0.9, seed=1) == (train, val)
    assert split_paragraphs(unique, 0.9, seed=2)[1] != val


@pytest.mark.parametrize("train_size", [0.001, 0.999])
def test_split_that_leaves_an_empty_side_is_an_error(train_size):
    with pytest.raises(UserError, match="split empty"):
        split_paragraphs(["a", "b", "c"], train_size, seed=0)


# ---- tokenization, chunking, labels --------------------------------------------------------------------


def test_overlapping_chunks_make_every_token_a_target_exactly_once():
    tokens = list(range(1000))
    for block in (2, 3, 7, 100, 999, 1000, 5000):
        chunks = chunk_with_overlap(tokens, block)
        assert all(len(c) <= block for c in chunks)
        targets = [t for c in chunks for t in c[1:]]  # position 0 of a block is context only
        assert targets == tokens[1:]


def test_long_paragraphs_are_cut_not_dropped(tokenizer, austen_paragraphs):
    longest = max(austen_paragraphs, key=len)
    blocks = tokenize_paragraphs(tokenizer, [longest], block_size=100).tolist()
    ids = tokenizer(longest)["input_ids"]
    assert len(blocks) > 10 and all(len(b) <= 100 for b in blocks)
    assert [t for b in blocks for t in b[1:]] == [*ids, tokenizer.eos_token_id]


def test_batched_tokenization_matches_one_at_a_time(tokenizer, austen_paragraphs):
    sample = austen_paragraphs[:200]
    eot = tokenizer.eos_token_id
    expected = [block for p in sample for block in chunk_with_overlap([eot, *tokenizer.encode(p), eot], 64)]
    assert tokenize_paragraphs(tokenizer, sample, 64).tolist() == expected


def test_a_tokenizer_json_that_truncates_does_not_cut_paragraphs(tokenizer, austen_paragraphs):
    truncating = copy.deepcopy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(max_length=8)
    longest = max(austen_paragraphs, key=len)
    assert encode_batch(truncating, [longest]) == [tokenizer.encode(longest)]
    assert len(tokenizer.encode(longest)) > 8


def test_packing_fills_blocks_and_keeps_every_token(tokenizer, austen_paragraphs):
    sample = austen_paragraphs[:200]
    eot = tokenizer.eos_token_id
    blocks = tokenize_paragraphs(tokenizer, sample, 64, pack=True).tolist()
    assert all(len(b) == 64 for b in blocks[:-1])
    stream = [eot] + [t for p in sample for t in (*tokenizer.encode(p), eot)]
    assert [blocks[0][0]] + [t for b in blocks for t in b[1:]] == stream


def test_padding_is_masked_and_the_closing_end_of_text_is_a_target(tokenizer):
    eot = tokenizer.eos_token_id
    examples = tokenize_paragraphs(
        tokenizer, ["Short.", "A somewhat longer paragraph than the first one."], 100
    ).tolist()
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    assert tokenizer.pad_token_id == eot  # the hard case: pad and end-of-text share an id
    short_len = len(examples[0])
    assert batch["labels"][0, short_len:].eq(-100).all()
    assert batch["attention_mask"][0, short_len:].eq(0).all()
    assert batch["labels"][0, short_len - 1].item() == eot  # the closing end-of-text is learned
    assert batch["input_ids"][0, 0].item() == eot  # every paragraph starts after end-of-text
    assert batch["labels"][1].ne(-100).all()  # the longest row has no padding


def test_epoch_order_is_a_function_of_seed_and_epoch():
    batches = EpochBatches(100, 8, seed=3)
    batches.set_epoch(1)
    first = [i for batch in batches for i in batch]
    batches.set_epoch(0)
    assert [i for batch in batches for i in batch] != first and sorted(first) == list(range(100))
    batches.set_epoch(1)
    assert [i for batch in batches for i in batch] == first
    batches.set_epoch(1, skip=3)
    assert [i for batch in batches for i in batch] == first[24:]


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_processes_share_every_epoch_exactly_once_in_the_same_number_of_steps(processes):
    shares = [EpochBatches(101, 8, seed=3, rank=r, processes=processes) for r in range(processes)]
    single = EpochBatches(101, 8 * processes, seed=3)
    for share in (*shares, single):
        share.set_epoch(2)
    per_process = [list(share) for share in shares]
    assert len({len(batches) for batches in per_process}) == 1 == len({len(share) for share in shares})
    # step by step, the processes together read exactly the one-process batch of the same global size
    for step, batch in enumerate(single):
        assert sorted(i for batches in per_process for i in batches[step]) == sorted(batch)
    seen = [i for batches in per_process for b in batches for i in b]
    assert sorted(seen) == list(range(101))


def test_an_empty_share_collates_to_a_batch_without_targets():
    batch = collate([], pad_id=50256)
    assert batch["input_ids"].shape == (1, 1)  # one token: nothing after it to predict


# ---- the tokenization cache -------------------------------------------------------------------------


def test_cache_returns_exactly_what_tokenizing_gives(tokenizer, austen_paragraphs, tmp_path, monkeypatch):
    sample = austen_paragraphs[:300]
    fresh = tokenize_paragraphs(tokenizer, sample, 64, pack=True).tolist()
    assert tokenize_cached(tokenizer, sample, 64, True, tmp_path).tolist() == fresh  # miss: builds and stores
    assert len(list(tmp_path.glob("blocks-*.pt"))) == 1 and not list(tmp_path.glob("*.tmp*"))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(tokens, "tokenize_paragraphs", no_tokenizing)
    assert tokenize_cached(tokenizer, sample, 64, True, tmp_path).tolist() == fresh  # hit


def test_cache_key_covers_text_tokenizer_and_settings(tokenizer, austen_paragraphs):
    import copy

    sample = austen_paragraphs[:50]
    key = cache_key(tokenizer, sample, 64, True)
    assert key == cache_key(tokenizer, list(sample), 64, True)
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<|startoftext|>"], special_tokens=True)
    variants = [
        cache_key(tokenizer, sample, 65, True),
        cache_key(tokenizer, sample, 64, False),
        cache_key(tokenizer, sample[:-1] + [sample[-1] + "!"], 64, True),
        cache_key(other_tokenizer, sample, 64, True),
    ]
    assert key not in variants and len(set(variants)) == len(variants)


def test_damaged_cache_entry_is_rebuilt(tokenizer, austen_paragraphs, tmp_path):
    sample = austen_paragraphs[:40]
    tokenize_cached(tokenizer, sample, 64, False, tmp_path)
    entry = next(tmp_path.glob("blocks-*.pt"))
    entry.write_bytes(b"not a tensor file")
    cached = tokenize_cached(tokenizer, sample, 64, False, tmp_path)
    assert cached.tolist() == tokenize_paragraphs(tokenizer, sample, 64).tolist()
    assert entry.read_bytes() != b"not a tensor file"


def test_tokenizer_command_rebuilds_the_committed_quickstart_tokenizer_byte_for_byte(tmp_path):
    """`python dataset.py tokenizer` with its defaults gives exactly the files of configs/austen-tiny."""
    main(["tokenizer", "--out", str(tmp_path)])
    committed = REPO / "configs" / "austen-tiny"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


def test_tokenizer_command_builds_a_bpe_and_config_for_any_data(tmp_path, small_data):
    """Another author's data and vocabulary size: the folder loads with the Auto classes, round-trips any text
    and frames paragraphs with its own end-of-text token."""
    from transformers import AutoConfig, AutoTokenizer

    main(["tokenizer", "--data", str(small_data), "--vocab-size", "400", "--out", str(tmp_path / "bpe")])
    tokenizer, config = AutoTokenizer.from_pretrained(tmp_path / "bpe"), AutoConfig.from_pretrained(tmp_path / "bpe")
    assert len(tokenizer) == config.vocab_size == 400
    assert config.eos_token_id == config.bos_token_id == tokenizer.eos_token_id == tokenizer.bos_token_id
    text = "\u201cMy dear Mr. Bennet,\u201d said his lady \u00e9l\u00e8ve 1813 \U0001f600"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing is unknown
    assert config.n_layer == 2 and config.n_embd == 256 and config.resid_pdrop == 0  # gpt2-tiny, 2 blocks, no dropout
    with pytest.raises(UserError, match="--vocab-size"):
        main(["tokenizer", "--data", str(small_data), "--vocab-size", "100", "--out", str(tmp_path / "x")])
