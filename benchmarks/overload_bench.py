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
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ensure_checkpoint, start_serve
from benchmarks.serve_bench import percentile

WINDOW_S = 10.0
MAX_RETRY_WAIT_S = 5.0
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Run:
    name: str
    clients: int
    seconds: float = 0.0
    answered: int = 0
    answered_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    shed_by_replica: int = 0
    shed_by_proxy: int = 0
    other_statuses: dict[str, int] = field(default_factory=dict)
    max_replicas: int = 0
    windows: list[dict[str, float]] = field(default_factory=list)


async def closed_loop(url: str, texts: list[str], clients: int, duration_s: float, run: Run) -> None:
    # aiohttp, not httpx: httpx's connection pool slows down badly with hundreds of concurrent
    # connections (measured: 256 httpx clients got 11 answers/s where 64 got 115), so the client
    # would be the bottleneck, not the server.
    import aiohttp

    done: list[tuple[float, float]] = []  # (finish time, latency) of answered requests
    statuses: Counter[str] = Counter()
    issued = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        async def client() -> None:
            nonlocal issued
            while time.perf_counter() < deadline:
                text = texts[issued % len(texts)]
                issued += 1
                sent = time.perf_counter()
                try:
                    async with session.post(url, json={"text": text}) as response:
                        await response.read()
                        status = response.status
                        json_body = response.content_type == "application/json"
                        retry_after = response.headers.get("Retry-After", "1")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                finished = time.perf_counter()
                if status == 200:
                    done.append((finished - start, finished - sent))
                    continue
                if status == 503:
                    statuses["503 replica" if json_body else "503 proxy"] += 1
                    wait = min(MAX_RETRY_WAIT_S, float(retry_after), max(0.0, deadline - time.perf_counter()))
                    await asyncio.sleep(wait)
                    continue
                statuses[str(status)] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        run.seconds = round(time.perf_counter() - start, 2)
    latencies = [latency for _, latency in done]
    run.answered = len(done)
    run.answered_per_s = round(len(done) / run.seconds, 2)
    if latencies:
        run.p50_ms = round(1000 * statistics.median(latencies), 1)
        run.p99_ms = round(1000 * percentile(latencies, 99), 1)
    run.shed_by_replica = statuses.pop("503 replica", 0)
    run.shed_by_proxy = statuses.pop("503 proxy", 0)
    run.other_statuses = dict(statuses)
    for index in range(int(duration_s // WINDOW_S)):
        lo, hi = index * WINDOW_S, (index + 1) * WINDOW_S
        window = [latency for finished, latency in done if lo <= finished < hi]
        run.windows.append(
            {
                "from_s": lo,
                "answered_per_s": round(len(window) / WINDOW_S, 1),
                "p99_ms": round(1000 * percentile(window, 99), 1) if window else float("nan"),
            }
        )


async def watch_replicas(app: str, run: Run, stop: asyncio.Event) -> None:
    from ray import serve

    while not stop.is_set():
        status = await asyncio.to_thread(serve.status)
        application = status.applications.get(app)
        if application is not None:
            for deployment in application.deployments.values():
                run.max_replicas = max(run.max_replicas, deployment.replica_states.get("RUNNING", 0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=2)


async def measure(url: str, app: str, texts: list[str], clients: int, duration_s: float, run: Run) -> None:
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_replicas(app, run, stop))
    try:
        await closed_loop(url, texts, clients, duration_s, run)
    finally:
        stop.set()
        await watcher


def report(runs: list[Run], setup: str) -> str:
    peak = runs[0].answered_per_s or float("nan")
    lines = [
        setup,
        "",
        "| run | clients | answered/s | vs peak | p50 ms | p99 ms | 503 replica | 503 proxy | other | max replicas |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        other = ", ".join(f"{k}: {v}" for k, v in run.other_statuses.items()) or "none"
        lines.append(
            f"| {run.name} | {run.clients} | {run.answered_per_s:.1f} | {run.answered_per_s / peak:.2f}x "
            f"| {run.p50_ms:.0f} | {run.p99_ms:.0f} | {run.shed_by_replica} | {run.shed_by_proxy} | {other} "
            f"| {run.max_replicas} |"
        )
    lines += ["", "10-second windows (answered/s, p99 ms):", ""]
    for run in runs:
        cells = " ".join(f"{w['answered_per_s']:.0f}/{w['p99_ms']:.0f}" for w in run.windows)
        lines.append(f"- {run.name}: {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the checkpoint and results.json")
    parser.add_argument("--size", default="tiny", choices=["tiny", "base", "large"], help="checkpoint shape")
    parser.add_argument("--peak-clients", type=int, default=64, help="concurrency that saturates the endpoint")
    parser.add_argument("--factor", type=int, default=4, help="overload = factor x peak clients")
    parser.add_argument("--peak-duration", type=float, default=30, help="seconds of the peak run")
    parser.add_argument("--duration", type=float, default=60, help="seconds of each overload run")
    parser.add_argument("--num-cpus", default="auto", help="ray_actor_options.num_cpus (default: shipped auto)")
    parser.add_argument("--max-replicas", type=int, help="autoscaling.max_replicas (default: shipped)")
    parser.add_argument("--max-ongoing-requests", type=int, help="max_ongoing_requests (default: shipped)")
    options = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from benchmarks.corpus import make_reviews
    from deployments.app import build_app

    out = Path(options.out)
    checkpoint = ensure_checkpoint(out, options.size)
    texts = make_reviews(512, seed=11)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = start_serve()
    num_cpus: Any = options.num_cpus if options.num_cpus == "auto" else float(options.num_cpus)
    overload = options.peak_clients * options.factor
    plan = [
        ("peak", options.peak_clients, options.peak_duration, {}),
        ("shed", overload, options.duration, {}),
        ("stall", overload, options.duration, {"max_queue_wait_s": None}),
    ]
    runs: list[Run] = []
    try:
        for name, clients, duration, overrides in plan:
            args: dict[str, Any] = {
                "model": {"model_id": str(checkpoint)},
                "ray_actor_options": {"num_cpus": num_cpus},
                **overrides,
            }
            if options.max_replicas is not None:
                args["autoscaling"] = {"max_replicas": options.max_replicas}
            if options.max_ongoing_requests is not None:
                args["max_ongoing_requests"] = options.max_ongoing_requests
            serve.run(build_app(args), name=name, route_prefix=f"/{name}")
            run = Run(name=name, clients=clients)
            asyncio.run(measure(f"http://127.0.0.1:{port}/{name}/v1/classify", name, texts, clients, duration, run))
            runs.append(run)
            print(json.dumps(asdict(run)), flush=True)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([asdict(run) for run in runs], indent=2))
    setup = (
        f"{options.size} checkpoint, {os.cpu_count()} CPUs, num_cpus {options.num_cpus}, "
        f"max_replicas {options.max_replicas or 'shipped'}, 1 IMDB-like review per request, "
        f"clients honour Retry-After (at most {MAX_RETRY_WAIT_S:g} s)"
    )
    print("\n" + report(runs, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
