"""`SentimentServer` in-process, with its classifier and metrics handed in: no Ray, no HTTP.

What the replica does with a gathered batch when the model runs out of GPU memory: the
classifier splits and retries; a request whose text does not fit even alone fails (413), the
other requests of the same batch get their predictions, and the replica stays healthy. What it
raises, it raises in the core's or the serve layer's words; the status each answers is the
routes' table (`deployments.routes.error_status`), asserted here for the errors the replica makes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.args import ServeArgs
from deployments.errors import BackendFailure, Overloaded, TooLarge, Unhealthy
from deployments.metrics import EndpointMetrics
from deployments.replica import SentimentServer
from deployments.routes import error_status
from deployments.schemas import ErrorType
from sentiment.config import ModelConfig
from sentiment.errors import DeviceMemoryError, InvalidInputError
from sentiment.model import Prediction, SentimentClassifier


class RecordingMetrics(EndpointMetrics):
    """The real metrics, plus what was recorded, to assert on."""

    def __init__(self) -> None:
        super().__init__()
        self.oom_split_total = 0
        self.batches: list[int] = []

    def record_oom_splits(self, splits: int) -> None:
        super().record_oom_splits(splits)
        self.oom_split_total += splits

    def record_batch(self, texts: int, tokens: int, seconds: float) -> None:
        super().record_batch(texts, tokens, seconds)
        self.batches.append(texts)


@pytest.fixture
def server(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> SentimentServer:
    model = ModelConfig(model_id=str(tiny_checkpoint), device="cpu")
    classifier = SentimentClassifier(model)
    original = classifier._forward_batch

    def forward(batch: list[list[int]]) -> np.ndarray:
        # Out of memory above 4 inputs or 100 tokens per input: the injected stand-in for a full GPU.
        if len(batch) > 4 or max(len(sequence) for sequence in batch) >= 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(batch)

    server = SentimentServer(
        # A wait, so the concurrent requests below share one gathered batch.
        ServeArgs(model=model, gather_wait_s=0.5),
        classifier=classifier,
        metrics=RecordingMetrics(),
    )
    monkeypatch.setattr(classifier, "_forward_batch", forward)
    return server


async def classify_all(server: SentimentServer, requests: list[list[str]]) -> list[list[Prediction] | BaseException]:
    """Each request's predictions, or the error it met."""

    async def predictions(texts: list[str]) -> list[Prediction]:
        return (await server.classify(texts))[0]

    return await asyncio.gather(*(predictions(texts) for texts in requests), return_exceptions=True)


def test_only_the_request_with_a_text_too_big_for_the_gpu_fails_and_the_replica_stays_healthy(
    server: SentimentServer,
) -> None:
    short = [f"review number {i} was fine" for i in range(6)]
    requests = [short[:3], ["fine", " ".join(["long"] * 200)], short[3:]]

    async def after_a_first_batch() -> list[list[Prediction] | BaseException]:
        # The batcher's loop starts with the first request and takes it at once; from then on, a
        # request that finds it idle waits gather_wait_s for company, so these three share a batch.
        await server.classify(["warm"])
        return await classify_all(server, requests)

    results = asyncio.run(after_a_first_batch())

    first, failed, last = results
    assert isinstance(failed, DeviceMemoryError)
    assert error_status(failed) == (413, ErrorType.TOO_LARGE)
    assert str(failed).startswith("texts[1]: an input of 202 tokens does not fit in cpu memory")
    assert isinstance(first, list)
    assert isinstance(last, list)
    # Asked directly in passes that fit (4 inputs at most), so they split nothing themselves.
    want = server.classifier.predict(short[:3]) + server.classifier.predict(short[3:])
    assert [p.label for p in first + last] == [p.label for p in want]
    # One gathered batch of all 8 texts, split (8 > 4 inputs) and retried, and the replica is fine.
    metrics = server.metrics
    assert isinstance(metrics, RecordingMetrics)
    assert metrics.batches == [1, 8]
    assert metrics.oom_split_total == server.classifier.oom_splits > 0
    assert server.healthy
    # And it goes on serving.
    (again,) = asyncio.run(classify_all(server, [short[:4]]))
    assert isinstance(again, list)
    assert [p.label for p in again] == [p.label for p in want[:4]]


