"""How many model actors the batch job runs, with what GPU share, CPUs and threads, on the cluster it finds.

`pool_sizes` decides from the flags and the cluster's shape (GPUs, and each node's CPUs and memory);
`cluster_pool` reads that shape from the Ray this process is connected to. The model stage's
`map_batches` arguments come from the result (`pipelines.dataset`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.args import ScoringArgs

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
    launchable_gpus: float = 0,
    calls: int | None = None,
    actor_bytes: float | None = None,
) -> PoolSizes:
    """The model actor pool for ``args`` on a cluster with these GPUs and these nodes.

    Flags (``--actors``, ``--num-gpus``, ``--cpu-threads``, ``--num-cpus``) win; otherwise:

    - with GPUs (now, or ``launchable_gpus`` an autoscaler can add), one model actor per GPU, from 1
      up to every GPU, each reserving one CPU;
    - on CPU-only nodes, one single-threaded model actor per core, each tokenizing its own slices:
      separate processes beat one process's threads on a CPU (measured on 2 cores: BERT-base 1.18x,
      the tiny test model 1.4x). Fewer where the node's memory cannot hold a model copy per core
      (``actor_bytes`` each) or the job makes fewer model ``calls`` (`model_calls`); an actor then
      gets the node's spare cores as threads. Together they reserve what the node has beyond one CPU
      (`TASK_CPUS`), where the reads and writes run.
    """
    gpus = max(cluster_gpus, launchable_gpus)
    num_gpus = args.actor_gpus(gpus)
    if num_gpus > 0:
        fits = max(1, int(gpus / num_gpus))
        min_actors = args.min_actors or 1
        max_actors = args.max_actors or fits
        reason = f"{gpus:g} GPUs in the cluster, {num_gpus:g} per model actor"
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
    """`pool_sizes` on the Ray this process is connected to: its GPUs, its alive nodes, what its autoscaler can add."""
    import ray

    return pool_sizes(
        args,
        ray.cluster_resources().get("GPU", 0.0),
        _nodes(),
        _launchable_gpus(),
        calls=calls,
        actor_bytes=actor_bytes,
    )


def _nodes() -> list[NodeShape]:
    """CPUs and memory of each alive node that has CPUs."""
    import ray

    return [
        NodeShape(node["Resources"]["CPU"], node["Resources"].get("memory"))
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0
    ]


def _launchable_gpus() -> float:
    """GPUs the cluster's autoscaler could add, where it tells the GCS (autoscaler v2, KubeRay); else 0.

    Reads Ray's own state API (what Ray Data and Train use to size pools); a Ray without it counts 0.
    """
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private API: its absence or failure only means "unknown"
        return 0.0
    return float(limits.get("GPU", 0) or 0)
