"""Custom Ray Serve metrics of the endpoint.

Ray exports them, with the ``ray_`` prefix and the deployment, replica and application tags Serve
adds, on each node's metrics export port (``ray start --metrics-export-port=PORT``); Prometheus
finds every node through ``/tmp/ray/prom_metrics_service_discovery.json`` on the head node.
Counters appear with a ``_total`` suffix, e.g. ``ray_sentiment_texts_total``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sentiment.model import EncodedText

_BATCH_TEXTS_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
_BATCH_TOKENS_BUCKETS: list[float] = [64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
_MODEL_SECONDS_BUCKETS: list[float] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@dataclass(slots=True)
class StageTimes:
    """Seconds one request spent in each stage; the routes send them as TEI's ``x-*-time`` headers."""

    tokenization: float = 0.0
    queue: float = 0.0
    """From joining the batch queue until its batch started."""
    inference: float = 0.0
    """The model's time on the batch that held the request (shared with the other requests in it)."""


class EndpointMetrics:
    """The counters and histograms one replica records; created in the replica, never at import."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "sentiment_requests",
            description="HTTP requests answered, by route template and status code.",
            tag_keys=("route", "status"),  # type: ignore[arg-type]  # Ray annotates tag_keys as a 1-tuple
        )
        self.texts = Counter("sentiment_texts", description="Texts classified.")
        self.tokens = Counter(
            "sentiment_tokens", description="Tokens fed to the model (all windows of every text, special tokens in)."
        )
        self.truncated = Counter(
            "sentiment_truncated_texts", description="Texts longer than the model's limit, cut or split into chunks."
        )
        self.batch_texts = Histogram(
            "sentiment_batch_texts",
            description="Texts per batch gathered from concurrent requests.",
            boundaries=_BATCH_TEXTS_BUCKETS,
        )
        self.batch_tokens = Histogram(
            "sentiment_batch_tokens",
            description="Tokens per batch gathered from concurrent requests.",
            boundaries=_BATCH_TOKENS_BUCKETS,
        )
        self.queued = Gauge(
            "sentiment_queued_requests",
            description="Requests waiting in the replica's batch queue when its latest batch started.",
        )
        self.oom_splits = Counter(
            "sentiment_oom_splits",
            description=(
                "Forward passes that ran out of GPU memory and were split in two and retried; a steady rise "
                "means the forward token budget (model.forward_max_tokens) is too big for the memory cap."
            ),
        )
        self.stage_seconds = Histogram(
            "sentiment_request_stage_seconds",
            description=(
                "Seconds one classify request spent per stage: total, tokenization, queue, inference "
                "(the x-*-time headers)."
            ),
            boundaries=_MODEL_SECONDS_BUCKETS,
            tag_keys=("stage",),
        )
        self.model_seconds = Histogram(
            "sentiment_model_seconds",
            description="Seconds the model spent on one gathered batch (all its forward passes).",
            boundaries=_MODEL_SECONDS_BUCKETS,
        )

    def record_request(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})

    def record_texts(self, encoded: Sequence[EncodedText]) -> None:
        self.texts.inc(len(encoded))
        self.tokens.inc(sum(len(window) for text in encoded for window in text.windows))
        truncated = sum(text.truncated for text in encoded)
        if truncated:
            self.truncated.inc(truncated)

    def record_queue(self, requests: int) -> None:
        self.queued.set(requests)

    def record_stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.observe(value, tags={"stage": stage})

    def record_oom_splits(self, splits: int) -> None:
        if splits:
            self.oom_splits.inc(splits)

    def record_batch(self, texts: int, tokens: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)
        self.model_seconds.observe(seconds)
