"""The HTTP error vocabulary: one table from error type to status code, one JSON body shape.

Modelled on Hugging Face text-embeddings-inference, whose clients already parse
``{"error": "...", "error_type": "..."}``. TEI answers its validation errors with 413; here a
malformed or mistyped field is 422 (what FastAPI clients expect) and only a request over a
size limit is 413.
"""

from __future__ import annotations

from enum import Enum

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ErrorType(str, Enum):
    """What went wrong, as clients see it in ``error_type``."""

    MALFORMED = "malformed"
    """The body is not JSON."""
    VALIDATION = "validation"
    """A field is missing, null, of the wrong type or not an allowed value."""
    EMPTY = "empty"
    """No texts, or an empty text."""
    TOO_LARGE = "too_large"
    """More texts, characters or bytes than the configured limits allow."""
    UNAUTHORIZED = "unauthorized"
    """The API key is missing or wrong."""
    NOT_FOUND = "not_found"
    """No such route, or the route does not take this method."""
    BACKEND = "backend"
    """The model failed on a well-formed request."""
    UNHEALTHY = "unhealthy"
    """The replica is not ready (still warming up, or its model keeps failing)."""
    OVERLOADED = "overloaded"
    """The replica's queue already holds more work than it runs in `ServeArgs.max_queue_wait_s`; retry later."""
    INTERNAL = "internal"
    """A bug in this server; the replica keeps serving."""


STATUS: dict[ErrorType, int] = {
    ErrorType.MALFORMED: 400,
    ErrorType.VALIDATION: 422,
    ErrorType.EMPTY: 400,
    ErrorType.TOO_LARGE: 413,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.NOT_FOUND: 404,
    ErrorType.BACKEND: 424,
    ErrorType.UNHEALTHY: 503,
    ErrorType.OVERLOADED: 503,
    ErrorType.INTERNAL: 500,
}
"""Status code of each error type; TEI's table plus the HTTP-only cases (401, 404).

Overload has two answers, both 503 with ``Retry-After``: the replica's JSON ``overloaded`` error
when its own queue is too long (`ServeArgs.max_queue_wait_s`), and Serve's HTTP proxy's plain-text
body when every replica is at ``max_ongoing_requests`` and ``max_queued_requests`` more wait at the
proxy (the app never sees those requests, so it cannot shape that answer).
"""


class ApiError(HTTPException):
    """An error the HTTP layer answers with `STATUS[error_type]` and a JSON body.

    An `HTTPException`, so FastAPI lets it through unchanged when it is raised while the body is
    being read (by the body size guard).
    """

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.error_type = error_type
        self.message = message
        self.status = STATUS[error_type] if status is None else status
        if error_type is ErrorType.UNAUTHORIZED:
            headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
        super().__init__(status_code=self.status, detail=message, headers=headers)

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.message, "error_type": self.error_type.value}, status_code=self.status, headers=self.headers
        )
