"""`Batcher`: batches form from what queued while the model was busy, in arrival order, within both limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deployments.batcher import Batcher


class GatedModel:
    """A stand-in model that records each batch and holds it until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.fail_on: Any = None

    async def __call__(self, items: list[Any]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [f"result {item}" for item in items]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


async def settle() -> None:
    """Let every ready task run (submissions queue, the worker picks up)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_lone_request_runs_at_once_and_gets_its_result() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.gate.set()
        batcher = Batcher(model, max_texts=8)
        assert await batcher.submit("a") == "result a"
        assert model.batches == [["a"]]

    run(scenario)


def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch_in_order() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = Batcher(model, max_texts=8)
        first = asyncio.create_task(batcher.submit(0))
        await model.started.wait()
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await settle()
        assert batcher.queued == 5
        model.gate.set()
        assert await first == "result 0"
        assert await asyncio.gather(*rest) == [f"result {i}" for i in range(1, 6)]
        assert model.batches == [[0], [1, 2, 3, 4, 5]]

    run(scenario)


def test_batches_stop_at_the_size_limit_and_a_big_item_runs_alone_in_its_turn() -> None:
    async def scenario() -> None:
        model = GatedModel()
        # Items are token counts; a batch holds at most 4 tokens. The 10 is bigger than any batch.
        batcher = Batcher(model, max_texts=100, max_tokens=4, measure=lambda weight: (1, weight))
        first = asyncio.create_task(batcher.submit(1))
        await model.started.wait()
        queued = [asyncio.create_task(batcher.submit(w)) for w in (2, 2, 1, 10, 1, 3)]
        await settle()
        model.gate.set()
        await asyncio.gather(first, *queued)
        # Arrival order is kept: the 10 is not pushed behind later items, nor do they jump it.
        assert model.batches == [[1], [2, 2], [1], [10], [1, 3]]

    run(scenario)


def test_a_failing_batch_fails_its_callers_only() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.fail_on = "bad"
        batcher = Batcher(model, max_texts=2)
        first = asyncio.create_task(batcher.submit("ok"))
        await model.started.wait()
        failing = [asyncio.create_task(batcher.submit(x)) for x in ("x", "bad")]
        later = asyncio.create_task(batcher.submit("y"))
        await settle()
        model.gate.set()
        assert await first == "result ok"
        for task in failing:
            with pytest.raises(ValueError, match="bad item bad"):
                await task
        assert await later == "result y"
        assert model.batches == [["ok"], ["x", "bad"], ["y"]]

    run(scenario)


def test_a_cancelled_request_never_reaches_the_model() -> None:
    async def scenario() -> None:
        model = GatedModel()
        batcher = Batcher(model, max_texts=8)
        first = asyncio.create_task(batcher.submit("a"))
        await model.started.wait()
        gone = asyncio.create_task(batcher.submit("gone"))
        kept = asyncio.create_task(batcher.submit("b"))
        await settle()
        gone.cancel()
        model.gate.set()
        assert await asyncio.gather(first, kept) == ["result a", "result b"]
        assert model.batches == [["a"], ["b"]]

    run(scenario)


def test_an_idle_replica_waits_for_company_until_the_batch_is_full() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.gate.set()
        # The wait is far longer than the test's timeout: only a full batch can start it.
        batcher = Batcher(model, max_texts=3, max_wait_s=60)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        assert await asyncio.gather(*tasks) == ["result 0", "result 1", "result 2"]
        assert model.batches == [[0, 1, 2]]

    run(scenario)


def test_an_idle_replica_runs_what_it_has_when_the_wait_ends() -> None:
    async def scenario() -> None:
        model = GatedModel()
        model.gate.set()
        batcher = Batcher(model, max_texts=3, max_wait_s=0.05)
        assert await batcher.submit("alone") == "result alone"
        assert model.batches == [["alone"]]

    run(scenario)


def test_a_wrong_number_of_results_is_an_error_for_the_callers() -> None:
    async def short(items: list[str]) -> list[str]:
        return items[:1]

    async def scenario() -> None:
        batcher: Batcher[str, str] = Batcher(short, max_texts=4, max_wait_s=60)
        tasks = [asyncio.create_task(batcher.submit(x)) for x in "abcd"]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "1 results for 4 items" in str(r) for r in results)

    run(scenario)


@pytest.mark.parametrize(("max_texts", "max_tokens", "max_wait_s"), [(0, None, 0.0), (1, 0, 0.0), (1, None, -1.0)])
def test_bad_limits_are_refused(max_texts: int, max_tokens: int | None, max_wait_s: float) -> None:
    with pytest.raises(ValueError, match=r"max_texts|max_tokens|max_wait_s"):
        Batcher(GatedModel(), max_texts=max_texts, max_tokens=max_tokens, max_wait_s=max_wait_s)


@pytest.mark.parametrize(
    ("texts", "tokens", "fits"),
    [(1, 10, True), (64, 100, True), (10, 16384, True), (10, 16385, False), (65, 10, False)],
)
def test_a_batch_fits_while_both_limits_hold(texts: int, tokens: int, fits: bool) -> None:
    assert Batcher(GatedModel(), max_texts=64, max_tokens=16384).fits(texts, tokens) is fits
