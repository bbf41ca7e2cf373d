"""The error vocabulary of the core.

Transports (HTTP, Ray Data, CLI) map these to their own conventions in one place each;
the core only says *what* went wrong, naming the bad field or value and what is allowed.
"""

from __future__ import annotations


class SentimentError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(SentimentError, ValueError):
    """A caller passed input the model cannot take (wrong type, too large, ...)."""


class ModelLoadError(SentimentError, RuntimeError):
    """The checkpoint could not be found, downloaded or loaded safely."""


class DeviceMemoryError(SentimentError, MemoryError):
    """An input did not fit in the device's memory even alone.

    The classifier splits a forward pass that runs out of GPU memory and retries the halves, so
    only an input that alone does not fit ends here; the message says what to change.
    """
