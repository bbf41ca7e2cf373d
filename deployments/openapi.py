"""The replica's OpenAPI document: what each error status means, and the post-processing that makes it this server's.

FastAPI builds the document from the routes and the bodies (`deployments.schemas`); here the
routes get their error responses and timing headers, and `document` writes one server's request
limits and API key into it, so that ``/openapi.json`` promises exactly what the routes do.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from deployments.args import ServeArgs
from deployments.middleware import needs_key
from deployments.schemas import ErrorBody, document_limits

# What each error status means, as the OpenAPI document says it; every route lists those it can answer.
STATUS_MEANINGS = {
    400: "The body is not JSON, or a text is empty (`malformed`, `empty`).",
    401: "Missing or wrong API key (`unauthorized`); only when the server requires one.",
    413: (
        "Over a size limit: texts per request, characters per text, body bytes, tokens with truncate: false, "
        "or one text too big for the GPU (`too_large`)."
    ),
    404: "The `model` a vLLM classify body names is not the one this server serves (`not_found`).",
    422: "A field is missing, null, of the wrong type or not an allowed value (`validation`).",
    424: "The model failed on this well-formed request (`backend`).",
    503: (
        "Busy (`overloaded`, with Retry-After: the replica's queue holds more than max_queue_wait_s of work) "
        "or not ready (`unhealthy`). Serve's proxy also answers 503 with Retry-After, in plain text, when every "
        "replica is full and max_queued_requests more wait."
    ),
}
TIMING_HEADERS = {
    f"x-{stage}-time": {"description": f"Milliseconds {what}.", "schema": {"type": "integer"}}
    for stage, what in (
        ("total", "from the parsed request to the answer"),
        ("tokenization", "spent tokenizing"),
        ("queue", "waiting for a batch"),
        ("inference", "in the model (the whole gathered batch)"),
    )
}
"""TEI's timing headers, which every classify answer carries."""


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses (plus 401, which every guarded route can answer)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in sorted({401, *statuses}):
        documented[status] = {"model": ErrorBody, "description": STATUS_MEANINGS[status]}
        if status == 503:
            documented[status]["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            }
    return documented


def document(app: FastAPI, args: ServeArgs, api_key: str | None) -> None:
    """Make ``/openapi.json`` this server's: its request limits, and its API key as a bearer scheme.

    Without a key, no route answers 401, so the document promises none.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            document_limits(schema, args.max_texts_per_request, args.max_chars_per_text)
            if api_key:
                schemes = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema.setdefault("components", {})["securitySchemes"] = schemes
                for path, operations in schema["paths"].items():
                    for method, operation in operations.items():
                        if needs_key(method, path):
                            operation["security"] = [{"bearer": []}]
            else:
                for operations in schema["paths"].values():
                    for operation in operations.values():
                        operation.get("responses", {}).pop("401", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
