"""The HTTP routes of a replica: parse and check requests, call the server, shape answers.

Transport only: the model work is the engine's ``classify`` (`deployments.app.SentimentServer` in a
replica, anything with the `Engine` shape in a test). Every error leaves as
``{"error": ..., "error_type": ...}`` with the status from `deployments.errors.STATUS`, and
bad input never reaches the model.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from deployments.args import ServeArgs
from deployments.errors import ApiError, ErrorType
from deployments.metrics import EndpointMetrics, StageTimes
from deployments.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    InferenceRequest,
    InfoResponse,
    LabelScore,
    PredictionBody,
    PredictRequest,
    document_limits,
)
from sentiment.config import LongTextStrategy
from sentiment.model import Prediction, SentimentClassifier


class Engine(Protocol):
    """What the routes use of a replica: its args, classifier, key and metrics, health, info and classify."""

    args: ServeArgs
    classifier: SentimentClassifier
    api_key: str | None
    metrics: EndpointMetrics

    @property
    def healthy(self) -> bool: ...

    def info(self) -> dict[str, Any]: ...

    async def classify(
        self,
        texts: Sequence[str],
        long_text: LongTextStrategy | None = None,
        *,
        field: str = "texts",
        cut: bool = True,
        times: StageTimes | None = None,
    ) -> list[Prediction]: ...


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Smallest positive float: a probability that underflowed to 0 gets a finite log (JSON has no -inf).
_TINY = 5e-324
# Worst case bytes per character in a JSON string: a \uXXXX escape of each half of a surrogate pair.
_JSON_BYTES_PER_CHAR = 12
_OPEN_PATHS = ("/healthz",)
# The demo page holds no secrets and no data; it must load without a key so that it can ask for one.
# Everything it fetches (/info, /v1/classify) still needs the key.
_OPEN_PAGES = ("/",)
# TEI's truncation_direction: cutting on the right keeps the head of the text.
_DIRECTIONS: dict[str, LongTextStrategy] = {"left": "tail", "right": "head"}

# What each error status means, as the OpenAPI document says it; every route lists those it can answer.
_STATUS_MEANINGS = {
    400: "The body is not JSON, or a text is empty (`malformed`, `empty`).",
    401: "Missing or wrong API key (`unauthorized`); only when the server requires one.",
    413: (
        "Over a size limit: texts per request, characters per text, body bytes, tokens with truncate: false, "
        "or one text too big for the GPU (`too_large`)."
    ),
    422: "A field is missing, null, of the wrong type or not an allowed value (`validation`).",
    424: "The model failed on this well-formed request (`backend`).",
    503: (
        "Busy (`overloaded`, with Retry-After: the replica's queue holds more than max_queue_wait_s of work) "
        "or not ready (`unhealthy`). Serve's proxy also answers 503 with Retry-After, in plain text, when every "
        "replica is full and max_queued_requests more wait."
    ),
}
_TIMING_HEADERS = {
    f"x-{stage}-time": {"description": f"Milliseconds {what}.", "schema": {"type": "integer"}}
    for stage, what in (
        ("total", "from the parsed request to the answer"),
        ("tokenization", "spent tokenizing"),
        ("queue", "waiting for a batch"),
        ("inference", "in the model (the whole gathered batch)"),
    )
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses (plus 401, which every guarded route can answer)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in sorted({401, *statuses}):
        documented[status] = {"model": ErrorBody, "description": _STATUS_MEANINGS[status]}
        if status == 503:
            documented[status]["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            }
    return documented


_CLASSIFY_ERRORS = _errors(400, 413, 422, 424, 503)


def create_api(server: Engine) -> FastAPI:
    """The FastAPI app of one replica; its routes close over ``server``."""
    app = FastAPI(
        title="Sentiment classifier",
        summary=f"{server.args.model.model_id}: labels {', '.join(server.classifier.labels)}",
        version="1",
    )
    args = server.args
    max_body = args.max_texts_per_request * args.max_chars_per_text * _JSON_BYTES_PER_CHAR + 64 * 1024
    app.add_middleware(_Guard, server=server, max_body_bytes=max_body)
    _document(app, server)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _from_validation_errors(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error_type = ErrorType.NOT_FOUND if exc.status_code in (404, 405) else ErrorType.VALIDATION
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # RFC 9110: a 405 lists every method the path takes. Starlette names only those of the first
            # route that matched the path, and "/" has two (the page's GET, the Inference API's POST).
            headers["Allow"] = ", ".join(_methods(app, request))
        return ApiError(error_type, str(exc.detail), status=exc.status_code, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(ErrorType.INTERNAL, f"internal error: {type(exc).__name__}").response()

    # Read once per replica when the app is built, not at import time.
    page = resources.files("deployments").joinpath("static", "index.html").read_text(encoding="utf-8")

    @app.get(
        "/",
        response_class=HTMLResponse,
        summary="The live demo page (HTML; no external resources).",
        responses={200: {"content": {"text/html": {}}}},
    )
    async def demo_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness: the replica answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once the model is loaded and warmed up.", responses=_errors(503))
    async def readyz() -> dict[str, str]:
        if not server.healthy:
            raise ApiError(ErrorType.UNHEALTHY, "the model failed on its last batches; Serve will replace this replica")
        return {"status": "ready"}

    @app.get("/info", summary="What runs: model, labels, limits, precision, device, batching.", responses=_errors())
    async def info() -> InfoResponse:
        return InfoResponse(**server.info())

    @app.post(
        "/v1/classify",
        summary="Classify one text or a list of texts.",
        responses={200: {"headers": _TIMING_HEADERS}, **_CLASSIFY_ERRORS},
    )
    async def classify(body: ClassifyRequest, response: Response) -> ClassifyResponse:
        field, texts = ("texts", body.texts) if body.texts is not None else ("text", [body.text or ""])
        with _timed(server, response) as times:
            predictions = await server.classify(
                _checked(texts, field, server), body.long_text, field=field, times=times
            )
        return ClassifyResponse(
            model=args.model.model_id,
            predictions=[PredictionBody(**p.to_dict()) for p in predictions],
        )

    @app.post(
        "/predict",
        summary="text-embeddings-inference compatible: every label with its score, most probable first.",
        responses={200: {"headers": _TIMING_HEADERS}, **_CLASSIFY_ERRORS},
    )
    async def predict(body: PredictRequest, response: Response) -> list[LabelScore] | list[list[LabelScore]]:
        single = isinstance(body.inputs, str)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        cut = body.truncate is not False
        long_text = _DIRECTIONS.get((body.truncation_direction or "").lower()) if cut else None
        with _timed(server, response) as times:
            predictions = await server.classify(
                _checked(texts, "inputs", server), long_text, field="inputs", cut=cut, times=times
            )
        ranked = [_ranked(p, log=body.raw_scores) for p in predictions]
        return ranked[0] if single else ranked

    @app.post(
        "/",
        summary="Hugging Face Inference API compatible (what huggingface_hub.InferenceClient posts).",
        responses={200: {"headers": _TIMING_HEADERS}, **_CLASSIFY_ERRORS},
    )
    async def inference(body: InferenceRequest, response: Response) -> list[list[LabelScore]]:
        function = body.parameters.function_to_apply or "softmax"
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        with _timed(server, response) as times:
            predictions = await server.classify(_checked(texts, "inputs", server), field="inputs", times=times)
        top_k = body.parameters.top_k
        return [_ranked(p, log=function == "none")[:top_k] for p in predictions]

    return app


def _methods(app: FastAPI, request: Request) -> list[str]:
    """The methods of every route whose path matches the request's."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _document(app: FastAPI, server: Engine) -> None:
    """Make ``/openapi.json`` this server's: its request limits, and its API key as a bearer scheme."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document_limits(document, server.args.max_texts_per_request, server.args.max_chars_per_text)
            if server.api_key:
                schemes = {"bearer": {"type": "http", "scheme": "bearer"}}
                document.setdefault("components", {})["securitySchemes"] = schemes
                for path, operations in document["paths"].items():
                    for method, operation in operations.items():
                        if path not in _OPEN_PATHS and not (path in _OPEN_PAGES and method == "get"):
                            operation["security"] = [{"bearer": []}]
            else:
                for operations in document["paths"].values():
                    for operation in operations.values():
                        operation.get("responses", {}).pop("401", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@contextlib.contextmanager
def _timed(server: Engine, response: Response) -> Iterator[StageTimes]:
    """Time a classify call; on success, set TEI's timing headers (milliseconds) and record the histograms."""
    times = StageTimes()
    started = time.perf_counter()
    yield times
    seconds = {
        "total": time.perf_counter() - started,
        "tokenization": times.tokenization,
        "queue": times.queue,
        "inference": times.inference,
    }
    for stage, value in seconds.items():
        response.headers[f"x-{stage}-time"] = str(round(value * 1000))
    server.metrics.record_stages(seconds)


