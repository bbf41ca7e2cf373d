"""The builder: `ServeArgs` in, a Serve application out.

`build_app` is what ``serve.yaml`` names (through `deployments.app`, its stable import path). The
replica class (`deployments.replica.SentimentServer`) is plain Python: its resources, replica count
and batching limits come from the args here, at build time, never from decorators.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deployments.args import AUTO_GPU_FRACTION, ServeArgs, parse_serve_args
from deployments.replica import SentimentServer
from sentiment.engines import backend_of

if TYPE_CHECKING:
    from ray.serve import Application

logger = logging.getLogger("ray.serve")


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
