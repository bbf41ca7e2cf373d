"""The one harness every benchmark mode runs on: machine facts, inputs, processes, Serve apps,
closed-loop HTTP load and markdown tables. A mode is a short function over these.

Nothing here starts anything at import; Ray, torch and the HTTP client are imported where used.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sentiment.testing import make_checkpoint, popen_interruptible, write_corpus

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by GPU name, for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}

# -- the machine and the inputs ---------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), which make bf16 fast in PyTorch."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` reports it."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Model name:")]
    return names[0] if names else "unknown CPU"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def peak_tflops(device: str) -> float | None:
    """The card's dense bf16 peak when it is a GPU this knows, else None (no MFU)."""
    name = gpu_name() if device == "cuda" else ""
    return next((peak for key, peak in PEAK_TFLOPS.items() if name and key in name), None)


def machine(prog: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """When, where and how a benchmark ran: for its report's header."""
    import ray
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "command": f"python -m {prog} " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
    }


def work_offline() -> None:
    """No hub access from this process, and no tokenizer thread pools fighting the model's threads."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def ensure_checkpoint(out: Path, size: str = "base") -> Path:
    """A random-weight checkpoint of ``size`` under ``out``, built once (no network) and reused after."""
    checkpoint = out / f"checkpoint-{size}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, size=size)
    return checkpoint


def ensure_corpus(path: Path, rows: int, files: int = 1) -> Path:
    """The synthetic IMDB-length corpus (seed 0) under ``path``, written once and reused after."""
    if not path.exists():
        write_corpus(path, rows=rows, files=files, seed=0)
    return path


@dataclass
class Timer:
    seconds: float = 0.0


@contextlib.contextmanager
def timed() -> Iterator[Timer]:
    """``with timed() as t: ...`` leaves the block's wall time in ``t.seconds``."""
    timer = Timer()
    started = time.perf_counter()
    try:
        yield timer
    finally:
        timer.seconds = time.perf_counter() - started


class Sampler:
    """Calls ``sample`` every ``interval_s`` on a thread inside the ``with`` block, keeping its values
    and when each was taken (``time.time()``, so they compare with times other processes log).

    A sample that raises ends the sampling (a tool that is missing stays missing).
    """

    def __init__(self, sample: Callable[[], float], interval_s: float, enabled: bool = True) -> None:
        self.sample, self.interval_s, self.enabled = sample, interval_s, enabled
        self.samples: list[float] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                value = self.sample()
            except Exception:
                return
            self.times.append(time.time())
            self.samples.append(value)

    def __enter__(self) -> Sampler:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=10)

    def summary(self, since: float | None = None, until: float | None = None) -> dict[str, float]:
        """Count, mean and max of the samples, or of those taken between ``since`` and ``until`` (epoch seconds)."""
        samples = [
            value
            for taken, value in zip(self.times, self.samples, strict=True)
            if (since is None or taken >= since) and (until is None or taken <= until)
        ]
        return {
            "samples": len(samples),
            "mean": sum(samples) / len(samples) if samples else float("nan"),
            "max": max(samples, default=float("nan")),
        }


def gpu_busy_percent() -> float:
    """The GPU's utilization now, from ``nvidia-smi`` (a `Sampler`'s sample)."""
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    return float(subprocess.run(query, capture_output=True, text=True, timeout=5, check=True).stdout.split()[0])


# -- processes ------------------------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    """For a child process: offline, this checkout's code first, a fresh local Ray (never RAY_ADDRESS's)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(OFFLINE_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def sentiment_command(*args: str) -> list[str]:
    """The ``sentiment`` command line run by this interpreter."""
    return [sys.executable, "-m", "ray_sentiment", *args]