def test_a_model_that_keeps_failing_otherwise_still_makes_the_replica_unhealthy(
    server: SentimentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(batch: list[list[int]]) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(server.classifier, "_forward_batch", broken)
    for _ in range(3):
        (result,) = asyncio.run(classify_all(server, [["fine"]]))
        assert isinstance(result, BackendFailure)
        assert error_status(result)[0] == 424
    assert not server.healthy
    with pytest.raises(Unhealthy, match="the model failed on the last 3 batches"):
        asyncio.run(server.check_health())


def slow_server(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, max_queue_wait_s: float | None) -> SentimentServer:
    """A replica whose every forward pass takes 0.1 s more: a model slower than its load."""
    model = ModelConfig(model_id=str(checkpoint), device="cpu")
    classifier = SentimentClassifier(model)
    original = classifier._forward_batch

    def slow(batch: list[list[int]]) -> np.ndarray:
        time.sleep(0.1)
        return original(batch)

    server = SentimentServer(
        ServeArgs(model=model, max_queue_wait_s=max_queue_wait_s, gather_max_texts=4), classifier=classifier
    )
    monkeypatch.setattr(classifier, "_forward_batch", slow)
    return server


def test_a_replica_with_too_much_work_queued_sheds_requests_with_503_and_retry_after(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = slow_server(tiny_checkpoint, monkeypatch, max_queue_wait_s=0.2)
    burst = [[f"review {i} was a fine film"] for i in range(12)]

    async def run() -> list[list[Prediction] | BaseException]:
        # A lone request runs in a batch of one: too small to judge the pace by, so nothing is shed yet.
        await server.classify(["a first review"])
        assert server.queue_wait_s == 0
        # A full batch (4 texts) teaches the replica its pace: about 0.1 s per 4 texts.
        await server.classify([f"warm-up review {i}" for i in range(4)])
        return await classify_all(server, burst)

    results = asyncio.run(run())
    served = [result for result in results if isinstance(result, list)]
    shed = [result for result in results if isinstance(result, Overloaded)]
    assert len(served) + len(shed) == len(burst)
    # The first request of the burst finds nothing queued; the queue then outgrows 0.2 s of work
    # (8 texts at 4 per 0.1 s).
    assert isinstance(results[0], list)
    assert served
    assert shed
    for error in shed:
        assert error_status(error) == (503, ErrorType.OVERLOADED)
        assert error.retry_after_s >= 1
        assert "max_queue_wait_s 0.2" in str(error)
    assert all(len(result) == 1 for result in served)
    # Nothing stays counted once the burst is answered, so the next request runs.
    assert server.queue_wait_s == 0
    (after,) = asyncio.run(classify_all(server, [["and one more"]]))
    assert isinstance(after, list)


def test_without_a_queue_bound_every_request_waits_its_turn(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = slow_server(tiny_checkpoint, monkeypatch, max_queue_wait_s=None)

    async def run() -> list[list[Prediction] | BaseException]:
        await server.classify([f"warm-up review {i}" for i in range(4)])
        return await classify_all(server, [[f"review {i}"] for i in range(12)])

    assert all(isinstance(result, list) for result in asyncio.run(run()))


def test_classify_returns_the_predictions_and_the_seconds_of_each_stage(server: SentimentServer) -> None:
    predictions, times = asyncio.run(server.classify(["a fine film", "dull"]))
    assert [p.label for p in predictions] == [p.label for p in server.classifier.predict(["a fine film", "dull"])]
    assert times.tokenization > 0
    assert times.queue >= 0
    assert times.inference > 0


def test_a_text_longer_than_the_model_is_refused_uncut_naming_its_field(server: SentimentServer) -> None:
    long_text = " ".join(["good"] * 600)
    with pytest.raises(TooLarge, match=r"^inputs\[1\] has 602 tokens; the model takes at most 512"):
        asyncio.run(server.classify(["short", long_text], field="inputs", cut=False))
    # Refused before it was queued: nothing stays counted as pending work.
    assert server.admission.pending_batches == 0


def test_the_cores_invalid_input_error_leaves_the_replica_as_it_is_and_is_no_strike_against_health(
    server: SentimentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(encoded: object) -> list[Prediction]:
        raise InvalidInputError("texts[0]: the core refuses this (injected)")

    monkeypatch.setattr(server.classifier, "apredict_encoded", refuse)
    for _ in range(3):
        (result,) = asyncio.run(classify_all(server, [["fine"]]))
        assert type(result) is InvalidInputError
        assert str(result) == "texts[0]: the core refuses this (injected)"
        assert error_status(result) == (422, ErrorType.VALIDATION)
    assert server.healthy


# -- on a real card (skipped where torch sees no CUDA device) ----------------------------------------


@pytest.mark.gpu
@pytest.mark.usefixtures("uncapped_cuda")
def test_a_quarter_gpu_replica_runs_on_the_card_capped_to_its_quarter(tiny_checkpoint: Path) -> None:
    # Built in-process as Serve would build it, from its args alone: outside a Ray actor, device auto is the card.
    args = ServeArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint)), ray_actor_options={"num_cpus": 1, "num_gpus": 0.25}
    )
    server = SentimentServer(args)
    info = server.info()
    total = torch.cuda.get_device_properties(0).total_memory
    assert (info["device"], info["replica_gpus"], info["gpu_memory_fraction"]) == ("cuda:0", 0.25, 0.25)
    assert info["gpu_memory_cap_bytes"] == int(0.25 * total)
    assert torch.cuda.get_per_process_memory_fraction(0) == pytest.approx(0.25)
    predictions, _ = asyncio.run(server.classify(["a wonderful film", "dull " * 600]))
    assert [p.truncated for p in predictions] == [False, True]
    assert 0 < server.info()["gpu_memory_peak_bytes"] <= info["gpu_memory_cap_bytes"]
