"""The HTTP routes of a replica, and the one table that turns every error into an HTTP answer.

Transport only: the model work is the engine's ``classify`` (`deployments.replica.SentimentServer`
in a replica, anything with the `Engine` shape in a test). The engine, the core and the
middlewares raise errors that say what went wrong (`sentiment.errors`, `deployments.errors`);
`ERRORS` alone says how each is answered, as text-embeddings-inference's ``From<TextEmbeddingsError>``
-> ``ErrorType`` -> ``StatusCode`` does. Every error leaves as ``{"error": ..., "error_type": ...}``,
and bad input never reaches the model.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import Discriminator, Tag
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from deployments.args import ServeArgs
from deployments.errors import (
    BackendFailure,
    EmptyInput,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    TooLarge,
    Unauthorized,
    Unhealthy,
)
from deployments.metrics import EndpointMetrics, StageTimes
from deployments.middleware import ApiKey, BodySizeLimit, RequestMetrics
from deployments.openapi import TIMING_HEADERS, document, error_responses
from deployments.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorType,
    InferenceRequest,
    InfoResponse,
    LabelScore,
    ModelCard,
    ModelList,
    PredictionBody,
    PredictRequest,
    VllmClassification,
    VllmClassifyRequest,
    VllmClassifyResponse,
    VllmUsage,
)
from sentiment.config import LongTextStrategy
from sentiment.errors import DeviceMemoryError, InvalidInputError, ModelLoadError, SentimentError
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
        self, texts: Sequence[str], long_text: LongTextStrategy | None = None, *, field: str = "texts", cut: bool = True
    ) -> tuple[list[Prediction], StageTimes]: ...


ERRORS: dict[type[Exception], tuple[int, ErrorType]] = {
    # The request's input (the serve layer's checks first: they subclass InvalidInputError).
    MalformedBody: (400, ErrorType.MALFORMED),
    EmptyInput: (400, ErrorType.EMPTY),
    TooLarge: (413, ErrorType.TOO_LARGE),
    InvalidInputError: (422, ErrorType.VALIDATION),
    # The core's other words: a text too big for the device even alone is the request's size; a
    # model that could not load, or anything else the core refused on purpose, is the backend
    # failing this request (TEI's 424), never a bug of this server's (500).
    DeviceMemoryError: (413, ErrorType.TOO_LARGE),
    ModelLoadError: (424, ErrorType.BACKEND),
    SentimentError: (424, ErrorType.BACKEND),
    # The serve layer's.
    Unauthorized: (401, ErrorType.UNAUTHORIZED),
    MethodNotAllowed: (405, ErrorType.NOT_FOUND),
    NotFound: (404, ErrorType.NOT_FOUND),
    Overloaded: (503, ErrorType.OVERLOADED),
    Unhealthy: (503, ErrorType.UNHEALTHY),
    BackendFailure: (424, ErrorType.BACKEND),
    # Anything else is a bug in this server; the replica keeps serving.
    Exception: (500, ErrorType.INTERNAL),
}
"""Status and ``error_type`` of each error; an error takes the row of its nearest class.

