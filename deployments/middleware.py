"""Three pure ASGI middlewares of a replica's app: request metrics, the API key, the body size limit.

They run before routing, so a missing key or an oversized body is refused before the body is
read. They raise no HTTP errors of their own making: a refusal is a `deployments.errors` error
that ``respond`` (the routes' error table, handed in) turns into the answer.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import TooLarge, Unauthorized
from deployments.metrics import EndpointMetrics

Respond = Callable[[Exception], ASGIApp]
"""Turns an error into the ASGI app that answers it (`deployments.routes.error_response`)."""

# Liveness must answer without a key (Kubernetes probes send none).
_OPEN_PATHS = ("/healthz",)
# The demo page holds no secrets and no data; it must load without a key so that it can ask for one.
# Everything it fetches (/info, /v1/classify) still needs the key.
_OPEN_PAGES = ("/",)


def needs_key(method: str, path: str) -> bool:
    """Whether a request needs the API key (when the server has one); ``path`` below the route prefix."""
    is_page = method.upper() in ("GET", "HEAD") and path in _OPEN_PAGES
    return path not in _OPEN_PATHS and not is_page


class RequestMetrics:
    """Counts every answered request by route template and status, refusals by the other middlewares too."""

    def __init__(self, app: ASGIApp, metrics: EndpointMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = relative_path(scope)
        # An exception nobody handled is answered 500 by Starlette outside this middleware.
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            # Route templates, not raw paths, keep the metric's label values few. The router writes the
            # matched route into the scope, which is the same dict all along.
            route = getattr(scope.get("route"), "path", None) or (path if "endpoint" in scope else "unmatched")
            self.metrics.record_request(route, status)


class ApiKey:
    """Refuses a request without ``Authorization: Bearer <key>`` on every path that `needs_key`."""

    def __init__(self, app: ASGIApp, key: str | None, respond: Respond) -> None:
        self.app = app
        self.key = key
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key and needs_key(scope.get("method", ""), relative_path(scope)):
            scheme, _, given = _header(scope, b"authorization").partition(" ")
            # Constant-time comparison: response timing must not reveal how much of a guess matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
                refusal = Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")
                await self.respond(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Refuses a body over ``max_body_bytes``: by its Content-Length at once, or as it grows past the limit.

    Chunked uploads have no Content-Length. When one grows past the limit, this answers 413 itself
    and tells the app the client went away; whatever the app answers to that is dropped.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, respond: Respond) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length.isdigit() and int(length) > self.max_body_bytes:
            refusal = TooLarge(f"body has {length} bytes; at most {self.max_body_bytes}")
            await self.respond(refusal)(scope, receive, send)
            return
        received = 0
        refused = False

        async def receive_limited() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    await self.respond(TooLarge(f"body exceeds {self.max_body_bytes} bytes"))(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, receive_limited, send_unless_refused)


def relative_path(scope: Scope) -> str:
    """The request path below the application's route prefix."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _header(scope: Scope, name: bytes) -> str:
    """The value of one request header ('' when absent; the last one when it is sent twice)."""
    found = ""
    for key, value in scope["headers"]:
        if key.lower() == name:
            found = value.decode("latin-1")
    return found