class Background:
    """A child process with its output in a log file; stopped with Ctrl-C (then killed) on exit."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env

    def __enter__(self) -> Background:
        self._file = self.log.open("w")
        env = self.env or child_environment()
        self.process = popen_interruptible(self.argv, cwd=REPO, env=env, stdout=self._file, stderr=subprocess.STDOUT)
        return self

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Until ``text`` shows in the log; fails if the process exits or time runs out first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[2:4]} exited with {self.process.returncode}: {self.output()[-2000:]}")
            time.sleep(1)
        raise TimeoutError(f"no {text!r} from {self.argv[2:4]} within {timeout_s:.0f} s: {self.output()[-2000:]}")

    def wait(self, timeout_s: float | None = None) -> int:
        return self.process.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._file.close()


def run_timed(argv: list[str], log: Path, timeout_s: float | None = None, env: dict[str, str] | None = None) -> float:
    """Seconds a process took from start to exit, its output in ``log``; fails, naming the log, unless it exits 0."""
    with timed() as took, Background(argv, log, env) as process:
        code = process.wait(timeout_s)
    if code != 0:
        raise RuntimeError(f"{argv[2:4]} exited with {code}; see {log}")
    return took.seconds


# -- Ray and Serve --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_ray(**options: Any) -> Iterator[Any]:
    """A fresh local Ray for the block (``options`` as for ``ray.init``), offline in every worker."""
    import ray

    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": OFFLINE_ENV},
        **options,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def serve_on_loopback() -> Iterator[int]:
    """Serve's HTTP proxy on 127.0.0.1 (benchmarks listen on loopback only) at a free port; Ray must be up."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


@contextlib.contextmanager
def deployed(app: Any, name: str, port: int, path: str = "") -> Iterator[str]:
    """``app`` running as Serve application ``name`` under ``/name`` for the block; yields its URL + ``path``."""
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield f"http://127.0.0.1:{port}/{name}{path}"
    finally:
        serve.delete(name)


def replica_infos(base: str, replicas: int, timeout_s: float) -> dict[str, dict[str, Any]]:
    """``/info`` of every replica behind ``base``, by replica id: rounds of concurrent requests (the
    router spreads them) until ``replicas`` ids have answered or time is up."""
    import httpx

    def info(_: int) -> dict[str, Any] | None:
        with contextlib.suppress(Exception):  # a replica restarting, a proxy hiccup: ask again
            response = client.get(f"{base}/info")
            return response.json() if response.status_code == 200 else None
        return None

    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(4 * replicas) as pool:
        while len(seen) < replicas and time.monotonic() < deadline:
            seen |= {str(answer.get("replica")): answer for answer in pool.map(info, range(4 * replicas)) if answer}
    return seen


class PipelineBaseline:
    """The plain deployment: ``transformers.pipeline`` called once per request, as in Ray's Serve examples."""

    def __init__(self, model_dir: str, dtype: str, device: str) -> None:
        import torch
        from transformers import pipeline

        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.classify = pipeline(
            "text-classification", model=model_dir, truncation=True, top_k=None, dtype=torch_dtype, device=device
        )

    async def __call__(self, request: Any) -> list[Any]:
        body = await request.json()
        return list(self.classify(body["texts"]))


def pipeline_baseline(checkpoint: Path, dtype: str, device: str, resources: dict[str, Any]) -> Any:
    """`PipelineBaseline` as a one-replica Serve application holding ``resources``."""
    from ray import serve

    deployment = serve.deployment(
        PipelineBaseline, name="PipelineBaseline", num_replicas=1, ray_actor_options=resources
    )
    return deployment.bind(str(checkpoint), dtype, device)


