"""The server's sampling engine: a bounded queue of requests, and one thread that batches them into shared
`generate` calls.

Requests that wait together are taken as one batch, up to `max_batch` rows (a request's rows are its prompts
times its `n`; a request is never split); once the first arrives, the batch waits `window` seconds (or until
it is full) for the others that clients sent at the same moment. The batch's rows are grouped by their
sampling settings (temperature, top-k, top-p, repetition penalty, paragraphs) and each group is one
`sample_ids` call, so rows with different settings share a batch but not a call; each row keeps its own
length, seed and stop strings. A request that arrives while a batch runs waits for the next one (no
continuous batching).

Each row draws from its own random generator, seeded from (its seed, its prompt, its sample number) as
`inference.py` seeds it, so a seeded request gives the same text alone or in any batch, and the same as
`inference.py` with the same prompt, settings and seed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace

from austen_gpt.data.tokens import paragraph_frame
from austen_gpt.sampling.generation import sample_ids, special_token_ids
from austen_gpt.settings import SamplingSettings


class QueueFull(Exception):
    """The queue holds --max-queue requests: the client should come back later."""


class StopStrings:
    """Finds the first stop string in a text that grows at its end, reading each character once: per stop, the
    length of its longest beginning that the text ends with, kept as Knuth-Morris-Pratt keeps it. The cost is
    linear in the text and the stops' lengths, not their product."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.fallback = [longest_borders(stop) for stop in stops]
        self.matched = [0] * len(stops)  # per stop: how many of its first characters the text ends with
        self.read = 0  # characters of the text read

    def find(self, text: str) -> int | None:
        """Read `text` from where the last call stopped; where a stop string now ends in it, the index where
        that stop starts (the earliest to end; of those ending together, the longest), else None."""
        for at in range(self.read, len(text)):
            ended = [self.step(i, text[at]) for i in range(len(self.stops))]
            if any(ended):
                self.read = at + 1
                return at + 1 - max(len(stop) for stop, end in zip(self.stops, ended, strict=True) if end)
        self.read = len(text)
        return None

    def step(self, i: int, character: str) -> bool:
        """Stop i reads a character; true where the text now ends with all of it."""
        stop, matched = self.stops[i], self.matched[i]
        if matched == len(stop):  # it ended here before: go on from its longest border
            matched = self.fallback[i][matched - 1]
        while matched and stop[matched] != character:
            matched = self.fallback[i][matched - 1]
        matched += stop[matched] == character
        self.matched[i] = matched
        return matched == len(stop)

    def pending(self) -> int:
        """How many of the text's last characters may begin a stop string: they wait for what follows."""
        return max(self.matched, default=0)


def longest_borders(stop: str) -> list[int]:
    """For each prefix of `stop`, the length of its longest proper prefix that is also its suffix (KMP's table)."""
    borders = [0] * len(stop)
    for k in range(1, len(stop)):
        border = borders[k - 1]
        while border and stop[k] != stop[border]:
            border = borders[border - 1]
        borders[k] = border + (stop[k] == stop[border])
    return borders


class TextSoFar:
    """A row's text as its tokens come, each end-of-text a paragraph break, and how much of it is settled:
    trailing whitespace (the text may end there) and the start of a stop string wait for what follows, so the
    pieces handed out add up to the final text exactly. A stop string ends the text before it."""

    def __init__(self, tokenizer, stops: tuple[str, ...], strip_start: bool):
        self.tokenizer, self.stops, self.strip_start = tokenizer, stops, strip_start
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.prefix_at = self.read_at = 0  # the ids decoded again for context, and those already read
        self.stopped = False
        self.matcher = StopStrings(stops)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False).replace(self.tokenizer.eos_token, "\n\n")

    def push(self, token: int) -> str:
        """Add a token; return the text newly settled (maybe empty)."""
        if self.stopped:  # tokens drawn after a stop string are not the row's
            return ""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix_at : self.read_at])
        now = self.decode(self.ids[self.prefix_at :])
        if now.endswith("\ufffd"):  # a character still being built from byte tokens
            return ""
        self.prefix_at, self.read_at = self.read_at, len(self.ids)
        self.text += now[len(before) :]
        if self.strip_start and self.text[:1].isspace():  # (only while nothing but whitespace has come)
            self.text, self.matcher = self.text.lstrip(), StopStrings(self.stops)
        found = self.matcher.find(self.text)
        if found is not None:
            self.text, self.stopped = self.text[:found], True
            return self.settle(self.text)
        waiting = max(self.matcher.pending(), len(self.text) - len(self.text.rstrip()))
        return self.settle(self.text[: len(self.text) - waiting])

    def settle(self, settled: str) -> str:
        new, self.sent = settled[self.sent :], max(self.sent, len(settled))
        return new

    def flush(self) -> str:
        """The row is done: settle the whole text (a last, unfinished character too, as inference.py writes
        it; not trailing whitespace); return what had not been handed out."""
        if not self.stopped:
            self.text = self.decode(self.ids)
            self.text = self.text.lstrip() if self.strip_start else self.text
            found = StopStrings(self.stops).find(self.text)
            if found is not None:
                self.text, self.stopped = self.text[:found], True
        final = self.final()
        return self.settle(final)

    def final(self) -> str:
        """The text settled so far; the whole text once flushed."""
        return self.text if self.stopped else self.text.rstrip()


