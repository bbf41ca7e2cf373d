"""The online endpoint: one `SentimentClassifier` per replica behind a FastAPI ingress.

`build_app` turns `ServeArgs` into a Serve application; ``serve.yaml`` names it as
``deployments.app:build_app``. The replica class is plain Python: its resources, replica count
and batching limits come from the args at build time, never from decorators.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments.args import AUTO_GPU_FRACTION, ServeArgs, parse_serve_args
from deployments.batcher import Batcher
from deployments.errors import ApiError, ErrorType
from deployments.metrics import EndpointMetrics, StageTimes
from sentiment.config import LongTextStrategy
from sentiment.engines import backend_of
from sentiment.errors import DeviceMemoryError
from sentiment.model import EncodedText, Prediction, SentimentClassifier

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

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
            import ray

            # Threads: the CPUs this replica reserved (Ray's OMP_NUM_THREADS), at most the cores.
            classifier = SentimentClassifier(args.model.for_gpu_share(self.num_gpus), reserved_gpus=ray.get_gpu_ids())
        self.classifier = classifier
        self.replica_id = _replica_id()
        self.classifier.warmup()
        self.api_key = args.resolve_api_key()
        self.gather_max_texts = args.effective_gather_max_texts
        self.gather_max_tokens = args.effective_gather_max_tokens
        self._failures = 0
        # Shedding: work submitted and not yet answered, in full batches (`_fullness`), and the pace of
        # well-filled batches in full batches per second (None until one ran).
        self._pending_batches = 0.0
        self._batches_per_s: float | None = None
        self._oom_splits_seen = self.classifier.oom_splits
        self.metrics = metrics or EndpointMetrics()
        self._batcher: Batcher[_Work, list[Prediction]] = Batcher(
            self._run_batch,
            max_texts=self.gather_max_texts,
            max_tokens=self.gather_max_tokens,
            measure=lambda work: (len(work.encoded), work.num_tokens),
            max_wait_s=args.gather_wait_s,
        )
        info = self.classifier.describe()
        logger.info(
            "Replica ready: %s on %s (%s %s, %d threads; Ray reserved GPU ids %s; memory cap %s), warmed up at "
            "%d tokens; batches of up to %d texts / %d tokens%s.",
            args.model.model_id,
            self.classifier.device,
            info["backend"],
            info["dtype"],
            info["threads"],
            info["reserved_gpus"],
            "none" if info["gpu_memory_cap_bytes"] is None else f"{info['gpu_memory_cap_bytes'] / 2**30:.1f} GiB",
            self.classifier.max_length,
            self.gather_max_texts,
            self.gather_max_tokens,
            ", API key required" if self.api_key else "",
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after `__init__`; the routes close over this replica."""
        from deployments.api import create_api

        return create_api(self)

    async def check_health(self) -> None:
        """Serve's periodic probe: a replica whose model keeps failing is replaced."""
        if not self.healthy:
            raise RuntimeError(f"the model failed on the last {self._failures} batches")

    @property
    def healthy(self) -> bool:
        """Serve routes no request to a replica before `__init__` has warmed it up; after, only failures count."""
        return self._failures < _FAILURES_BEFORE_UNHEALTHY

    def info(self) -> dict[str, Any]:
        return {
            **self.classifier.describe(),
            "gather_max_texts": self.gather_max_texts,
            "gather_max_tokens": self.gather_max_tokens,
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
        self,
        texts: Sequence[str],
        long_text: LongTextStrategy | None = None,
        *,
        field: str = "texts",
        cut: bool = True,
        times: StageTimes | None = None,
    ) -> list[Prediction]:
        """Predictions for one request's texts, batched with other requests'. ``cut=False`` refuses long texts.

        ``times``, if given, receives the seconds spent tokenizing, queued and in the model.
        """
        times = times if times is not None else StageTimes()
        # Refused before tokenizing too, so an overloaded replica spends no CPU on requests it turns away.
        self._admit()
        started = time.perf_counter()
        encoded = await self.classifier.aencode(texts, long_text)
        times.tokenization = time.perf_counter() - started
        if not cut:
            for index, text in enumerate(encoded):
                if text.truncated:
                    raise ApiError(
                        ErrorType.TOO_LARGE,
                        f"{field}[{index}] has {text.num_tokens} tokens; the model takes at most "
                        f"{self.classifier.max_length} (send truncate: true to cut it)",
                    )
        tokens = sum(len(window) for text in encoded for window in text.windows)
        work = _Work(encoded, tokens, field, time.perf_counter(), times)
        share = self._fullness(len(encoded), tokens)
        # No await between the check and the count: concurrent requests are admitted one at a time.
        self._admit()
        self._pending_batches += share
        try:
            self.metrics.record_texts(encoded)
            return await self._batcher.submit(work)
        finally:
            self._pending_batches = max(0.0, self._pending_batches - share)

    @property
    def queue_wait_s(self) -> float:
        """Seconds of work queued or running on this replica, at the pace of its well-filled batches.

        0 until a batch at least half full has run: small batches are mostly fixed cost per pass,
        so their pace would overstate the wait of a burst many times over (a false "busy" is worse
        than a burst admitted on an optimistic guess; the first full batch corrects it).
        """
        if not self._batches_per_s:
            return 0.0
        return self._pending_batches / self._batches_per_s

    def _admit(self) -> None:
        """Refuse a request at once when the work ahead of it would keep it waiting over max_queue_wait_s."""
        limit = self.args.max_queue_wait_s
        wait = self.queue_wait_s
        if limit is not None and wait > limit:
            raise ApiError(
                ErrorType.OVERLOADED,
                f"the replica is busy: about {wait:.1f} s of work is queued ahead (max_queue_wait_s {limit:g}); "
                "retry after Retry-After seconds",
                headers={"Retry-After": str(max(1, math.ceil(wait - limit)))},
            )

    def _fullness(self, texts: int, tokens: int) -> float:
        """How much of a full gathered batch this much work is: its larger share of the two limits."""
        return max(texts / self.gather_max_texts, tokens / self.gather_max_tokens)

    async def _run_batch(self, batch: list[_Work]) -> list[list[Prediction] | ApiError]:
        encoded = [text for work in batch for text in work.encoded]
        self.metrics.record_queue(self._batcher.queued)
        started = time.perf_counter()
        for work in batch:
            work.times.queue = started - work.submitted
        try:
            # The classifier already split and retried on OOM: only texts that do not fit alone carry
            # an error, and only their requests fail. The model works, so that is no strike against health.
            scored = await self.classifier.apredict_encoded(encoded)
        except Exception as exc:
            self._failures += 1
            logger.exception("Batch of %d texts failed in the model", len(encoded))
            raise ApiError(ErrorType.BACKEND, f"the model failed: {type(exc).__name__}: {exc}") from exc
        finally:
            splits = self.classifier.oom_splits - self._oom_splits_seen
            self._oom_splits_seen += splits
            self.metrics.record_oom_splits(splits)
        self._failures = 0
        seconds = time.perf_counter() - started
        batch_tokens = sum(work.num_tokens for work in batch)
        fullness = self._fullness(len(encoded), batch_tokens)
        if seconds > 0 and fullness >= 0.5:
            pace = fullness / seconds
            # A moving average over the last few full batches: follows a slowdown (a replica starting beside
            # this one, longer texts) within a few batches without jumping on one odd batch.
            self._batches_per_s = pace if self._batches_per_s is None else 0.7 * self._batches_per_s + 0.3 * pace
        for work in batch:
            work.times.inference = seconds
        self.metrics.record_batch(len(encoded), batch_tokens, seconds)
        results: list[list[Prediction] | ApiError] = []
        start = 0
        for work in batch:
            mine = scored[start : start + len(work.encoded)]
            start += len(work.encoded)
            failed = [(index, error) for index, error in enumerate(mine) if isinstance(error, DeviceMemoryError)]
            if failed:
                index, error = failed[0]
                results.append(ApiError(ErrorType.TOO_LARGE, f"{work.field}[{index}]: {error}"))
            else:
                results.append([p for p in mine if isinstance(p, Prediction)])
        return results