Overload has two answers, both 503 with ``Retry-After``: the replica's JSON ``overloaded`` error
when its own queue is too long (`ServeArgs.max_queue_wait_s`), and Serve's HTTP proxy's plain-text
body when every replica is at ``max_ongoing_requests`` and ``max_queued_requests`` more wait at the
proxy (the app never sees those requests, so it cannot shape that answer).
"""


def error_status(error: Exception) -> tuple[int, ErrorType]:
    """The row of `ERRORS` that answers ``error``."""
    for cls in type(error).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return ERRORS[Exception]


def error_response(error: Exception) -> JSONResponse:
    """The answer to ``error``: its status from `ERRORS`, the JSON error body, and the headers it calls for."""
    status, error_type = error_status(error)
    # An unexpected error's text may hold internals; its class name is enough to find it in the logs.
    message = f"internal error: {type(error).__name__}" if status == 500 else str(error)
    headers: dict[str, str] = {}
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, Overloaded):
        headers["Retry-After"] = str(error.retry_after_s)
    elif isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    return JSONResponse({"error": message, "error_type": error_type.value}, status_code=status, headers=headers)


# Smallest positive float: a probability that underflowed to 0 gets a finite log (JSON has no -inf).
_TINY = 5e-324
# Worst case bytes per character in a JSON string: a \uXXXX escape of each half of a surrogate pair.
_JSON_BYTES_PER_CHAR = 12
# TEI's truncation_direction: cutting on the right keeps the head of the text.
_DIRECTIONS: dict[str, LongTextStrategy] = {"left": "tail", "right": "head"}
_CLASSIFY_ERRORS = error_responses(400, 413, 422, 424, 503)


def _body_kind(body: Any) -> str:
    # vLLM's body names its texts "input"; ours "text" or "texts". Chosen before validating, so that
    # a bad body's errors speak of the fields its sender meant.
    return "vllm" if isinstance(body, dict) and "input" in body else "own"


_BODY_KINDS = ("own", "vllm")
OwnOrVllmRequest = Annotated[
    Annotated[ClassifyRequest, Tag("own")] | Annotated[VllmClassifyRequest, Tag("vllm")], Discriminator(_body_kind)
]


def create_api(server: Engine) -> FastAPI:
    """The FastAPI app of one replica; its routes close over ``server``."""
    app = FastAPI(
        title="Sentiment classifier",
        summary=f"{server.args.model.model_id}: labels {', '.join(server.classifier.labels)}",
        version="1",
    )
    args = server.args
    max_body = args.max_texts_per_request * args.max_chars_per_text * _JSON_BYTES_PER_CHAR + 64 * 1024
    # The last added runs first: every request is counted, refusals too; the key is checked before the size.
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body, respond=error_response)
    app.add_middleware(ApiKey, key=server.api_key, respond=error_response)
    app.add_middleware(RequestMetrics, metrics=server.metrics)
    document(app, args, server.api_key)

    async def answer(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    # Every class of the table (Exception's handler answers, then lets the server log the bug).
    for error_class in ERRORS:
        app.add_exception_handler(error_class, answer)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_from_validation_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(_from_http_exception(exc, app, request))

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

    @app.get(
        "/readyz", summary="Readiness: 200 once the model is loaded and warmed up.", responses=error_responses(503)
    )
    async def readyz() -> dict[str, str]:
        if not server.healthy:
            raise Unhealthy("the model failed on its last batches; Serve will replace this replica")
        return {"status": "ready"}

    @app.get(
        "/info", summary="What runs: model, labels, limits, precision, device, batching.", responses=error_responses()
    )
    async def info() -> InfoResponse:
        return InfoResponse(**server.info())

    @app.post(
        "/v1/classify",
        summary="Classify one text or a list of texts (this server's body, or vLLM's classify body).",
        responses={200: {"headers": TIMING_HEADERS}, **_CLASSIFY_ERRORS, **error_responses(404)},
    )
    async def classify(body: OwnOrVllmRequest, response: Response) -> ClassifyResponse | VllmClassifyResponse:
        if isinstance(body, VllmClassifyRequest):
            return await classify_vllm(body, response)
        field, texts = ("texts", body.texts) if body.texts is not None else ("text", [body.text or ""])
        predictions = await _classified(server, response, texts, field, body.long_text)
        return ClassifyResponse(
            model=args.model.model_id,
            predictions=[PredictionBody(**p.to_dict()) for p in predictions],
        )

    @app.post(
        "/classify",
        summary="vLLM's classify protocol: probabilities in the model's label order, token usage.",
        responses={200: {"headers": TIMING_HEADERS}, **_CLASSIFY_ERRORS, **error_responses(404)},
    )
    async def classify_vllm(body: VllmClassifyRequest, response: Response) -> VllmClassifyResponse:
        if body.model is not None and body.model != args.model.model_id:
            raise NotFound(f"model {body.model!r} is not served here; this server serves {args.model.model_id!r}")
        texts = [body.input] if isinstance(body.input, str) else body.input
        predictions = await _classified(server, response, texts, "input", single=isinstance(body.input, str))
        labels = server.classifier.labels
        tokens = sum(p.num_tokens for p in predictions)
        return VllmClassifyResponse(
            id=f"classify-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=args.model.model_id,
            data=[
                VllmClassification(
                    index=index, label=p.label, probs=[p.scores[label] for label in labels], num_classes=len(labels)
                )
                for index, p in enumerate(predictions)
            ],
            usage=VllmUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    created = int(time.time())

    @app.get(
        "/v1/models", summary="The served model, in OpenAI's list shape (as vLLM answers).", responses=error_responses()
    )
    async def models() -> ModelList:
        model_id = args.model.model_id
        card = ModelCard(id=model_id, created=created, root=model_id, max_model_len=server.classifier.max_length)
        return ModelList(data=[card])

    @app.post(
        "/predict",
        summary="text-embeddings-inference compatible: every label with its score, most probable first.",
        responses={200: {"headers": TIMING_HEADERS}, **_CLASSIFY_ERRORS},
    )
    async def predict(body: PredictRequest, response: Response) -> list[LabelScore] | list[list[LabelScore]]:
        single = isinstance(body.inputs, str)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        cut = body.truncate is not False
        long_text = _DIRECTIONS.get((body.truncation_direction or "").lower()) if cut else None
        predictions = await _classified(server, response, texts, "inputs", long_text, cut=cut)
        ranked = [_ranked(p, log=body.raw_scores) for p in predictions]
        return ranked[0] if single else ranked

    @app.post(
        "/",
        summary="Hugging Face Inference API compatible (what huggingface_hub.InferenceClient posts).",
        responses={200: {"headers": TIMING_HEADERS}, **_CLASSIFY_ERRORS},
    )
    async def inference(body: InferenceRequest, response: Response) -> list[list[LabelScore]]:
        function = body.parameters.function_to_apply or "softmax"
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        predictions = await _classified(server, response, texts, "inputs")
        top_k = body.parameters.top_k
        return [_ranked(p, log=function == "none")[:top_k] for p in predictions]

    return app


async def _classified(
    server: Engine,
    response: Response,
    texts: list[str],
    field: str,
    long_text: LongTextStrategy | None = None,
    *,
    cut: bool = True,
    single: bool | None = None,
) -> list[Prediction]:
    """The engine's predictions for texts within the limits; on success, TEI's timing headers (ms) and histograms.

    ``field`` names the texts in errors: ``field[i]``, or ``field`` alone where ``single`` (default: a
    field other than ``texts`` and ``inputs`` holds one text).
    """
    started = time.perf_counter()
    checked = _checked(texts, field, server.args, single)
    predictions, times = await server.classify(checked, long_text, field=field, cut=cut)
    seconds = {
        "total": time.perf_counter() - started,
        "tokenization": times.tokenization,
        "queue": times.queue,
        "inference": times.inference,
    }
    for stage, value in seconds.items():
        response.headers[f"x-{stage}-time"] = str(round(value * 1000))
    server.metrics.record_stages(seconds)
    return predictions


def _checked(texts: list[str], field: str, limits: ServeArgs, single: bool | None = None) -> list[str]:
    """The texts, if within the limits; else the error naming the field (see `_classified`) and the limit."""
    if not texts:
        raise EmptyInput(f"{field} is empty; give at least one text")
    if len(texts) > limits.max_texts_per_request:
        raise TooLarge(f"{field} has {len(texts)} texts; at most {limits.max_texts_per_request} per request")
    if single is None:
        single = field not in ("texts", "inputs")
    for index, text in enumerate(texts):
        name = field if single or (field == "inputs" and len(texts) == 1) else f"{field}[{index}]"
        if len(text) > limits.max_chars_per_text:
            raise TooLarge(f"{name} has {len(text)} characters; at most {limits.max_chars_per_text} per text")
        if not text.strip():
            raise EmptyInput(f"{name} is empty")
    return texts


def _ranked(prediction: Prediction, log: bool) -> list[LabelScore]:
    pairs = sorted(prediction.scores.items(), key=lambda item: item[1], reverse=True)
    return [LabelScore(label=label, score=math.log(max(p, _TINY)) if log else p) for label, p in pairs]


def _from_http_exception(exc: HTTPException, app: FastAPI, request: Request) -> Exception:
    """Starlette's and FastAPI's own refusals, in this server's words."""
    if exc.status_code == 404:
        return NotFound(str(exc.detail))
    if exc.status_code == 405:
        # RFC 9110: a 405 lists every method the path takes. Starlette names only those of the first
        # route that matched the path, and "/" has two (the page's GET, the Inference API's POST).
        return MethodNotAllowed(str(exc.detail), _methods(app, request))
    # FastAPI's other refusal: a body it could not read as JSON (not UTF-8, say) is 400.
    return MalformedBody(f"body is not valid JSON: {exc.detail}")