@dataclass
class Row:
    """One sample to draw: its prompt's token ids (the paragraph's start token first), its number among the
    copies of its prompt, its seed, its sampling settings, its new-token count and stop strings."""

    prompt: list[int]
    sample: int
    seed: int
    settings: SamplingSettings
    max_tokens: int
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: TextSoFar | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    index: int = 0  # its place among its request's rows (its choice's index)


@dataclass(eq=False)  # a job is itself: the queue finds it by identity
class Job:
    """One request's rows and the events its handler reads, in its own event loop: (row, new text), then
    (row, None) once the row is done, or ('error', message) if its batch failed."""

    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def tell(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Stop every row where it is (the client went away): at its batch's next step."""
        for row in self.rows:
            row.cancelled.set()


class Engine:
    """The model, its tokenizer and the worker thread that samples the queued requests in batches."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int,
        max_queue: int,
        observe: Callable[[str, float], None],
        window: float = 0.01,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.observe, self.window = max_batch, max_queue, observe, window
        self.eot, self.special = paragraph_frame(tokenizer)[1], special_token_ids(tokenizer)
        self.waiting: deque[Job] = deque()
        self.condition = threading.Condition()
        self.closing = False
        self.active_rows = 0
        self.worker = threading.Thread(target=self.work, name="sampling", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        """Queue a request; QueueFull where --max-queue requests already wait."""
        with self.condition:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            for index, row in enumerate(job.rows):
                row.index = index
                row.text = TextSoFar(self.tokenizer, row.stops, strip_start=len(row.prompt) <= 1)
            self.waiting.append(job)
            self.observe("queue", len(self.waiting))
            self.condition.notify()

    def withdraw(self, job: Job) -> None:
        """The job's client went away: a job still waiting leaves the queue (its place is free at once), and
        the rows of one being drawn stop at their batch's next step."""
        job.cancel()
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
                self.observe("queue", len(self.waiting))

    def close(self) -> None:
        """Cancel what waits and what runs; the worker ends after its current step."""
        with self.condition:
            self.closing = True
            for job in self.waiting:
                job.tell(("error", "the server is shutting down"))
            self.waiting.clear()
            self.condition.notify()
        self.worker.join(timeout=30)

    def next_batch(self) -> list[Job]:
        """The requests that wait, up to max_batch rows (the first whole, however many rows it has)."""
        with self.condition:
            while not self.waiting and not self.closing:
                self.condition.wait()
            until = time.monotonic() + self.window  # the others sent at the same moment are on their way
            while sum(len(job.rows) for job in self.waiting) < self.max_batch and not self.closing:
                if not self.condition.wait(timeout=max(0.0, until - time.monotonic())):
                    break
            batch, rows = [], 0
            while self.waiting and (not batch or rows + len(self.waiting[0].rows) <= self.max_batch):
                batch.append(self.waiting.popleft())
                rows += len(batch[-1].rows)
            self.observe("queue", len(self.waiting))
            return batch

    def work(self) -> None:
        while not self.closing:
            batch = self.next_batch()
            if not batch:
                continue
            rows = [(job, row) for job in batch for row in job.rows]
            self.active_rows = len(rows)
            self.observe("active", self.active_rows)
            self.observe("batch", self.active_rows)
            try:
                for group in groups(rows):
                    self.sample(group)
            except Exception as error:  # a failed batch fails its requests, not the server
                for job in batch:
                    job.tell(("error", f"sampling failed: {type(error).__name__}: {error}"))
            self.active_rows = 0
            self.observe("active", 0)

    def sample(self, group: list[tuple[Job, Row]]) -> None:
        """One sample_ids call for rows with the same settings, each row's tokens handed on as drawn."""

        def on_token(i: int, token: int) -> None:
            job, row = group[i]
            if row.cancelled.is_set():
                return
            if job.first_token is None:
                job.first_token = time.perf_counter()
                self.observe("first_token", job.first_token - job.submitted)
            row.tokens.append(token)
            new = row.text.push(token)
            if new:
                job.tell((row.index, new))
            if row.text.stopped:
                row.finish_reason = "stop"
                row.cancelled.set()

        sample_ids(
            self.model,
            [row.prompt for _, row in group],
            group[0][1].settings,
            0,
            self.eot,
            samples=[row.sample for _, row in group],
            special_ids=self.special,
            seeds=[row.seed for _, row in group],
            new_tokens=[row.max_tokens for _, row in group],
            cancelled=lambda i: group[i][1].cancelled.is_set(),
            on_token=on_token,
        )
        for job, row in group:
            row.finish_reason = row.finish_reason or ("length" if len(row.tokens) >= row.max_tokens else "stop")
            tail = row.text.flush()
            if tail:
                job.tell((row.index, tail))
            job.tell((row.index, None))


def settings_key(settings: SamplingSettings) -> tuple:
    """What rows must share to be drawn in one call (the new-token count is each row's own)."""
    return astuple(replace(settings, max_new_tokens=None, max_length=0))


def groups(rows: list[tuple[Job, Row]]) -> list[list[tuple[Job, Row]]]:
    """The batch's rows by sampling settings, in the order their first request came."""
    grouped: dict[tuple, list[tuple[Job, Row]]] = {}
    for job, row in rows:
        grouped.setdefault(settings_key(row.settings), []).append((job, row))
    return list(grouped.values())
