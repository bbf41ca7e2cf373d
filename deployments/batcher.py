"""`Batcher`: gathers concurrent requests into batches for one model that runs a batch at a time.

Why not Serve's ``@serve.batch``: it forms the next batch from the requests that arrive within
``gather_wait_s`` of that batch's first one, then holds it until the running batch is done;
requests that arrive later go to the batch after. Under load, requests pile up while a batch runs,
so those batches stay small, and a lone request always waits the whole timeout. Measured with 16
closed-loop clients (bf16, 2 CPUs, BERT-base): 10 ms batches averaged 3 texts; a 100 ms wait filled
them, but then one client's requests each waited 100 ms.

This batcher takes the queue the moment the model is free: everything that arrived while the last
batch ran goes into the next one, within its two limits (texts and tokens), in arrival order. A
request that finds the model idle waits at most ``max_wait_s`` for company. Plain asyncio, no Ray.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger(__name__)


class Batcher(Generic[ItemT, ResultT]):
    """Runs ``run_batch`` on lists of submitted items, one batch at a time, in arrival order.

    Two limits, as text-embeddings-inference's queue has: ``max_texts`` and ``max_tokens`` per
    batch, each item counted by ``measure(item) -> (texts, tokens)``. A batch takes items from the
    front of the queue while both totals stay within their limits; an item over a limit on its own
    runs alone. ``run_batch`` returns one result per item; a result that is an exception is raised
    to that item's caller alone, and if ``run_batch`` raises, every item of that batch gets the
    exception.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Awaitable[Sequence[ResultT | BaseException]]],
        *,
        max_texts: int,
        max_tokens: int | None = None,
        measure: Callable[[ItemT], tuple[int, int]] = lambda item: (1, 0),
        max_wait_s: float = 0.0,
    ) -> None:
        if max_texts < 1:
            raise ValueError(f"max_texts must be at least 1, got {max_texts}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run_batch = run_batch
        self._measure = measure
        self.max_texts = max_texts
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self._queue: collections.deque[tuple[ItemT, asyncio.Future[ResultT]]] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def fits(self, texts: int, tokens: int) -> bool:
        """Whether a batch of this many texts and tokens is within both limits."""
        return texts <= self.max_texts and (self.max_tokens is None or tokens <= self.max_tokens)

    def totals(self, items: Sequence[ItemT]) -> tuple[int, int]:
        """Texts and tokens of ``items``."""
        measured = [self._measure(item) for item in items]
        return sum(texts for texts, _ in measured), sum(tokens for _, tokens in measured)

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the running one)."""
        return len(self._queue)

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its result. Cancelling the caller drops the item if it has not run."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            # Started lazily, on the event loop that serves requests (a Serve replica's constructor
            # runs on another loop).
            self._worker = loop.create_task(self._work())
            self._worker.add_done_callback(_log_failure)
        return await future

    async def _work(self) -> None:
        while True:
            if not self._queue:
                # Idle: the next request waits briefly for company. Requests that arrive while a
                # batch runs need no wait: they are all taken the moment it ends.
                self._arrived.clear()
                await self._arrived.wait()
                await self._gather()
            batch = self._take()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await self._run_batch(items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _gather(self) -> None:
        """Wait up to ``max_wait_s`` for more items, or until the queue fills a batch."""
        if self.max_wait_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while not self._full(self._pending()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _full(self, items: Sequence[ItemT]) -> bool:
        """Whether ``items`` reach a limit (no further item could join them)."""
        texts, tokens = self.totals(items)
        return texts >= self.max_texts or (self.max_tokens is not None and tokens >= self.max_tokens)

    def _pending(self) -> list[ItemT]:
        return [item for item, future in self._queue if not future.done()]

    def _take(self) -> list[tuple[ItemT, asyncio.Future[ResultT]]]:
        """The longest front of the queue within both limits (at least one item); skips cancelled callers."""
        batch: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        texts = tokens = 0
        while self._queue:
            item, future = self._queue[0]
            if future.done():  # the caller went away before its turn
                self._queue.popleft()
                continue
            item_texts, item_tokens = self._measure(item)
            if batch and not self.fits(texts + item_texts, tokens + item_tokens):
                break
            self._queue.popleft()
            batch.append((item, future))
            texts, tokens = texts + item_texts, tokens + item_tokens
        return batch


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("The batching loop stopped; the next request restarts it", exc_info=task.exception())
