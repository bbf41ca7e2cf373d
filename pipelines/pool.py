"""How many model actors the batch job runs, with what GPU share, CPUs and threads, on the cluster it finds.

`pool_sizes` decides from the flags and the cluster's shape (GPUs, and each node's CPUs and memory);
`cluster_pool` reads that shape from the Ray this process is connected to. The model stage's
`map_batches` arguments come from the result (`pipelines.dataset`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.args import ScoringArgs

logger = logging.getLogger(__name__)

# What CPU model actors leave unreserved on their node: the CPU that Ray Data's own tasks (read,
# repartition, select, write: light beside the model) reserve, so they always find one.
TASK_CPUS = 1.0
# Share of a node's Ray memory that CPU model actors may fill with their model copies.
ACTOR_MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class NodeShape:
    """What one alive node offers Ray: CPUs and memory (bytes; None where unknown)."""

    cpus: float
    memory: float | None = None


@dataclass(frozen=True)
class PoolSizes:
    """How many model actors may run, and with what, as resolved for this cluster."""

    num_gpus: float
    """GPUs per model actor."""
    min_actors: int
    max_actors: int
    cpu_threads: int | None
    """torch threads per model actor; None: Ray's default (its num_cpus, at most the cores)."""
    num_cpus: float
    """Logical CPUs each model actor reserves."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_gpus_per_actor": self.num_gpus,
            "min_actors": self.min_actors,
            "max_actors": self.max_actors,
            "cpu_threads": self.cpu_threads,
            "num_cpus_per_actor": self.num_cpus,
            "reason": self.reason,
        }


def pool_sizes(
    args: ScoringArgs,
    cluster_gpus: float,
    nodes: Sequence[NodeShape],
    calls: int | None = None,
    actor_bytes: float | None = None,
) -> PoolSizes:
    """The model actor pool for ``args`` on a cluster with these GPUs and these nodes.

    Flags (``--actors``, ``--num-gpus``, ``--cpu-threads``, ``--num-cpus``) win; otherwise:

    - with GPUs (``num_gpus`` 'auto' and GPUs up now, or a number), one model actor per GPU, from 1 up
      to every GPU up now (at least one: on an autoscaling cluster whose GPU nodes start at zero, the
      first actor's request makes the autoscaler add one; ``--actors`` asks for more), each
      reserving one CPU;
    - on CPU-only nodes, one single-threaded model actor per core, each tokenizing its own slices:
      separate processes beat one process's threads on a CPU (measured on 2 cores: BERT-base 1.18x,
      the tiny test model 1.4x). Fewer where the node's memory cannot hold a model copy per core
      (``actor_bytes`` each) or the job makes fewer model ``calls`` (`model_calls`); an actor then
      gets the node's spare cores as threads. Together they reserve what the node has beyond one CPU
      (`TASK_CPUS`), where the reads and writes run.
    """
    num_gpus = args.actor_gpus(cluster_gpus)
    if num_gpus > 0:
        fits = max(1, int(cluster_gpus / num_gpus))
        min_actors = args.min_actors or 1
        max_actors = args.max_actors or fits
        reason = f"{cluster_gpus:g} GPUs up in the cluster, {num_gpus:g} per model actor"
        num_cpus = 1.0 if args.num_cpus is None else args.num_cpus
        return PoolSizes(num_gpus, min_actors, max(min_actors, max_actors), args.cpu_threads, num_cpus, reason)

    nodes = list(nodes) or [NodeShape(1)]
    cores = max(1, int(min(node.cpus for node in nodes)))
    if args.max_actors or args.min_actors:
        min_actors = args.min_actors or 1
        max_actors = max(min_actors, args.max_actors or min_actors)
        per_node = math.ceil(max_actors / len(nodes))
        reason = f"--actors {min_actors}-{max_actors}"
    else:
        per_node = max(1, cores // (args.cpu_threads or 1))
        reason = f"no GPU; {len(nodes)} node(s) with {cores} CPUs or more, one model actor per core"
        memories = [node.memory for node in nodes if node.memory]
        if actor_bytes and memories:
            fit = max(1, int(ACTOR_MEMORY_SHARE * min(memories) / actor_bytes))
            if fit < per_node:
                per_node = fit
                reason += f", {fit} per node by memory ({actor_bytes / 2**30:.1f} GiB each)"
        max_actors = per_node * len(nodes)
        if calls is not None and calls < max_actors:
            # More actors than calls would only load the model and wait.
            max_actors = max(1, calls)
            per_node = math.ceil(max_actors / len(nodes))
            reason += f", {max_actors} for {calls} model call(s)"
        min_actors = max_actors
    threads = args.cpu_threads or max(1, cores // per_node)
    # Logical CPUs keep a node's tasks and actors from waiting on each other; threads use its cores.
    shared = round(max(0.0, cores - TASK_CPUS) / per_node, 3)
    num_cpus = shared if args.num_cpus is None else args.num_cpus
    return PoolSizes(0.0, min_actors, max_actors, threads, num_cpus, f"{reason}, {threads} torch thread(s) each")


def model_calls(slice_rows: Sequence[int], rows_per_call: int) -> int:
    """How many calls the model stage gets for slices of these sizes, in order.

    Ray Data gathers blocks for a ``map_batches`` call until they hold ``rows_per_call`` rows, so
    small slices (small files, row groups) share a call.
    """
    calls, gathered = 0, 0
    for rows in slice_rows:
        gathered += rows
        if gathered >= rows_per_call:
            calls, gathered = calls + 1, 0
    return calls + (gathered > 0)


def cluster_pool(args: ScoringArgs, calls: int | None, actor_bytes: float | None) -> PoolSizes:
    """`pool_sizes` on the Ray this process is connected to: its GPUs and its alive nodes.

    Logs a warning when ``num_gpus: auto`` runs CPU actors on a cluster this process joined (see
    `auto_on_cpu_warning`).
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0)
    nodes = _nodes()
    joined = os.environ.get("RAY_ADDRESS", "local") not in ("", "local")
    warning = auto_on_cpu_warning(args, gpus, len(nodes), joined)
    if warning:
        logger.warning(warning)
    return pool_sizes(args, gpus, nodes, calls=calls, actor_bytes=actor_bytes)


def auto_on_cpu_warning(args: ScoringArgs, cluster_gpus: float, node_count: int, joined: bool) -> str | None:
    """What to say when ``num_gpus: auto`` sees no GPU on a cluster (several nodes, or one this process joined).

    'auto' counts the GPUs that are up when the job starts: Ray 2.60 tells a job nothing of the GPU
    nodes an autoscaler could add (neither its cluster launcher nor KubeRay report them), so on a
    cluster whose GPU workers start at zero 'auto' means CPU actors. On a laptop that is the point;
    on a cluster it is most likely a forgotten ``--num-gpus``, so it is said at start, with the fix.
    """
    if args.num_gpus != "auto" or cluster_gpus > 0 or not (joined or node_count > 1):
        return None
    return (
        "num_gpus is 'auto' and no GPU is up in this cluster: the model runs on CPU actors. On an autoscaling "
        "cluster whose GPU nodes start at zero, ask for GPUs explicitly (--num-gpus 1, or batch.num_gpus: 1) "
        "and the autoscaler adds GPU nodes for the actors; --num-gpus 0 runs on CPUs without this warning."
    )


def _nodes() -> list[NodeShape]:
    """CPUs and memory of each alive node that has CPUs."""
    import ray

    return [
        NodeShape(node["Resources"]["CPU"], node["Resources"].get("memory"))
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0
    ]
