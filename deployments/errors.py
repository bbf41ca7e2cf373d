"""The errors the serve layer raises itself, beside the core's (`sentiment.errors`).

Plain exceptions that say what went wrong, in words for the client; none knows a status code.
The routes turn every one of them, and the core's whole `SentimentError` family, into an HTTP
answer through one table (`deployments.routes.ERRORS`).
"""

from __future__ import annotations

from sentiment.errors import InvalidInputError


class MalformedBody(InvalidInputError):
    """The request body is not JSON (or not sent as JSON)."""


class EmptyInput(InvalidInputError):
    """A request holds no text, or a text with nothing but whitespace."""


class TooLarge(InvalidInputError):
    """A request over a size limit: texts per request, characters per text, body bytes, or tokens uncut."""


class ServeError(Exception):
    """Base of the serve layer's errors that are not about the request's input."""


class Unauthorized(ServeError):
    """The API key is missing or wrong."""


class NotFound(ServeError):
    """No route has this path."""


class MethodNotAllowed(NotFound):
    """A route has this path, but not for this method."""

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed
        """Every method the path takes."""


class Overloaded(ServeError):
    """The replica holds more queued work than it runs within `ServeArgs.max_queue_wait_s`."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """Whole seconds after which the queue should have room again (at least 1)."""


class Unhealthy(ServeError):
    """The replica cannot serve: its model keeps failing, so Serve will replace it."""


class BackendFailure(ServeError):
    """The model failed on a well-formed request."""
