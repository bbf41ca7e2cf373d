"""The Serve app over real HTTP: a real local Ray, tiny checkpoints, loopback only.

What needs Serve: batching across concurrent HTTP requests, the metrics Ray exports, the proxy's
backpressure, fractional GPUs, autoscaling, and a real client (huggingface_hub) through the proxy.
Each route's answers and errors are tested in-process, without Ray, in `tests/test_routes.py`.

One Serve instance serves the module. Three apps stay up for most tests: ``main`` (plain, small
request limits), ``metered`` (fresh counters) and ``guarded`` (API key, a tiny queue, route prefix
``/guarded``). The fractional-GPU and autoscaling tests deploy their own app and delete it afterwards.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sentiment.model import SentimentClassifier
from sentiment.testing import free_port, wait_until
from tests.helpers import (
    API_KEY,
    MAIN_LIMITS,
    assert_same_predictions,
    deploy,
    expected,
    replica_states,
    review,
    tiny_args,
)


@pytest.fixture(scope="module")
def serve_port(ray_session: Any) -> Iterator[int]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def urls(serve_port: int, tiny_checkpoint: Path) -> dict[str, str]:
    deploy(
        {
            "main": (
                tiny_args(tiny_checkpoint, **MAIN_LIMITS),
                "/",
            ),
            # Only the metrics test sends requests here, so its counters start from zero.
            "metered": (tiny_args(tiny_checkpoint, gather_wait_s=0.05), "/metered"),
            "guarded": (
                tiny_args(
                    tiny_checkpoint,
                    api_key=API_KEY,
                    model={"model_id": str(tiny_checkpoint), "long_text": "chunks"},
                    # Room for one batch in the replica and one request in the proxy's queue.
                    gather_max_texts=2,
                    max_ongoing_requests=2,
                    max_queued_requests=1,
                    max_chars_per_text=100_000,
                ),
                "/guarded",
            ),
        }
    )
    base = f"http://127.0.0.1:{serve_port}"
    return {"main": base, "guarded": f"{base}/guarded", "metered": f"{base}/metered"}


# -- routes ------------------------------------------------------------------------------------


def test_hugging_face_inference_client_classifies_against_the_endpoint(
    urls: dict[str, str], classifier: SentimentClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # The test session is offline for the hub; the client's offline switch also blocks loopback URLs.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    text = "a wonderful, moving film"
    want = classifier.predict([text])[0].scores

    result = InferenceClient(model=urls["main"]).text_classification(text)
    assert sorted(item.label for item in result) == ["neg", "pos"]
    assert {item.label: item.score for item in result} == pytest.approx(want, abs=1e-5)
    assert result[0].score >= result[1].score

    (top,) = InferenceClient(model=urls["main"]).text_classification(text, top_k=1)
    assert top.label == max(want, key=lambda label: want[label])

    guarded = InferenceClient(model=urls["guarded"], api_key=API_KEY).text_classification(text)
    assert {item.label for item in guarded} == {"neg", "pos"}


def test_a_vllm_client_discovers_the_model_and_classifies_through_the_proxy(
    urls: dict[str, str], classifier: SentimentClassifier
) -> None:
    # As vLLM's own example client (and LiteLLM, SGLang and Dynamo clients) do: list the models,
    # then post {"model", "input"} to /classify (SGLang and Dynamo: /v1/classify).
    texts = ["a wonderful, moving film", "two hours I will never get back"]
    want = classifier.predict(texts)
    headers = {"Authorization": f"Bearer {API_KEY}", "accept": "application/json"}
    with httpx.Client(base_url=urls["guarded"], headers=headers, timeout=60) as client:
        (card,) = client.get("/v1/models").json()["data"]
        for path in ("/classify", "/v1/classify"):
            response = client.post(path, json={"model": card["id"], "input": texts})
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert [item["label"] for item in data] == [p.label for p in want]
            assert data[1]["probs"] == pytest.approx([want[1].scores[label] for label in ("neg", "pos")], abs=1e-5)
        refused = client.post("/classify", json={"model": "gpt-4o", "input": texts})
        assert refused.status_code == 404
        assert card["id"] in refused.json()["error"]
    assert httpx.post(f"{urls['guarded']}/classify", json={"input": texts}).status_code == 401


def test_concurrent_requests_each_get_their_own_answers(urls: dict[str, str], classifier: SentimentClassifier) -> None:
    rng = random.Random(3)
    requests = [[review(rng.randint(1, 600), rng) for _ in range(rng.randint(1, 3))] for _ in range(40)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=urls["main"], timeout=60) as session:
            return await asyncio.gather(*(session.post("/v1/classify", json={"texts": t}) for t in requests))

    responses = asyncio.run(asyncio.wait_for(send_all(), timeout=120))
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_same_predictions(response.json()["predictions"], expected(classifier, texts))


def test_metrics_count_texts_and_batches_gather_several_requests(ray_session: Any, urls: dict[str, str]) -> None:
    port = ray_session._private.worker.global_worker.node.metrics_export_port

    def scrape() -> dict[str, float]:
        totals: dict[str, float] = {}
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("ray_sentiment_") and 'application="metered"' in line:
                name = line.split("{", 1)[0]
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return totals

    rng = random.Random(4)
    texts = [review(rng.randint(5, 30), rng) for _ in range(24)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=urls["metered"], timeout=60) as session:
            responses = await asyncio.gather(*(session.post("/v1/classify", json={"text": t}) for t in texts))
        return [r.status_code for r in responses]

    assert asyncio.run(asyncio.wait_for(burst(), timeout=60)) == [200] * len(texts)
    with httpx.Client(base_url=urls["metered"], timeout=60) as session:
        assert session.post("/v1/classify", json={"text": review(800, rng)}).status_code == 200

    # Ray exports every few seconds. The long text went after the burst had its answers, so an
    # export that counts it also holds every batch of the burst.
    wait_until(lambda: scrape().get("ray_sentiment_truncated_texts_total", 0) >= 1, 60, "the truncated counter")
    metrics = scrape()
    assert metrics["ray_sentiment_texts_total"] == 25
    assert metrics["ray_sentiment_truncated_texts_total"] == 1
    assert metrics["ray_sentiment_tokens_total"] >= 512
    assert metrics["ray_sentiment_requests_total"] >= 25
    batches = metrics["ray_sentiment_batch_texts_count"]
    # 24 concurrent requests (and the long one, alone) in fewer batches: requests shared forward passes.
    assert 1 <= batches < 24
    assert metrics["ray_sentiment_model_seconds_count"] == batches
    assert metrics["ray_sentiment_batch_tokens_count"] == batches
    # The long text was the last request: nothing queued behind it when its batch started.
    assert metrics["ray_sentiment_queued_requests"] == 0


# -- API key and overload ----------------------------------------------------------------------


def test_overload_is_refused_with_503_not_queued_without_bound(
    urls: dict[str, str], classifier: SentimentClassifier
) -> None:
    rng = random.Random(5)
    # Two 99,000-character reviews under 'chunks' keep the tiny model busy for about a second.
    texts = [review(17_000, rng)[:99_000] for _ in range(2)]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=urls["guarded"], timeout=120, headers=headers) as session:
            return await asyncio.gather(*(session.post("/v1/classify", json={"texts": texts}) for _ in range(10)))

    responses = asyncio.run(asyncio.wait_for(burst(), timeout=180))
    statuses = sorted(r.status_code for r in responses)
    # The replica holds 2 requests and the proxy queues at most 1 more; the rest are refused at once.
    # How many of the 10 get in depends on how fast Serve's router assigns them, so only both
    # outcomes are asserted.
    assert set(statuses) == {200, 503}
    for response in responses:
        if response.status_code == 503:
            # Serve's proxy answers (plain text), with the Retry-After of ServeArgs.proxy_retry_after_s.
            assert response.headers["retry-after"] == "1"
    # The replicas reserved no GPU, so they run on the CPU in fp32, as the reference must (not device auto,
    # which outside Ray is the card of a GPU host).
    want = expected(SentimentClassifier(classifier.config.model_copy(update={"long_text": "chunks"})), texts)
    for response in responses:
        if response.status_code == 200:
            assert_same_predictions(response.json()["predictions"], want)
    with httpx.Client(base_url=urls["guarded"], timeout=60, headers=headers) as session:
        assert session.get("/readyz").status_code == 200


# -- replicas ------------------------------------------------------------------------------------


def test_four_quarter_gpu_replicas_share_one_gpu_and_a_fifth_is_not_scheduled(
    ray_session: Any, serve_port: int, tiny_checkpoint: Path
) -> None:
    from ray import serve

    app = "fractional"
    quarter_gpu = {"num_cpus": 0.1, "num_gpus": 0.25}
    # The shared Ray's GPU is logical: its replicas run on the CPU only when told so.
    model = {"model_id": str(tiny_checkpoint), "gpu_fallback": "cpu"}
    args = tiny_args(tiny_checkpoint, model=model, num_replicas=5, ray_actor_options=quarter_gpu)
    deploy({app: (args, "/fractional")}, wait=False)
    try:
        wait_until(lambda: replica_states(app).get("RUNNING") == 4, 180, "four running replicas", interval_s=1)
        time.sleep(3)
        states = replica_states(app)
        assert states.get("RUNNING") == 4
        assert sum(states.values()) == 5  # the fifth waits for a GPU share that does not exist
        assert ray_session.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-6)
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}/fractional", timeout=60) as session:
            info = session.get("/info").json()
            assert session.post("/v1/classify", json={"text": "good"}).status_code == 200
        assert info["replica_gpus"] == 0.25
        assert len(info["reserved_gpus"]) == 1
        if torch.cuda.is_available():
            # A real card: the replica runs on the GPU Ray gave it, capped to its quarter.
            assert info["device"].startswith("cuda:")
            assert info["gpu_memory_fraction"] == 0.25
            return
        # The logical GPU has no CUDA device behind it: the replica runs on the CPU and logs what Ray gave it.
        assert (info["device"], info["gpu_memory_cap_bytes"]) == ("cpu", None)
        logs = Path(ray_session._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
        replica_logs = [path.read_text(errors="replace") for path in logs.glob(f"replica_{app}_*.log")]
        ready = re.compile(r"on cpu \(torch fp32, \d+ threads; Ray reserved GPU ids \['\w+'\]")
        assert sum(bool(ready.search(text)) for text in replica_logs) >= 4, replica_logs
    finally:
        serve.delete(app)


def test_autoscaling_grows_under_a_burst_and_shrinks_back(serve_port: int, tiny_checkpoint: Path) -> None:
    from ray import serve

    app = "autoscaled"
    args = tiny_args(
        tiny_checkpoint,
        num_replicas=None,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 1,
            "look_back_period_s": 11,  # Serve wants it above its 10 s metrics interval
        },
        # Each request waits for company for 0.2 s, so 12 clients keep about 12 requests ongoing.
        gather_wait_s=0.2,
        gather_max_texts=16,
        max_ongoing_requests=16,
    )
    deploy({app: (args, "/autoscaled")})
    try:
        assert replica_states(app) == {"RUNNING": 1}
        peak = 0

        async def burst() -> list[int]:
            nonlocal peak
            statuses: list[int] = []
            deadline = time.monotonic() + 120

            async def client_loop(session: httpx.AsyncClient) -> None:
                while peak < 2 and time.monotonic() < deadline and len(statuses) < 20_000:
                    statuses.append((await session.post("/v1/classify", json={"text": "a good film"})).status_code)

            async def watch() -> None:
                nonlocal peak
                while peak < 2 and time.monotonic() < deadline:
                    peak = max(peak, (await asyncio.to_thread(replica_states, app)).get("RUNNING", 0))
                    await asyncio.sleep(1)

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{serve_port}/autoscaled", timeout=60) as session:
                await asyncio.gather(watch(), *(client_loop(session) for _ in range(12)))
            return statuses

        statuses = asyncio.run(burst())
        assert peak >= 2, f"replicas never grew past 1 in {len(statuses)} requests"
        assert set(statuses) == {200}
        wait_until(lambda: replica_states(app) == {"RUNNING": 1}, 120, "the replicas to shrink back to 1", 1)
    finally:
        serve.delete(app)