def _methods(app: FastAPI, request: Request) -> list[str]:
    """The methods of every route whose path matches the request's."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _from_validation_errors(errors: Any) -> InvalidInputError:
    """One error naming every bad field: ``texts[2]: Input should be a valid string``."""
    lines = []
    for item in errors:
        at_body = [part for part in item.get("loc", ()) if part not in _BODY_KINDS] == ["body"]
        if at_body and isinstance(item.get("input"), bytes | str):
            # FastAPI parses JSON only when the Content-Type says so; otherwise the body arrives as bytes.
            return MalformedBody("body is not a JSON object; send JSON with Content-Type: application/json")
        if item.get("type") == "json_invalid":
            return MalformedBody(f"body is not valid JSON: {item.get('ctx', {}).get('error', item['msg'])}")
        location = _location(item.get("loc", ()))
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(
            f"{location}: {message}" if location != "body" or item.get("type") != "missing" else "body is missing"
        )
    return InvalidInputError("; ".join(lines) or "invalid request")


def _location(loc: Any) -> str:
    # The tag of the body's kind (`OwnOrVllmRequest`) is no field clients wrote either.
    parts = [part for part in loc if part != "body" and part not in _BODY_KINDS]
    # Unions add the branch's type name ("str", "list[str]") to the location; clients did not write it.
    parts = [
        part for part in parts if not (isinstance(part, str) and ("[" in part or part in ("str", "function-after")))
    ]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"
