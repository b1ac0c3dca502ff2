"""The HTTP API (OpenAI's request and response shapes, on FastAPI), its Prometheus metrics and the web page.

  GET  /v1/models            the one model served
  POST /v1/completions       prompt (a string or a list) -> continuations; `stream` sends server-sent events
  POST /v1/chat/completions  the last user message is continued as prose (schemas.PROMPT_RULE)
  GET  /health, /metrics     liveness, and Prometheus's text format
  GET  /                     a page to write with the model (page.html)

Every error is one line in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) with a 4xx
status; a request that fails never leaves the engine busy.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from austen_gpt.sampling.generation import fresh_seed, prompt_ids
from austen_gpt.serving.engine import Engine, Job, QueueFull, Row
from austen_gpt.serving.schemas import PROMPT_RULE, ChatRequest, CompletionRequest, Sampling
from austen_gpt.settings import SamplingSettings

PAGE = Path(__file__).with_name("page.html")
STOPPING_GRACE = 20  # seconds a stream in flight may still run once the server is told to stop (uvicorn waits 30)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: new tokens per sample, prompt tokens (the model's usable context) and
    samples (its prompts times n: at most one batch); and the sampling settings of fields it leaves out."""

    max_tokens: int
    prompt_tokens: int
    samples: int
    defaults: SamplingSettings = field(default_factory=SamplingSettings)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = "authentication_error" if self.status == 401 else "invalid_request_error"
        kind = "rate_limit_error" if self.status == 429 else "server_error" if self.status >= 500 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("austen_requests", "HTTP requests", ["path", "status"], registry=r)
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


def create_app(engine: Engine, name: str, limits: Limits, api_key: str | None, metrics: Metrics) -> FastAPI:
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

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            given = "a wrong API key" if request.headers.get("authorization") else "no API key"
            raise ApiError(
                401, f"{given}: send the server's key as 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

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
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "austen-gpt"}]}

    def rows_of(body: Sampling, prompts: list[str]) -> tuple[list[Row], int]:
        """The request's rows (prompt by prompt, n each) and its seed, after every check on it."""
        if body.model != name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found")  # fmt: skip
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, f"{unsupported}: not implemented by this server; leave it out", unsupported)
        settings = body.settings(limits.defaults)
        if settings.max_new_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens {settings.max_new_tokens} is over this server's cap of "
                           f"{limits.max_tokens}; ask for fewer", "max_tokens")  # fmt: skip
        seed = body.seed if body.seed is not None else fresh_seed()
        rows = []
        for prompt in prompts:
            ids = prompt_ids(engine.tokenizer, prompt)
            if len(ids) > limits.prompt_tokens:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; this model reads at most "
                               f"{limits.prompt_tokens}; shorten it", "prompt")  # fmt: skip
            rows += [Row(ids, k, seed, settings, settings.max_new_tokens, body.stops()) for k in range(body.n)]
        if len(rows) > limits.samples:
            raise ApiError(400, f"{len(rows)} samples (prompts times n) are more than this server draws at once "
                           f"({limits.samples}); ask for fewer", "n")  # fmt: skip
        return rows, seed

    def submit(rows: list[Row]) -> Job:
        job = Job(rows, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, "the server's queue is full; retry in a moment", headers={"Retry-After": "1"}) from None
        return job

    async def finished(job: Job, request: Request) -> None:
        """Wait until every row of the job is done; a client gone meanwhile cancels it."""
        left = len(job.rows)
        while left:
            try:
                index, new = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11)
                if await request.is_disconnected():
                    job.cancel()
                    break
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
            job.cancel()  # the client went away, or the stream ended: nothing more is drawn for it
            record(job)

    async def answer(body: Sampling, request: Request, prompts: list[str], chat: bool):
        """The response to a completion (or chat) request: whole, or streamed as server-sent events."""
        authorize(request)
        rows, seed = rows_of(body, prompts)
        job = submit(rows)
        shape = Shape(name, chat, seed, prompts[0] if chat else None)
        if body.stream:
            return stream(job, shape, bool(body.stream_options and body.stream_options.include_usage))
        await finished(job, request)
        choices = [shape.choice(row.index, row.text.final(), row.finish_reason) for row in job.rows]
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
