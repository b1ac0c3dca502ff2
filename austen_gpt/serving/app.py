"""The HTTP API (OpenAI's request and response shapes, on FastAPI), its Prometheus metrics and the web page.

  GET  /v1/models            the one model served
  POST /v1/completions       prompt (a string or a list) -> continuations; `stream` sends server-sent events
  POST /v1/chat/completions  the last user message is continued as prose (schemas.PROMPT_RULE)
  GET  /health, /metrics     liveness, and Prometheus's text format
  GET  /                     a page to write with the model (page.html)

Every error is one line in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) with a 4xx
status; a request that fails never leaves the engine busy. The Host, the key and the body's size are checked
before the app reads the body (gate.py); prompts are tokenized off the event loop, so the streams in flight go
on meanwhile. A client that goes away, streaming or not, stops its rows within a second, or leaves the queue.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match

from austen_gpt.sampling.generation import as_text, fresh_seed, prompt_ids, sample_numbers
from austen_gpt.serving.engine import Engine, Job, QueueFull, Row
from austen_gpt.serving.gate import Gate, error_json
from austen_gpt.serving.schemas import DEFAULT_MAX_TOKENS, PROMPT_RULE, ChatRequest, CompletionRequest, Sampling
from austen_gpt.settings import SamplingSettings
from austen_gpt.style.judge import Judge, Rerank

PAGE = Path(__file__).with_name("page.html")
STOPPING_GRACE = 20  # seconds a stream in flight may still run once the server is told to stop (uvicorn waits 30)
DISCONNECT_CHECK = 0.5  # seconds between two looks at whether a waiting request's client is still there


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: new tokens per sample, the model's usable context (a prompt and its new
    tokens must fit in it), samples (its prompts times n: at most one batch) and bytes of body; and the sampling
    settings of fields it leaves out."""

    max_tokens: int
    context: int
    samples: int
    defaults: SamplingSettings = field(default_factory=SamplingSettings)
    max_body: int = 2**20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_json(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("austen_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("austen_tokens", "tokens read and written", ["kind"], registry=r)
        self.queue = Gauge("austen_queue_length", "requests waiting for a batch", registry=r)
        self.active = Gauge("austen_active_rows", "rows (samples) being drawn", registry=r)
        self.first_token = Histogram(
            "austen_time_to_first_token_seconds",
            "from a request's arrival to its first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.speed = Histogram(
            "austen_tokens_per_second",
            "a request's new tokens per second, from its first token to its last",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )

        self.batch = Histogram(
            "austen_batch_rows",
            "rows (samples) drawn together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )

    def observe(self, name: str, value: float) -> None:
        """The engine's readings: 'queue', 'active' (gauges), 'first_token' (seconds) and 'batch' (rows)."""
        readings = {"queue": self.queue.set, "active": self.active.set, "first_token": self.first_token.observe}
        (readings | {"batch": self.batch.observe})[name](value)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The first problem in one line, and the field it is in."""
    first = error.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON; send a JSON object", None
    if first.get("type") == "extra_forbidden":
        return f"{'.'.join(where)}: this server does not know the field; see docs/serving.md", where[0]
    return (f"{'.'.join(where)}: " if where else "") + first.get("msg", "invalid request"), where[0] if where else None


class CountRequests:
    """ASGI middleware: each request counted by its route and status, the gate's refusals too. (Plain ASGI, as
    the gate is: Starlette's BaseHTTPMiddleware would hide a client's disconnect from request.is_disconnected.)"""

    def __init__(self, app, counter: Counter, route: Callable[[dict], str]):
        self.app, self.counter, self.route = app, counter, route

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # where the app fails before it answers

        async def sending(message) -> None:
            nonlocal status
            status = message["status"] if message["type"] == "http.response.start" else status
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.counter.labels(self.route(scope), str(status)).inc()


def route_of(app: FastAPI, scope) -> str:
    """The route a request is for, as declared ('/v1/completions'), or 'other': never its raw path, so that
    requests to made-up paths cannot grow the metrics without bound."""
    for route in app.router.routes:
        if route.matches(scope)[0] != Match.NONE:
            return route.path
    return "other"


def create_app(
    engine: Engine, name: str, limits: Limits, api_key: str | None, metrics: Metrics, judge: Judge | None = None
) -> FastAPI:
    """The app serving `engine`'s model as `name`; with `api_key`, /v1 requests need it as a Bearer token."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # after uvicorn has finished (or cut) the requests in flight

    app = FastAPI(title="austen-gpt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        return ApiError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), headers=error.headers).response()

    app.add_middleware(Gate, api_key=api_key, max_body=limits.max_body)
    app.add_middleware(CountRequests, counter=metrics.requests, route=lambda scope: route_of(app, scope))  # outside

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "queue": len(engine.waiting), "active_rows": engine.active_rows}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        as_js = json.dumps(name).replace("</", "<\\/")
        return HTMLResponse(PAGE.read_text().replace("{{MODEL_JSON}}", as_js).replace("{{MODEL}}", html.escape(name)))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "austen-gpt"}]}

    def rows_of(body: Sampling, prompts: list[str]) -> tuple[list[Row], int]:
        """The request's rows (prompt by prompt, n each, numbered as inference.py numbers samples: the same
        prompt twice is two samples) and its seed, after every check on it. Each prompt with its new tokens must
        fit the context, so the model reads all of it: max_tokens left out asks for as many as fit, up to the
        default."""
        if body.model != name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found")  # fmt: skip
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, f"{unsupported}: not implemented by this server; leave it out", unsupported)
        settings = body.settings(limits.defaults)
        if (body.asked_tokens() or 0) > limits.max_tokens:
            raise ApiError(400, f"max_tokens {body.asked_tokens()} is over this server's cap of "
                           f"{limits.max_tokens}; ask for fewer", "max_tokens")  # fmt: skip
        seed = body.seed if body.seed is not None else fresh_seed()
        check_rerank(body)
        drawn = body.n * body.rerank  # a sample's candidates are drawn as samples of their own
        if len(prompts) * drawn > limits.samples:
            raise ApiError(400, f"{len(prompts) * drawn} samples (prompts times n times rerank) are more than this "
                           f"server draws at once ({limits.samples}); ask for fewer", "n")  # fmt: skip
        encoded = [ids for ids in (prompt_ids(engine.tokenizer, prompt) for prompt in prompts) for _ in range(drawn)]
        rows = []
        for ids, number in zip(encoded, sample_numbers(encoded), strict=True):
            rows.append(Row(ids, number, seed, settings, new_tokens(body, len(ids)), body.stops()))
        return rows, seed

    def check_rerank(body: Sampling) -> None:
        if body.rerank > 1 and judge is None:
            raise ApiError(400, "rerank: this server has no judge for its model; fit one with inference.py "
                           "--model-path <the model> --rerank 2 --prompt ... (saved beside the model), then restart "
                           "the server", "rerank")  # fmt: skip
        if body.rerank > 1 and body.stream:
            raise ApiError(400, "rerank keeps one of whole candidates, so it cannot stream; leave out stream or "
                           "rerank", "rerank")  # fmt: skip

    def kept_rows(rows: list[Row], body: Sampling) -> list[Row]:
        """With rerank N, the row kept of each sample's N candidates (prompt by prompt, sample k's are the prompt's
        samples kN .. kN+N-1), as inference.py --rerank keeps them: the judge reads the prompt and its continuation."""
        if body.rerank == 1:
            return rows
        rerank, per_prompt, kept = Rerank(judge, body.rerank, body.rerank_choice), body.n * body.rerank, []
        for first in range(0, len(rows), per_prompt):
            candidates = rows[first : first + per_prompt]
            texts = [as_text(engine.tokenizer, row.prompt[1:] + row.tokens) for row in candidates]
            kept += [candidates[i] for i in rerank.kept(engine.model, engine.tokenizer, texts, candidates[0].prompt,
                                                        candidates[0].seed)]  # fmt: skip
        return kept

    def new_tokens(body: Sampling, prompt_tokens: int) -> int:
        """The row's new tokens: what the request asks for, which must fit the context after its prompt, or as
        many as fit up to the default."""
        room = limits.context - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model reads at most {limits.context} "
                           "and must have room to write; shorten it", "prompt")  # fmt: skip
        asked = body.asked_tokens()
        if asked is None:
            return min(DEFAULT_MAX_TOKENS, limits.max_tokens, room)
        if asked > room:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) and max_tokens {asked} are more than the "
                           f"model's context of {limits.context} tokens; ask for {room} or fewer, or shorten the "
                           "prompt", "max_tokens")  # fmt: skip
        return asked

    def submit(rows: list[Row]) -> Job:
        job = Job(rows, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, "the server's queue is full; retry in a moment", headers={"Retry-After": "1"}) from None
        return job

    async def finished(job: Job, request: Request) -> None:
        """Wait until every row of the job is done; a client gone meanwhile (looked for every DISCONNECT_CHECK
        seconds, whether tokens come or not) cancels its rows, or takes the job out of the queue."""
        left, looked = len(job.rows), time.monotonic()
        while left:
            if time.monotonic() - looked >= DISCONNECT_CHECK:
                looked = time.monotonic()
                if await request.is_disconnected():
                    engine.withdraw(job)
                    break
            try:
                index, new = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_CHECK)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                continue
            if index == "error":
                raise ApiError(503, new)
            left -= new is None
        record(job)

    def record(job: Job) -> None:
        """Count the job's tokens (what was drawn, if it was cut short) and its speed."""
        written = sum(len(row.tokens) for row in job.rows)
        metrics.tokens.labels("prompt").inc(sum(len(row.prompt) for row in job.rows))
        metrics.tokens.labels("completion").inc(written)
        if job.first_token is not None and written:
            metrics.speed.observe(written / max(time.perf_counter() - job.first_token, 1e-6))

    def usage(job: Job) -> dict:
        read, written = sum(len(row.prompt) for row in job.rows), sum(len(row.tokens) for row in job.rows)
        return {"prompt_tokens": read, "completion_tokens": written, "total_tokens": read + written}

    async def events(job: Job, shape, include_usage: bool, shutdown: anyio.Event) -> AsyncIterator[dict]:
        """Server-sent events: each row's new text as it comes, its end, the usage if asked, then [DONE]. When the
        server is stopping, the rows have STOPPING_GRACE seconds to finish; then they are ended where they are,
        and the stream still closes with their ends and [DONE]."""
        left, stopping_since = len(job.rows), None
        try:
            for row in job.rows:
                start = shape.start(row.index)
                if start:
                    yield {"data": json.dumps(start)}
            while left:
                try:
                    index, new = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    stopping_since = stopping_since or (time.monotonic() if shutdown.is_set() else None)
                    if stopping_since and time.monotonic() - stopping_since > STOPPING_GRACE:
                        job.cancel()
                    continue
                if index == "error":
                    yield {"data": json.dumps(ApiError(503, new).body())}
                    break
                if new is None:
                    left -= 1
                    yield {"data": json.dumps(shape.end(index, job.rows[index].finish_reason))}
                else:
                    yield {"data": json.dumps(shape.piece(index, new))}
            if include_usage and not left:
                yield {"data": json.dumps(shape.usage(usage(job)))}
            yield {"data": "[DONE]"}
        finally:
            engine.withdraw(job)  # the client went away, or the stream ended: nothing more is drawn for it
            record(job)

    async def answer(body: Sampling, request: Request, prompts: list[str], chat: bool):
        """The response to a completion (or chat) request: whole, or streamed as server-sent events."""
        rows, seed = await run_in_threadpool(rows_of, body, prompts)  # tokenizing takes a while for long prompts
        job = submit(rows)
        shape = Shape(name, chat, seed, prompts[0] if chat else None)
        if body.stream:
            return stream(job, shape, bool(body.stream_options and body.stream_options.include_usage))
        await finished(job, request)
        kept = await run_in_threadpool(kept_rows, job.rows, body)  # reading the candidates takes model calls
        choices = [shape.choice(index, row.text.final(), row.finish_reason) for index, row in enumerate(kept)]
        return shape.whole(choices, usage(job))

    def stream(job: Job, shape, include_usage: bool) -> EventSourceResponse:
        shutdown = anyio.Event()  # set by sse-starlette when the server stops
        content = events(job, shape, include_usage, shutdown)
        return EventSourceResponse(content, ping=15, shutdown_event=shutdown, shutdown_grace_period=STOPPING_GRACE + 5)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(body, request, body.prompts(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await answer(body, request, [body.prose_prompt()], chat=True)

    return app


class Shape:
    """OpenAI's response and chunk shapes, for completions or chat; each carries the seed drawn with, and a chat
    response the prose prompt its messages became."""

    def __init__(self, model: str, chat: bool, seed: int, prompt: str | None = None):
        prefix, self.kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        self.id, self.model, self.chat = f"{prefix}-{uuid.uuid4().hex}", model, chat
        self.created, self.seed, self.prompt = int(time.time()), seed, prompt

    def head(self, chunk: bool) -> dict:
        kind = f"{self.kind}.chunk" if chunk and self.chat else self.kind
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "seed": self.seed}
        return head | ({"prose_prompt": {"text": self.prompt, "rule": PROMPT_RULE}} if self.chat else {})

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}  # fmt: skip
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def whole(self, choices: list[dict], usage: dict) -> dict:
        return self.head(chunk=False) | {"choices": choices, "usage": usage}

    def delta(self, index: int, delta: dict, finish: str | None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.head(chunk=True) | {"choices": [choice]}

    def start(self, index: int) -> dict | None:
        return self.delta(index, {"role": "assistant", "content": ""}, None) if self.chat else None

    def piece(self, index: int, text: str) -> dict:
        if self.chat:
            return self.delta(index, {"content": text}, None)
        return self.head(chunk=True) | {"choices": [self.choice(index, text, None)]}

    def end(self, index: int, finish: str | None) -> dict:
        if self.chat:
            return self.delta(index, {}, finish)
        return self.head(chunk=True) | {"choices": [self.choice(index, "", finish)]}

    def usage(self, usage: dict) -> dict:
        return self.head(chunk=True) | {"choices": [], "usage": usage}