def _checked(texts: list[str], field: str, server: Engine) -> list[str]:
    """The texts, if within the limits; else the error naming the field and the limit."""
    limits = server.args
    if not texts:
        raise ApiError(ErrorType.EMPTY, f"{field} is empty; give at least one text")
    if len(texts) > limits.max_texts_per_request:
        raise ApiError(
            ErrorType.TOO_LARGE, f"{field} has {len(texts)} texts; at most {limits.max_texts_per_request} per request"
        )
    single = field != "texts" and field != "inputs"
    for index, text in enumerate(texts):
        name = field if single or (field == "inputs" and len(texts) == 1) else f"{field}[{index}]"
        if len(text) > limits.max_chars_per_text:
            raise ApiError(
                ErrorType.TOO_LARGE,
                f"{name} has {len(text)} characters; at most {limits.max_chars_per_text} per text",
            )
        if not text.strip():
            raise ApiError(ErrorType.EMPTY, f"{name} is empty")
    return texts


def _ranked(prediction: Prediction, log: bool) -> list[LabelScore]:
    pairs = sorted(prediction.scores.items(), key=lambda item: item[1], reverse=True)
    return [LabelScore(label=label, score=math.log(max(p, _TINY)) if log else p) for label, p in pairs]


def _from_validation_errors(errors: Any) -> ApiError:
    """One error naming every bad field: ``texts[2]: Input should be a valid string``."""
    lines = []
    for item in errors:
        if tuple(item.get("loc", ())) == ("body",) and isinstance(item.get("input"), bytes | str):
            # FastAPI parses JSON only when the Content-Type says so; otherwise the body arrives as bytes.
            return ApiError(
                ErrorType.MALFORMED, "body is not a JSON object; send JSON with Content-Type: application/json"
            )
        if item.get("type") == "json_invalid":
            return ApiError(
                ErrorType.MALFORMED, f"body is not valid JSON: {item.get('ctx', {}).get('error', item['msg'])}"
            )
        location = _location(item.get("loc", ()))
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(
            f"{location}: {message}" if location != "body" or item.get("type") != "missing" else "body is missing"
        )
    return ApiError(ErrorType.VALIDATION, "; ".join(lines) or "invalid request")


