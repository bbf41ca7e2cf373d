"""The error vocabulary of the core.

Transports (HTTP, Ray Data, CLI) map these to their own conventions in one place each;
the core only says *what* went wrong, naming the bad field or value and what is allowed.
"""

from __future__ import annotations

from typing import Any


class SentimentError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(SentimentError, ValueError):
    """A caller passed input the model cannot take (wrong type, too large, ...)."""


class ModelLoadError(SentimentError, RuntimeError):
    """The checkpoint could not be found, downloaded or loaded safely."""


class DeviceMemoryError(SentimentError, MemoryError):
    """Some inputs did not fit in the device's memory even one at a time; the others have results.

    The classifier splits a forward pass that runs out of GPU memory and retries the halves, so
    only an input that alone does not fit ends here. ``failed`` are the indices of those inputs
    (of the sequences, or of the texts, by the method that raised); ``partial`` holds the results
    of the call with None (or zeros) at those indices, so a caller can answer everything else.
    """

    def __init__(self, message: str, failed: list[int], partial: Any) -> None:
        super().__init__(message)
        self.failed = failed
        self.partial = partial
