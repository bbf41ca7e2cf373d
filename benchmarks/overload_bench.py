"""Overload: closed-loop HTTP load at a multiple of the saturating concurrency, with and without shedding.

    python -m benchmarks.overload_bench --out /tmp/overload [--size tiny] [--peak-clients 64] [--factor 4]
                                        [--peak-duration 30] [--duration 60] [--num-cpus auto] [--max-replicas 4]

Starts a local Ray and Serve on 127.0.0.1 and deploys the endpoint with the shipped defaults (but
the checkpoint, and ``--num-cpus``/``--max-replicas`` when given), from one replica each time, so
every run includes the autoscaler's transient. Three runs, each on a fresh deployment:

1. **peak**: ``--peak-clients`` closed-loop clients (the concurrency that saturates the endpoint);
2. **shed**: ``factor`` times as many clients, shipped ``max_queue_wait_s`` (the replica answers
   503 ``overloaded`` with Retry-After once it holds more than that many seconds of work);
3. **stall**: the same load with ``max_queue_wait_s: null`` (requests wait for their turn), the
   behaviour before shedding.

Each client sends one IMDB-like review per request and sends the next when the answer comes; a
503 makes it wait its Retry-After (at most 5 s) first, as a well-behaved client does. Prints, per
run: answered requests/s and its ratio to the peak run, p50/p99 latency of answered requests, the
503s (the replica's JSON ones and the proxy's plain-text ones apart), any other status (none is
expected), the most replicas running, and 10-second windows of throughput and p99 (the transient).
Bounded: every run stops at its duration, and every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    Load,
    Sampler,
    closed_loop,
    deployed,
    ensure_checkpoint,
    local_ray,
    markdown_table,
    serve_on_loopback,
    work_offline,
    write_json,
)
from sentiment.testing import make_reviews

WINDOW_S = 10.0
MAX_RETRY_WAIT_S = 5.0
REQUEST_TIMEOUT_S = 120.0


def running_replicas(app: str) -> float:
    from ray import serve

    application = serve.status().applications.get(app)
    deployments = application.deployments.values() if application else []
    return float(sum(deployment.replica_states.get("RUNNING", 0) for deployment in deployments))


def run_record(name: str, load: Load, max_replicas: int) -> dict[str, Any]:
    """A run's figures: answered requests (``requests``), the 503s by who sent them, any other outcome."""
    other = dict(load.failures)
    shed = {"shed_by_replica": other.pop("503 replica", 0), "shed_by_proxy": other.pop("503 proxy", 0)}
    windows = load.windows(WINDOW_S)
    return {
        "name": name,
        **load.summary(),
        **shed,
        "other_statuses": other,
        "max_replicas": max_replicas,
        "windows": windows,
    }


def report(runs: list[dict[str, Any]], setup: str) -> str:
    peak = runs[0]["requests_per_s"] or float("nan")
    header = ["run", "clients", "answered/s", "vs peak", "p50 ms", "p99 ms", "503 replica", "503 proxy", "other"]
    rows = [
        [
            *(run["name"], run["clients"], f"{run['requests_per_s']:.1f}", f"{run['requests_per_s'] / peak:.2f}x"),
            *(f"{run['p50_ms']:.0f}", f"{run['p99_ms']:.0f}", run["shed_by_replica"], run["shed_by_proxy"]),
            ", ".join(f"{k}: {v}" for k, v in run["other_statuses"].items()) or "none",
            run["max_replicas"],
        ]
        for run in runs
    ]
    windows = [
        f"- {run['name']}: " + " ".join(f"{w['answered_per_s']:.0f}/{w['p99_ms']:.0f}" for w in run["windows"])
        for run in runs
    ]
    table = markdown_table([*header, "max replicas"], rows)
    return "\n".join([setup, "", table, "", "10-second windows (answered/s, p99 ms):", "", *windows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload_bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", required=True, help="directory for the checkpoint and results.json")
    add("--size", default="tiny", choices=["tiny", "base", "large"], help="checkpoint shape")
    add("--peak-clients", type=int, default=64, help="concurrency that saturates the endpoint")
    add("--factor", type=int, default=4, help="overload = factor x peak clients")
    add("--peak-duration", type=float, default=30, help="seconds of the peak run")
    add("--duration", type=float, default=60, help="seconds of each overload run")
    add("--num-cpus", default="auto", help="ray_actor_options.num_cpus (default: shipped auto)")
    add("--max-replicas", type=int, help="autoscaling.max_replicas (default: shipped)")
    add("--max-ongoing-requests", type=int, help="max_ongoing_requests (default: shipped)")
    options = parser.parse_args(argv)
    work_offline()
    from deployments.builder import build_app

    out = Path(options.out)
    checkpoint = ensure_checkpoint(out, options.size)
    payloads = [{"text": text} for text in make_reviews(512, seed=11)]
    num_cpus: Any = options.num_cpus if options.num_cpus == "auto" else float(options.num_cpus)
    args: dict[str, Any] = {"model": {"model_id": str(checkpoint)}, "ray_actor_options": {"num_cpus": num_cpus}}
    if options.max_replicas is not None:
        args["autoscaling"] = {"max_replicas": options.max_replicas}
    if options.max_ongoing_requests is not None:
        args["max_ongoing_requests"] = options.max_ongoing_requests
    overload = options.peak_clients * options.factor
    plan = [
        ("peak", options.peak_clients, options.peak_duration, {}),
        ("shed", overload, options.duration, {}),
        ("stall", overload, options.duration, {"max_queue_wait_s": None}),
    ]
    runs = []
    with local_ray(), serve_on_loopback() as port:
        for name, clients, duration, overrides in plan:
            with (
                deployed(build_app({**args, **overrides}), name, port, "/v1/classify") as url,
                Sampler(lambda name=name: running_replicas(name), interval_s=2) as replicas,
            ):
                load = asyncio.run(
                    closed_loop(url, payloads, clients, duration, None, 0, MAX_RETRY_WAIT_S, REQUEST_TIMEOUT_S)
                )
            runs.append(run_record(name, load, int(max(replicas.samples, default=0))))
            print(json.dumps(runs[-1]), flush=True)
    write_json(out / "results.json", runs)
    setup = (
        f"{options.size} checkpoint, {os.cpu_count()} CPUs, num_cpus {options.num_cpus}, "
        f"max_replicas {options.max_replicas or 'shipped'}, 1 IMDB-like review per request, "
        f"clients honour Retry-After (at most {MAX_RETRY_WAIT_S:g} s)"
    )
    print("\n" + report(runs, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
