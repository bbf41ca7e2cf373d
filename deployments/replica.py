"""`SentimentServer`: one replica, one `SentimentClassifier`, batching texts across concurrent requests.

Plain Python: `deployments.builder` turns it into a Serve deployment, and tests hand it a ready
classifier and metrics. It speaks no HTTP: it raises the core's errors (`sentiment.errors`) and
the serve layer's (`deployments.errors`), and `deployments.routes` answers them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments.admission import Admission
from deployments.args import ServeArgs
from deployments.batcher import Batcher
from deployments.errors import BackendFailure, TooLarge, Unhealthy
from deployments.metrics import EndpointMetrics, StageTimes
from sentiment.config import LongTextStrategy
from sentiment.errors import DeviceMemoryError, SentimentError
from sentiment.model import EncodedText, Prediction, SentimentClassifier

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("ray.serve")

# Consecutive failed batches after which a replica reports itself unhealthy and Serve replaces it.
_FAILURES_BEFORE_UNHEALTHY = 3


@dataclass(frozen=True, slots=True)
class _Work:
    """One request's texts, already tokenized, waiting in the replica's batch queue."""

    encoded: list[EncodedText]
    num_tokens: int
    field: str
    """The request field that held the texts, for error messages."""
    submitted: float
    times: StageTimes


class SentimentServer:
    """A replica: loads the classifier, warms it up, then batches texts across concurrent requests.

    Requests are tokenized as they arrive (on the classifier's tokenizer thread), so the batch
    queue can size batches by tokens as well as by texts; each gathered batch runs on the
    classifier's model thread, so the event loop keeps accepting requests meanwhile.
    """

    def __init__(
        self,
        args: ServeArgs,
        *,
        classifier: SentimentClassifier | None = None,
        metrics: EndpointMetrics | None = None,
    ) -> None:
        """Serve passes only ``args``; tests may hand in a ready classifier and metrics instead."""
        self.args = args
        # build_app resolved "auto" before the replica started; "auto" here only outside Serve (tests).
        self.num_gpus = float(args.ray_actor_options.num_gpus) if args.ray_actor_options.num_gpus != "auto" else 0.0
        if classifier is None:
            # Threads: the CPUs this replica reserved (Ray's OMP_NUM_THREADS), at most the cores.
            classifier = SentimentClassifier(args.model.for_gpu_share(self.num_gpus), reserved_gpus=_reserved_gpus())
        self.classifier = classifier
        self.replica_id = _replica_id()
        self.classifier.warmup()
        self.api_key = args.resolve_api_key()
        self.metrics = metrics or EndpointMetrics()
        self.admission = Admission(
            args.max_queue_wait_s, args.effective_gather_max_texts, args.effective_gather_max_tokens
        )
        self._failures = 0
        self._oom_splits_seen = self.classifier.oom_splits
        self._batcher: Batcher[_Work, list[Prediction]] = Batcher(
            self._run_batch,
            max_texts=args.effective_gather_max_texts,
            max_tokens=args.effective_gather_max_tokens,
            measure=lambda work: (len(work.encoded), work.num_tokens),
            max_wait_s=args.gather_wait_s,
        )
        _log_ready(self)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after `__init__`; the routes close over this replica."""
        from deployments.routes import create_api

        return create_api(self)

    async def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model keeps failing is replaced."""
        if not self.healthy:
            raise Unhealthy(f"the model failed on the last {self._failures} batches")

    @property
    def healthy(self) -> bool:
        """Serve routes no request to a replica before `__init__` has warmed it up; after, only failures count."""
        return self._failures < _FAILURES_BEFORE_UNHEALTHY

    @property
    def queue_wait_s(self) -> float:
        """Seconds of work queued or running on this replica (see `Admission.queue_wait_s`)."""
        return self.admission.queue_wait_s

    def info(self) -> dict[str, Any]:
        return {
            **self.classifier.describe(),
            "gather_max_texts": self.args.effective_gather_max_texts,
            "gather_max_tokens": self.args.effective_gather_max_tokens,
            "gather_wait_s": self.args.gather_wait_s,
            "max_ongoing_requests": self.args.max_ongoing_requests,
            "max_queue_wait_s": self.args.max_queue_wait_s,
            "queue_wait_s": round(self.queue_wait_s, 3),
            "max_texts_per_request": self.args.max_texts_per_request,
            "max_chars_per_text": self.args.max_chars_per_text,
            "replica_gpus": self.num_gpus,
            "replica": self.replica_id,
            "gpu_memory_peak_bytes": self.classifier.peak_gpu_memory_bytes(),
        }

    async def classify(
        self, texts: Sequence[str], long_text: LongTextStrategy | None = None, *, field: str = "texts", cut: bool = True
    ) -> tuple[list[Prediction], StageTimes]:
        """One request's predictions, batched with other requests', and the seconds it spent in each stage.

        ``cut=False`` refuses a text longer than the model's limit; ``field`` names the texts in errors.
        """
        times = StageTimes()
        # Refused before tokenizing too, so an overloaded replica spends no CPU on requests it turns away.
        self.admission.check()
        started = time.perf_counter()
        encoded = await self.classifier.aencode(texts, long_text)
        times.tokenization = time.perf_counter() - started
        if not cut:
            for index, text in enumerate(encoded):
                if text.truncated:
                    raise TooLarge(
                        f"{field}[{index}] has {text.num_tokens} tokens; the model takes at most "
                        f"{self.classifier.max_length} (send truncate: true to cut it)"
                    )
        tokens = sum(len(window) for text in encoded for window in text.windows)
        with self.admission.admitted(self.admission.fullness(len(encoded), tokens)):
            self.metrics.record_texts(encoded)
            predictions = await self._batcher.submit(_Work(encoded, tokens, field, time.perf_counter(), times))
        return predictions, times

    async def _run_batch(self, batch: list[_Work]) -> list[list[Prediction] | Exception]:
        encoded = [text for work in batch for text in work.encoded]
        self.metrics.record_queue(self._batcher.queued)
        started = time.perf_counter()
        for work in batch:
            work.times.queue = started - work.submitted
        try:
            # The classifier already split and retried on OOM: only texts that do not fit alone carry
            # an error, and only their requests fail. The model works, so that is no strike against health.
            scored = await self.classifier.apredict_encoded(encoded)
        except SentimentError:
            raise  # the core refused the input in its own words: the routes answer it, the model is fine
        except Exception as exc:
            self._failures += 1
            logger.exception("Batch of %d texts failed in the model", len(encoded))
            raise BackendFailure(f"the model failed: {type(exc).__name__}: {exc}") from exc
        finally:
            splits = self.classifier.oom_splits - self._oom_splits_seen
            self._oom_splits_seen += splits
            self.metrics.record_oom_splits(splits)
        self._failures = 0
        seconds = time.perf_counter() - started
        batch_tokens = sum(work.num_tokens for work in batch)
        self.admission.record_batch(len(encoded), batch_tokens, seconds)
        for work in batch:
            work.times.inference = seconds
        self.metrics.record_batch(len(encoded), batch_tokens, seconds)
        return _per_request(batch, scored)


def _per_request(
    batch: list[_Work], scored: Sequence[Prediction | DeviceMemoryError]
) -> list[list[Prediction] | Exception]:
    """Each request's slice of a batch's results: its predictions, or the first text that did not fit."""
    results: list[list[Prediction] | Exception] = []
    start = 0
    for work in batch:
        mine = scored[start : start + len(work.encoded)]
        start += len(work.encoded)
        failed = [(index, error) for index, error in enumerate(mine) if isinstance(error, DeviceMemoryError)]
        if failed:
            index, error = failed[0]
            named = DeviceMemoryError(f"{work.field}[{index}]: {error}")
            named.__cause__ = error
            results.append(named)
        else:
            results.append([p for p in mine if isinstance(p, Prediction)])
    return results


def _log_ready(server: SentimentServer) -> None:
    info = server.classifier.describe()
    cap = info["gpu_memory_cap_bytes"]
    logger.info(
        "Replica ready: %s on %s (%s %s, %d threads; Ray reserved GPU ids %s; memory cap %s), warmed up at "
        "%d tokens; batches of up to %d texts / %d tokens%s.",
        server.args.model.model_id,
        server.classifier.device,
        info["backend"],
        info["dtype"],
        info["threads"],
        info["reserved_gpus"],
        "none" if cap is None else f"{cap / 2**30:.1f} GiB",
        server.classifier.max_length,
        server.args.effective_gather_max_texts,
        server.args.effective_gather_max_tokens,
        ", API key required" if server.api_key else "",
    )


def _reserved_gpus() -> list[str] | None:
    """The GPU ids Ray reserved for this replica; None outside a Ray actor (a replica built in-process), where
    ``ray.get_gpu_ids()`` would start a local Ray, and ``device: auto`` then means CUDA if torch sees it."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return [str(gpu) for gpu in ray.get_gpu_ids()]


def _replica_id() -> str | None:
    """Serve's id of this replica (tells replicas apart in /info), None outside a Serve replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_tag)
    except RayServeException:  # not in a replica: in-process tests
        return None