def _location(loc: Any) -> str:
    parts = [part for part in loc if part != "body"]
    # Unions add the branch's type name ("str", "list[str]") to the location; clients did not write it.
    parts = [
        part for part in parts if not (isinstance(part, str) and ("[" in part or part in ("str", "function-after")))
    ]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


class _Guard:
    """Pure ASGI middleware: API key check, body size limit, and the request counter.

    Runs before routing, so a missing key or an oversized body is refused before the body is read.
    """

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], server: Engine, max_body_bytes: int
    ) -> None:
        self.app = app
        self.server = server
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _relative_path(scope)
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            error = self._refusal(scope, path)
            if error is not None:
                await error.response()(scope, receive, send_counting)
                return
            await self.app(scope, self._limited(receive), send_counting)
        finally:
            # Route templates, not raw paths, keep the metric's label values few.
            route = getattr(scope.get("route"), "path", None) or (path if "endpoint" in scope else "unmatched")
            self.server.metrics.record_request(route, status)

    def _refusal(self, scope: Scope, path: str) -> ApiError | None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        key = self.server.api_key
        is_page = scope.get("method") in ("GET", "HEAD") and path in _OPEN_PAGES
        if key and path not in _OPEN_PATHS and not is_page:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # Constant-time comparison: response timing must not reveal how much of a guess matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return ApiError(ErrorType.UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return ApiError(ErrorType.TOO_LARGE, f"body has {length} bytes; at most {self.max_body_bytes}")
        return None

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that refuses a body growing past the limit (chunked uploads have no Content-Length)."""
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise ApiError(ErrorType.TOO_LARGE, f"body exceeds {self.max_body_bytes} bytes")
            return message

        return receive_limited


def _relative_path(scope: Scope) -> str:
    """The request path below the application's route prefix."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"
