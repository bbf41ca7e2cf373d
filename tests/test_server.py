"""`SentimentServer` in-process, with its classifier and metrics handed in: no Ray, no HTTP.

What the replica does with a gathered batch when the model runs out of GPU memory: the
classifier splits and retries; a request whose text does not fit even alone gets 413, the other
requests of the same batch their predictions, and the replica stays healthy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from deployments.app import SentimentServer
from deployments.args import ServeArgs
from deployments.errors import ApiError, ErrorType
from deployments.metrics import EndpointMetrics
from sentiment.config import ModelConfig
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
    return await asyncio.gather(*(server.classify(texts) for texts in requests), return_exceptions=True)


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
    assert isinstance(failed, ApiError)
    assert (failed.status, failed.error_type) == (413, ErrorType.TOO_LARGE)
    assert failed.message.startswith("texts[1]: an input of 202 tokens does not fit in cpu memory")
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
        assert isinstance(result, ApiError)
        assert result.status == 424
    assert not server.healthy


@pytest.fixture
def client(tiny_checkpoint: Path) -> Iterator[TestClient]:
    """The FastAPI app of one replica, in-process, on the tiny classifier: no Ray, no Serve."""
    from deployments.api import create_api

    model = ModelConfig(model_id=str(tiny_checkpoint), device="cpu")
    server = SentimentServer(ServeArgs(model=model), classifier=SentimentClassifier(model), metrics=RecordingMetrics())
    with TestClient(create_api(server)) as session:
        yield session


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/classify", {"texts": ["a fine film", "dull"]}),
        ("/predict", {"inputs": "a fine film"}),
        ("/", {"inputs": ["a fine film"]}),
    ],
)
def test_every_classify_answer_carries_the_stage_timings_in_milliseconds(
    client: TestClient, path: str, body: dict[str, object]
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 200
    stages = {name: int(response.headers[f"x-{name}-time"]) for name in ("total", "tokenization", "queue", "inference")}
    assert all(value >= 0 for value in stages.values())
    # Each header is rounded to the millisecond on its own: the parts may exceed the total by that.
    assert stages["total"] + 2 >= stages["tokenization"] + stages["queue"] + stages["inference"]


def test_refused_requests_carry_no_timings(client: TestClient) -> None:
    response = client.post("/v1/classify", json={"texts": [" "]})
    assert response.status_code == 400
    assert "x-total-time" not in response.headers


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
    shed = [result for result in results if isinstance(result, ApiError)]
    assert len(served) + len(shed) == len(burst)
    # The first request of the burst finds nothing queued; the queue then outgrows 0.2 s of work
    # (8 texts at 4 per 0.1 s).
    assert isinstance(results[0], list)
    assert served
    assert shed
    for error in shed:
        assert (error.status, error.error_type) == (503, ErrorType.OVERLOADED)
        assert error.headers is not None
        assert int(error.headers["Retry-After"]) >= 1
        assert "max_queue_wait_s 0.2" in error.message
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
