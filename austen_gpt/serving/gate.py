"""What a request must pass before the app reads it: the Host a page in the user's browser could forge, the API
key, and the size of its body. A pure ASGI middleware, so that nothing of a refused request is parsed,
validated or tokenized: a caller without the key gets 401 whatever its body holds, and a 10 MB body is
refused (413) after reading at most the limit, while the streams in flight go on.

  * Without an API key the server listens on loopback only (serve.py refuses any other address), and it
    answers only Host names that are loopback (localhost, 127.x.x.x, [::1]): a web page cannot reach it
    through DNS rebinding (its own name resolved to 127.0.0.1), since its requests carry that name.
  * With a key, every /v1 request must carry it as 'Authorization: Bearer KEY', compared in constant time.
  * A body over `max_body` bytes is refused: by its Content-Length at once, or while it streams in.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "localhost.")


def error_json(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, its type by the status."""
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else kind
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def refuse(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_json(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port ('[::1]:8000' -> '::1', 'localhost:8000' -> 'localhost')."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def is_loopback_name(name: str) -> bool:
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def header(scope: Scope, name: bytes) -> str:
    found = [value for key, value in scope.get("headers", []) if key.lower() == name]
    return found[0].decode("latin-1") if found else ""


class Gate:
    """The ASGI middleware in front of the app: Host, key and body size, checked in that order."""

    def __init__(self, app: App, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.host_problem(scope) or self.key_problem(scope)
        if problem:
            return await refuse(send, *problem)
        declared = header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body:
            return await refuse(send, *self.too_large())
        body, more = await self.read_body(receive)
        if more is None:
            return await refuse(send, *self.too_large())
        await self.app(scope, self.replay(body, more, receive), send)

    def host_problem(self, scope: Scope) -> tuple[int, str, str] | None:
        if self.expected:  # a key guards the server: the Host may be any name it is reached by
            return None
        name = host_name(header(scope, b"host"))
        if is_loopback_name(name):
            return None
        return (
            400,
            f"Host {name!r}: this server answers loopback names only (localhost, 127.0.0.1, [::1]); "
            "start it with --api-key to serve other names",
            "invalid_host",
        )

    def key_problem(self, scope: Scope) -> tuple[int, str, str] | None:
        if not self.expected or not scope["path"].startswith("/v1"):
            return None
        given = header(scope, b"authorization")
        if hmac.compare_digest(given.encode("latin-1"), self.expected):  # in constant time: no guessing by timing
            return None
        words = "a wrong API key" if given else "no API key"
        return 401, f"{words}: send the server's key as 'Authorization: Bearer KEY'", "invalid_api_key"

    def too_large(self) -> tuple[int, str, str]:
        return 413, f"the request body is over this server's limit of {self.max_body:,} bytes; send less", "too_large"

    async def read_body(self, receive: Receive) -> tuple[bytes, Message | None]:
        """The body, read to its end or to the limit: (the body, the message that ended it, e.g. a disconnect),
        or (what came, None) where it passed the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return b"", None
            if not message.get("more_body", False):
                return b"".join(chunks), {}

    @staticmethod
    def replay(body: bytes, ended: Message, receive: Receive) -> Receive:
        """The app's receive: the body read here once, then what the client sends next (its disconnect)."""
        sent = False

        async def again() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return ended if ended else {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return again
