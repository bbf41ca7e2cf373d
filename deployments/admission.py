"""Admission: a replica refuses a request at once when the work ahead of it would keep it waiting too long.

Work is counted in full gathered batches (a request's larger share of the two batch limits, texts
and tokens), and the wait is that work at the pace of the replica's recent well-filled batches.
A refused client hears "busy, retry in N s" at once instead of timing out in a queue that never
drains. Plain Python: no Ray, no asyncio, no HTTP.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from deployments.errors import Overloaded

# Batches under this share of a full one do not teach the pace: small batches are mostly fixed cost
# per pass, so their pace would overstate the wait of a burst many times over.
_PACE_MIN_FULLNESS = 0.5


class Admission:
    """The queue-wait estimate of one replica and the decision to shed a request.

    ``max_queue_wait_s`` None admits everything; ``max_texts`` and ``max_tokens`` are the replica's
    gathered-batch limits, which define a full batch.
    """

    def __init__(self, max_queue_wait_s: float | None, max_texts: int, max_tokens: int) -> None:
        self.max_queue_wait_s = max_queue_wait_s
        self.max_texts = max_texts
        self.max_tokens = max_tokens
        self.pending_batches = 0.0
        """Admitted work not yet answered, in full batches."""
        self.batches_per_s: float | None = None
        """The pace of well-filled batches, in full batches per second; None until one ran."""

    def fullness(self, texts: int, tokens: int) -> float:
        """How much of a full gathered batch this much work is: its larger share of the two limits."""
        return max(texts / self.max_texts, tokens / self.max_tokens)

    @property
    def queue_wait_s(self) -> float:
        """Seconds of work queued or running, at the pace of well-filled batches.

        0 until a batch at least half full has run: a false "busy" is worse than a burst admitted
        on an optimistic guess, and the first full batch corrects it.
        """
        if not self.batches_per_s:
            return 0.0
        return self.pending_batches / self.batches_per_s

    def check(self) -> None:
        """Raise `Overloaded` when the work ahead would keep a new request waiting over ``max_queue_wait_s``."""
        limit = self.max_queue_wait_s
        wait = self.queue_wait_s
        if limit is not None and wait > limit:
            raise Overloaded(
                f"the replica is busy: about {wait:.1f} s of work is queued ahead (max_queue_wait_s {limit:g}); "
                "retry after Retry-After seconds",
                retry_after_s=max(1, math.ceil(wait - limit)),
            )

    @contextlib.contextmanager
    def admitted(self, share: float) -> Iterator[None]:
        """Check, then count ``share`` of a batch as pending until the block ends, however it ends.

        Checking and counting happen with no await between them, so concurrent requests on one
        event loop are admitted one at a time.
        """
        self.check()
        self.pending_batches += share
        try:
            yield
        finally:
            self.pending_batches = max(0.0, self.pending_batches - share)

    def record_batch(self, texts: int, tokens: int, seconds: float) -> None:
        """Learn the pace from a batch that took ``seconds``, if it was full enough to tell."""
        fullness = self.fullness(texts, tokens)
        if seconds <= 0 or fullness < _PACE_MIN_FULLNESS:
            return
        pace = fullness / seconds
        # A moving average over the last few full batches: follows a slowdown (a replica starting beside
        # this one, longer texts) within a few batches without jumping on one odd batch.
        self.batches_per_s = pace if self.batches_per_s is None else 0.7 * self.batches_per_s + 0.3 * pace
