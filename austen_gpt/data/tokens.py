"""Paragraphs to token examples: framing with the tokenizer's own special tokens, windows, packing, the cache.

A training example is one paragraph framed by the tokenizer's own special tokens: its begin-of-text token
before it (Llama's `<|begin_of_text|>`), or its end-of-text token where it has no separate one (GPT-2's
`<|endoftext|>`, Qwen's), and end-of-text after it: `<|endoftext|> paragraph <|endoftext|>` for GPT-2.
The leading token tells the model "a new text starts here", as between documents in pre-training; the
closing one is a real target, so the model learns where a paragraph ends. No tokens are added to the
vocabulary, so the embedding matrix (and a LoRA adapter) keeps its size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Tokenization and batching


def chunk_with_overlap(tokens: list[int], block_size: int) -> list[list[int]]:
    """Cut a token sequence into blocks of at most `block_size` that overlap by one token.

    The first token of a block is context only (a causal LM predicts token i from tokens < i), so
    the one-token overlap makes every token after the very first a prediction target exactly once.
    """
    stride = block_size - 1
    return [tokens[start : start + block_size] for start in range(0, max(len(tokens) - 1, 1), stride)]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, from one call into the Rust tokenizer, parallel over all cores.

    Calling the backend directly skips the Python wrapper's per-text bookkeeping (a quarter of the
    time on the Austen corpus); the ids are the same. The wrapper stays in charge when the tokenizer
    is not a fast one or its tokenizer.json asks for truncation or padding, which the wrapper turns off.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def paragraph_frame(tokenizer) -> tuple[int, int]:
    """(start, end): the token ids before and after a paragraph, begin-of-text (end-of-text where the
    tokenizer has no begin-of-text token) and end-of-text."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return start, tokenizer.eos_token_id


class TokenBlocks(Sequence):
    """Token blocks held as one flat int32 tensor and each block's start and length: a corpus of tens of
    millions of tokens costs 4 bytes a token, not the ~36 of Python lists. A block reads as a list of ints."""

    def __init__(self, tokens: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor):
        self.tokens, self.starts, self.lengths = tokens, starts, lengths

    @classmethod
    def from_lists(cls, blocks: list[list[int]]) -> TokenBlocks:
        lengths = torch.tensor([len(block) for block in blocks], dtype=torch.long)
        starts = torch.cumsum(lengths, 0) - lengths
        return cls(torch.tensor([t for block in blocks for t in block], dtype=torch.int32), starts, lengths)

    @classmethod
    def windows(cls, stream: torch.Tensor, block_size: int) -> TokenBlocks:
        """chunk_with_overlap over a stream already in one tensor: windows share their one-token overlap."""
        starts = torch.arange(0, max(len(stream) - 1, 1), block_size - 1)
        return cls(stream, starts, torch.clamp(len(stream) - starts, max=block_size))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int | slice) -> list[int] | list[list[int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start = int(self.starts[index])
        return self.tokens[start : start + int(self.lengths[index])].tolist()

    def tolist(self) -> list[list[int]]:
        return [self[i] for i in range(len(self))]

    def longest(self) -> int:
        return int(self.lengths.max())

    def targets(self, unpredicted: int | None = None) -> list[int]:
        """Each block's prediction targets, as collate labels them: every token after the first, but
        `unpredicted` ones (see unpredicted_token)."""
        counts = self.lengths - 1
        if unpredicted is not None:  # the unpredicted tokens after each block's first, from a running count
            seen = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (self.tokens == unpredicted).long()]), 0)
            counts = counts - (seen[self.starts + self.lengths] - seen[self.starts + 1])
        return counts.tolist()


ENCODE_CHUNK = 16_384  # paragraphs per call into the tokenizer when packing: one chunk's Python lists at a time


def packed_stream(tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """`<start> p1 <end> <start> p2 <end> ...` in one int32 tensor, encoded ENCODE_CHUNK paragraphs at a time."""
    start, end = paragraph_frame(tokenizer)
    between = [end] if start == end else [end, start]
    pieces = [torch.tensor([start], dtype=torch.int32)]
    for first in range(0, len(paragraphs), ENCODE_CHUNK):
        encoded = encode_batch(tokenizer, paragraphs[first : first + ENCODE_CHUNK])
        pieces.append(torch.tensor([t for ids in encoded for t in (*ids, *between)], dtype=torch.int32))
    stream = torch.cat(pieces)
    return stream[:-1] if start != end and len(stream) > 1 else stream  # no start token after the last end


def tokenize_paragraphs(tokenizer, paragraphs: list[str], block_size: int, pack: bool = False) -> TokenBlocks:
    """Token blocks of at most `block_size`, tokenized in batched calls of the fast tokenizer.

    pack=False: one `<start> paragraph <end>` per example (long ones cut in several), padded per batch.
    pack=True: `<start> p1 <end> <start> p2 <end> ...` in corpus order (one token between paragraphs where
    start and end are the same, as in GPT-2), cut into full blocks, so no compute is spent on padding; a
    paragraph is read after the one before it in `paragraphs`: a work's paragraphs in order, as pretraining
    reads documents (not its neighbour in the novel across a held-out paragraph).
    """
    if pack:
        return TokenBlocks.windows(packed_stream(tokenizer, paragraphs), block_size)
    start, end = paragraph_frame(tokenizer)
    encoded = encode_batch(tokenizer, paragraphs)
    return TokenBlocks.from_lists(
        [block for ids in encoded for block in chunk_with_overlap([start, *ids, end], block_size)]
    )


def cache_key(tokenizer, paragraphs: list[str], block_size: int, pack: bool) -> str:
    """A hash of everything that decides the token blocks: the text, the tokenizer and the settings."""
    digest = hashlib.sha256(json.dumps({"format": 2, "block_size": block_size, "pack": pack}).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())  # vocabulary, merges, normalization
    digest.update(str(paragraph_frame(tokenizer)).encode())
    for paragraph in paragraphs:
        digest.update(paragraph.encode() + b"\0")
    return digest.hexdigest()[:32]


def tokenize_cached(tokenizer, paragraphs: list[str], block_size: int, pack: bool, cache_dir: Path | None):
    """tokenize_paragraphs, remembered in `cache_dir` under a hash of its inputs (None: no cache).

    The blocks are stored as their three integer tensors (torch.load(weights_only=True) reads them back); a
    damaged entry is rebuilt, and entries are written to a temporary file and renamed into place.
    """

    if cache_dir is None:
        return tokenize_paragraphs(tokenizer, paragraphs, block_size, pack)
    path = Path(cache_dir).expanduser() / f"blocks-{cache_key(tokenizer, paragraphs, block_size, pack)}.pt"
    try:
        cached = torch.load(path, weights_only=True)
        return TokenBlocks(cached["tokens"], cached["starts"], cached["lengths"])
    except Exception:  # missing or damaged: (re)build it
        pass
    blocks = tokenize_paragraphs(tokenizer, paragraphs, block_size, pack)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"tokens": blocks.tokens, "starts": blocks.starts, "lengths": blocks.lengths}, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk costs speed, not the run
        pass
    return blocks


def unpredicted_token(tokenizer) -> int | None:
    """The framing token that is never a target: begin-of-text where it differs from end-of-text, else none
    (GPT-2's one end-of-text token is both the end of a paragraph, a real target, and the next one's start)."""
    start, end = paragraph_frame(tokenizer)
    return start if start != end else None