def _replica_id() -> str | None:
    """Serve's id of this replica (tells replicas apart in /info), None outside a Serve replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_tag)
    except RayServeException:  # not in a replica: in-process tests
        return None


def deployment_options(args: ServeArgs, cluster_gpus: float, node_cpus: float = 1.0) -> dict[str, Any]:
    """Serve deployment options from the args, ``auto`` resources resolved against the cluster.

    ``cluster_gpus``: the GPUs the cluster has; ``node_cpus``: the CPUs of its largest node.
    """
    num_gpus = args.ray_actor_options.num_gpus
    if num_gpus == "auto":
        # ONNX Runtime runs on the CPU: a replica of it takes no GPU share.
        on_gpu = cluster_gpus > 0 and backend_of(args.model) == "torch"
        num_gpus = AUTO_GPU_FRACTION if on_gpu else 0.0
    num_cpus = args.ray_actor_options.num_cpus
    if num_cpus == "auto":
        num_cpus = 1 if num_gpus > 0 else max(1, int(node_cpus))
    options: dict[str, Any] = {
        "name": args.name,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": args.max_ongoing_requests,
        "max_queued_requests": args.max_queued_requests,
        # Serve's own answer when max_queued_requests wait at the proxy: the same status as the replica's.
        "backpressure_config": {"status_code": 503, "retry_after_s": args.proxy_retry_after_s},
        # A replica that cannot load its model fails the same way the next time: fail the deploy at the
        # first failure, with its error, rather than after minutes of retries.
        "max_constructor_retry_count": args.max_constructor_retry_count,
    }
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    else:
        options["autoscaling_config"] = args.autoscaling.model_dump(exclude_none=True)
    return options


def build_app(args: ServeArgs | Mapping[str, Any]) -> Application:
    """The Serve application for ``args`` (a `ServeArgs`, or the mapping ``serve.yaml`` passes).

    Serve's application builders take exactly this one argument; see `application` for the rest.
    """
    return application(args)


def application(args: ServeArgs | Mapping[str, Any], *, replica_env: Mapping[str, str] | None = None) -> Application:
    """`build_app`, with environment variables for the replicas.

    ``sentiment serve`` sets ``HF_HUB_OFFLINE=1`` there once it has fetched the model into the cache
    the replicas share. Resolving ``auto`` resources asks the cluster for its GPUs and CPUs, so Ray
    must be running; when it is not, this connects to ``RAY_ADDRESS`` or starts a local Ray, as
    ``serve.run`` would.
    """
    import ray
    from ray import serve

    args = parse_serve_args(args)
    if not ray.is_initialized():
        ray.init()
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
    node_cpus = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0)
    options = deployment_options(args, cluster_gpus, node_cpus)
    if replica_env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(replica_env)}
    if args.ray_actor_options.num_cpus == "auto":
        logger.info(
            "num_cpus auto: %s CPUs per replica (%s).",
            options["ray_actor_options"]["num_cpus"],
            "a GPU replica tokenizes on one"
            if options["ray_actor_options"]["num_gpus"]
            else "a CPU replica runs on every core of a node; one replica per node",
        )
    if args.ray_actor_options.num_gpus == "auto":
        logger.info(
            "num_gpus auto: %s GPU per replica (the cluster has %s GPUs now). On an autoscaling cluster whose GPU "
            "nodes start at zero, 'auto' sees none: deploy deployments/serve-cluster.yaml (an explicit 0.25).",
            options["ray_actor_options"]["num_gpus"],
            cluster_gpus,
        )
    # The replica learns its resolved GPU share through its args, to set its memory cap.
    resources = {key: options["ray_actor_options"][key] for key in ("num_cpus", "num_gpus")}
    resolved = args.model_copy(update={"ray_actor_options": args.ray_actor_options.model_copy(update=resources)})
    deployment = serve.deployment(**options)(serve.ingress()(SentimentServer))
    return deployment.bind(resolved)