# -- closed-loop HTTP load ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Load:
    """What a closed-loop run saw: when each answered request finished and took, and everything else."""

    clients: int
    seconds: float = 0.0
    texts: int = 0
    answered: list[tuple[float, float]] = field(default_factory=list)
    """(finished at, latency) in seconds from the run's start, per 200 answer."""
    failures: Counter[str] = field(default_factory=Counter)
    """Every other outcome by kind: ``503 replica`` (JSON body), ``503 proxy``, other statuses, exceptions."""

    @property
    def errors(self) -> int:
        return sum(self.failures.values())

    def latency_ms(self, q: float) -> float:
        return round(1000 * percentile([latency for _, latency in self.answered], q), 1)

    def summary(self) -> dict[str, Any]:
        seconds = self.seconds or float("nan")
        return {
            "clients": self.clients,
            "requests": len(self.answered),
            "errors": self.errors,
            "texts": self.texts,
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(len(self.answered) / seconds, 3),
            "texts_per_s": round(self.texts / seconds, 3),
            "p50_ms": self.latency_ms(50),
            "p95_ms": self.latency_ms(95),
            "p99_ms": self.latency_ms(99),
        }

    def windows(self, width_s: float) -> list[dict[str, float]]:
        """Answers/s and p99 of each whole ``width_s`` window of the run (the transient)."""
        rows = []
        for index in range(int(self.seconds // width_s)):
            lo, hi = index * width_s, (index + 1) * width_s
            latencies = [latency for finished, latency in self.answered if lo <= finished < hi]
            p99 = round(1000 * percentile(latencies, 99), 1)
            rows.append({"from_s": lo, "answered_per_s": round(len(latencies) / width_s, 1), "p99_ms": p99})
        return rows


async def closed_loop(
    url: str,
    payloads: Sequence[dict[str, Any]],
    clients: int,
    duration_s: float,
    max_requests: int | None = None,
    warmup: int = 0,
    retry_after_cap_s: float = 0.0,
    timeout_s: float = 300.0,
) -> Load:
    """``clients`` clients each POST a payload (cycling through ``payloads``), wait, send the next.

    Bounded: no request starts after ``duration_s`` or beyond ``max_requests``, and each has a
    timeout. ``warmup`` untimed requests go first. With ``retry_after_cap_s``, a client answered
    503 waits its Retry-After (at most that) before its next request, as a well-behaved client does.
    Loopback only: this measures a server on this machine.
    """
    if urlsplit(url).hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"load goes to a server on this machine (127.0.0.1) only, got {url!r}")
    # aiohttp, not httpx: httpx's connection pool slows down badly with hundreds of concurrent
    # connections (measured: 256 httpx clients got 11 answers/s where 64 got 115), so the client
    # would be the bottleneck, not the server.
    import aiohttp

    load = Load(clients)
    limit = max_requests if max_requests is not None else float("inf")
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def post(payload: dict[str, Any]) -> tuple[int, bool, str]:
            async with session.post(url, json=payload) as response:
                await response.read()
                return (
                    response.status,
                    response.content_type == "application/json",
                    response.headers.get("Retry-After", "1"),
                )

        # Untimed: a per-request baseline's first pipeline calls are slow, and ours warmed up at start.
        await asyncio.gather(*(post(payloads[i % len(payloads)]) for i in range(warmup)), return_exceptions=True)
        issued = 0
        start = time.perf_counter()
        deadline = start + duration_s

        async def client() -> None:
            nonlocal issued
            while issued < limit and time.perf_counter() < deadline:
                payload = payloads[issued % len(payloads)]
                issued += 1
                sent = time.perf_counter()
                try:
                    status, json_body, retry_after = await post(payload)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    load.failures[type(exc).__name__] += 1
                    continue
                finished = time.perf_counter()
                if status == 200:
                    load.answered.append((finished - start, finished - sent))
                    load.texts += len(payload["texts"]) if "texts" in payload else 1
                    continue
                kind = ("503 replica" if json_body else "503 proxy") if status == 503 else str(status)
                load.failures[kind] += 1
                if status == 503 and retry_after_cap_s:
                    remaining = max(0.0, deadline - time.perf_counter())
                    await asyncio.sleep(min(retry_after_cap_s, float(retry_after), remaining))

        await asyncio.gather(*(client() for _ in range(clients)))
        load.seconds = time.perf_counter() - start
    return load


def load_each(
    port: int,
    apps: Sequence[tuple[str, Any, str]],
    payloads: Sequence[dict[str, Any]],
    levels: Sequence[int],
    duration_s: float,
    max_requests: int | None = None,
) -> dict[tuple[str, int], Load]:
    """Each ``(name, app, path)`` deployed in turn and loaded by `closed_loop` at each client count.

    One app at a time, so each has the machine to itself; every request cycles through the same
    ``payloads``; each level starts with as many untimed requests as it has clients.
    """
    loads = {}
    for name, app, path in apps:
        with deployed(app, name, port, path) as url:
            for clients in levels:
                load = asyncio.run(closed_loop(url, payloads, clients, duration_s, max_requests, warmup=clients))
                loads[name, clients] = load
                print(json.dumps({"system": name, **load.summary()}), flush=True)
    return loads


# -- reports --------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A markdown table of ``rows`` under ``header``; the columns numbered in ``right`` align right."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under {len(header)} columns: {row!r}")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|",
    ]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` as ``1.23x``; ``-`` when either is missing or zero."""
    return f"{value / reference:.2f}x" if value and reference else "-"


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def write_section(path: Path, section: str, name: str) -> None:
    """Replace the section of ``path`` between ``name``'s markers with ``section``, or append one."""
    start, end = f"<!-- {name}: start -->", f"<!-- {name}: end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
