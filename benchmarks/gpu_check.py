"""The GPU check: one command that proves the GPU path on a real card in under ten minutes, no network.

    python -m benchmarks.gpu_check --out DIR [--dry-run] [--rows N] [--clients 16,64] [--duration 10]

On one random-weight BERT-large checkpoint built here (`sentiment.testing.make_checkpoint`) and one
synthetic corpus of IMDB-length reviews (`sentiment.testing`), each step runs the shipped code, in a
child process of its own with a timeout (``STEP_TIMEOUTS_S``, 8 minutes in all), and its result is
written to ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` as soon as it is known, so a run cut short
(a borrowed card taken back at 10 minutes) keeps every step that finished:

1. **precision**: `SentimentClassifier` in fp32, bf16 and fp16 on the same reviews: max |Δp| against
   fp32 (``PRECISION_MAX_DP``), and what ``device/dtype: auto`` resolve to;
2. **model_only**: ``SentimentClassifier.forward`` on pre-tokenized reviews in the auto precision at
   a few token budgets, each with ``forward_max_inputs`` 64 and 256 (short reviews stop at 64 rows
   a pass before a 16k budget binds): tokens/s and MFU (forward FLOPs from the model's shapes over
   the card's dense bf16 peak), the padding share, and the best as bare forward passes on tensors
   already on the card (the gap is host work);
3. **compile**: the best of those, eager and ``torch.compile``'d side by side: compile seconds,
   tokens/s and MFU, max |Δp|;
4. **online**: ``sentiment serve`` with 4 replicas, ``num_gpus: auto`` (0.25 GPU each on one card),
   CPUs from those this process may use, closed-loop clients at each level: requests/s, p50/p99,
   errors; every replica's device, dtype and memory cap from ``/info``: a fractional replica's cap
   must be its share of the card, and its peak CUDA memory under it;
5. **offline** and **offline_compile**: ``sentiment batch`` with its shipped defaults (then with
   ``--compile``) over the corpus (60,000 reviews): the model actors' steady rate (rows over the
   seconds they spent in calls, from the job's actor log, with and without each actor's first
   call), GPU busy % sampled with ``nvidia-smi`` while the actors ran, and the job's own figures;
6. **oom**: a classifier capped to its weights plus 1 GiB, asked for far bigger forward passes: it
   must split them and give the uncapped probabilities (fp32, max |Δp| <= ``OOM_MAX_DP``).

At the start it logs the card's free memory (``torch.cuda.mem_get_info``) and ``ray status``.
Exits 0 when every step ran and its checks held (targets missed are reported, not failures).
``--dry-run`` runs every step on the CPU with a tiny checkpoint and 300 reviews (the OOM is injected
at ``_forward_batch``, since a CPU never raises CUDA OOM), so CI keeps this script from rotting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    REPO,
    Background,
    Sampler,
    child_environment,
    closed_loop,
    ensure_checkpoint,
    ensure_corpus,
    free_port,
    gpu_busy_percent,
    machine,
    markdown_table,
    peak_tflops,
    replica_infos,
    run_timed,
    sentiment_command,
    work_offline,
    write_json,
)
from benchmarks.run import against_fp32, forward_flops
from sentiment.testing import make_reviews

REPLICAS = 4
# Targets of the GPU path issue, judged on a real card only: 3,000 IMDB reviews/s on one H200 needs
# about 49% useful MFU.
TARGET_MFU = 0.50
TARGET_REVIEWS_PER_S = 3000.0
PRECISION_REVIEWS = 512
MODEL_ONLY_REVIEWS = 2048
GPU_BUDGETS = (16384, 32768, 65536)
CPU_BUDGETS = (512, 1024)
FORWARD_MAX_INPUTS = (64, 256)
GPU_ROWS = 60_000
DRY_RUN_ROWS = 300
# What a step may take on a card, in seconds: 480 in all, so that with the checkpoint, the corpus and
# the start a run fits in the 10 minutes a borrowed card may give. A step past its time is stopped and
# reported; the others still run.
STEP_TIMEOUTS_S: dict[str, float] = {
    "precision": 40,
    "model_only": 75,
    "compile": 75,
    "online": 75,
    "offline": 90,
    "offline_compile": 90,
    "oom": 35,
}
# The dry run's steps on a CPU (a tiny model, but process starts and Ray on a few shared cores).
DRY_RUN_SLOWDOWN = 4
# Largest |Δp| allowed against fp32 (on the CPU, the tiny test model gives 0.004 in bf16, 0.0005 in fp16).
PRECISION_MAX_DP = {"bf16": 2e-2, "fp16": 2e-2}
# torch.compile against eager, same precision: kernels differ, results should not by more than this.
COMPILE_MAX_DP = 2e-2
# A split pass against the uncapped one, both fp32: only the batches differ.
OOM_MAX_DP = 1e-4
REPLICA_KEYS = ("device", "dtype", "replica_gpus", "reserved_gpus", "gpu_memory_fraction", "gpu_memory_cap_bytes")


@dataclass
class Step:
    name: str
    ok: bool = False
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Setup:
    out: Path
    dry_run: bool
    device: str
    checkpoint: Path
    corpus: Path
    rows: int
    clients: tuple[int, ...]
    duration: float
    gpu_total_bytes: int | None = None
    """The card's memory (``total_memory``), what a fractional replica's cap is a share of; None on a CPU."""

    @property
    def size(self) -> str:
        return "tiny" if self.dry_run else "large"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out), "checkpoint": str(self.checkpoint), "corpus": str(self.corpus)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Setup:
        paths = {key: Path(data[key]) for key in ("out", "checkpoint", "corpus")}
        return cls(**{**data, **paths, "clients": tuple(data["clients"])})


def step_timeout_s(name: str, dry_run: bool) -> float:
    return STEP_TIMEOUTS_S[name] * (DRY_RUN_SLOWDOWN if dry_run else 1)


# -- steps (each runs in a child process of its own: `run_in_child`) --------------------------------


def precision(setup: Setup) -> dict[str, Any]:
    """Probabilities in each precision against fp32 on the same reviews; what 'auto' resolves to."""
    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier

    texts = make_reviews(min(PRECISION_REVIEWS, setup.rows), seed=1)
    auto = SentimentClassifier(ModelConfig(model_id=str(setup.checkpoint)))
    resolved = {key: auto.describe()[key] for key in ("device", "dtype", "reserved_gpus", "gpu_memory_cap_bytes")}
    del auto
    _free_cuda()
    probabilities: dict[str, np.ndarray] = {}
    for dtype in ("fp32", "bf16", "fp16"):
        classifier = SentimentClassifier(ModelConfig(model_id=str(setup.checkpoint), dtype=dtype, device=setup.device))
        probabilities[dtype] = _probabilities(classifier.predict(texts), classifier.labels)
        del classifier
        _free_cuda()
    against = against_fp32(probabilities)
    for dtype, values in probabilities.items():
        if dtype in against:
            against[dtype]["mean_abs_dp"] = float(np.abs(values - probabilities["fp32"]).mean())
    return {"reviews": len(texts), "auto_outside_ray": resolved, "against_fp32": against}


def model_only(setup: Setup) -> dict[str, Any]:
    """``forward`` alone on pre-tokenized reviews at a few budgets and row limits, then the best as bare passes."""
    import torch

    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier, plan_batches

    classifier = SentimentClassifier(ModelConfig(model_id=str(setup.checkpoint), device=setup.device))
    windows, lengths, tokens, flops = _model_only_inputs(classifier, setup)
    peak = peak_tflops(setup.device)
    classifier.warmup()
    variants: dict[str, Any] = {}
    for inputs in FORWARD_MAX_INPUTS:
        for budget in GPU_BUDGETS if setup.device == "cuda" else CPU_BUDGETS:
            seconds = _time_forward(classifier, windows, setup.device, budget=budget, inputs=inputs)
            batches = plan_batches(lengths, budget, inputs)
            padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
            variants[f"{budget}/{inputs}"] = {
                "forward_max_tokens": budget,
                "forward_max_inputs": inputs,
                "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / (peak * 1e12) if peak else None,
                "padding_share": 1 - tokens / padded,
                "forward_passes": len(batches),
            }
    best = max(variants, key=lambda name: variants[name]["tokens_per_s"])
    budget, inputs = variants[best]["forward_max_tokens"], variants[best]["forward_max_inputs"]

    # The best variant's batches again, as tensors built and moved beforehand: only the model runs in
    # the timed loop, so the gap to `forward` is host work (padding, copies, softmax, the read-back).
    prepared = []
    for batch in plan_batches(lengths, budget, inputs):
        longest = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), longest), classifier._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : lengths[index]] = torch.tensor(windows[index])
            mask[row, : lengths[index]] = 1
        prepared.append((ids.to(classifier.device), mask.to(classifier.device)))
    _synchronize(setup.device)
    started = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in prepared:
            classifier.model(input_ids=ids, attention_mask=mask)
    _synchronize(setup.device)
    bare = tokens / (time.perf_counter() - started)
    return {
        "dtype": classifier.dtype,
        "reviews": len(windows),
        "model_tokens": tokens,
        "peak_tflops": peak,
        "variants": variants,
        "best": {"forward_max_tokens": budget, "forward_max_inputs": inputs},
        "tokens_per_s": variants[best]["tokens_per_s"],
        "mfu": variants[best]["mfu"],
        "bare_forward_tokens_per_s": bare,
        "bare_forward_mfu": flops * bare / tokens / (peak * 1e12) if peak else None,
    }


def compile_step(setup: Setup) -> dict[str, Any]:
    """Eager against ``torch.compile`` at the best model-only variant (64 rows and the first budget without one)."""
    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier

    best = _earlier_result(setup, "model_only").get("best", {})
    budget = best.get("forward_max_tokens", GPU_BUDGETS[0] if setup.device == "cuda" else CPU_BUDGETS[-1])
    inputs = best.get("forward_max_inputs", FORWARD_MAX_INPUTS[0])
    config = ModelConfig(
        model_id=str(setup.checkpoint), device=setup.device, forward_max_tokens=budget, forward_max_inputs=inputs
    )
    peak = peak_tflops(setup.device)
    figures: dict[str, Any] = {"forward_max_tokens": budget, "forward_max_inputs": inputs}
    probabilities = {}
    for compiled in (False, True):
        classifier = SentimentClassifier(config.model_copy(update={"compile": compiled}))
        windows, _, tokens, flops = _model_only_inputs(classifier, setup)
        # The first pass over everything also compiles (every shape class, the unmasked graph too).
        first = _time_forward(classifier, windows, setup.device, warm=False)
        seconds = _time_forward(classifier, windows, setup.device, warm=False)
        probabilities[compiled] = classifier.forward(windows)
        figures["dtype"] = classifier.dtype
        figures["compiled" if compiled else "eager"] = {
            "first_pass_seconds": first,
            "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / (peak * 1e12) if peak else None,
        }
        del classifier
        _free_cuda()
    figures["max_abs_dp"] = float(np.abs(probabilities[True] - probabilities[False]).max())
    figures["speedup"] = figures["compiled"]["tokens_per_s"] / figures["eager"]["tokens_per_s"]
    return figures


def online(setup: Setup) -> dict[str, Any]:
    """``sentiment serve`` with 4 replicas (0.25 GPU each on a card), closed-loop clients at each level."""
    from sentiment.devices import available_cpus

    port = free_port()
    config = setup.out / "serve.yaml"
    # num_gpus stays auto: on a machine with a GPU it must resolve to 0.25. CPUs: those this process
    # may use (a container's share, not the host's count), one left for the proxy and the clients. On
    # the CPU (dry run), four replicas must fit beside each other on however few cores there are.
    cpus = available_cpus()
    actor_options = {"num_cpus": 0.25} if setup.dry_run else {"num_cpus": max(1, cpus // (REPLICAS + 1))}
    config.write_text(
        json.dumps(
            {"model": {"model_id": str(setup.checkpoint)}, "num_replicas": REPLICAS, "ray_actor_options": actor_options}
        )
    )
    argv = sentiment_command("serve", "--config", str(config), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    with Background(argv, setup.out / "serve.log") as server:
        server.wait_for("Serving ", timeout_s=step_timeout_s("online", setup.dry_run))
        replicas = replica_infos(base, REPLICAS, timeout_s=30)
        texts = make_reviews(512, seed=3)
        payloads = [{"texts": [text]} for text in texts]
        levels = []
        for clients in setup.clients:
            load = asyncio.run(closed_loop(f"{base}/v1/classify", payloads, clients, setup.duration, warmup=clients))
            levels.append({"system": "ours", "dtype": "auto", **load.summary()})
        after = replica_infos(base, REPLICAS, timeout_s=30)
    return {
        "replica_cpus": actor_options["num_cpus"],
        "replicas": {
            replica: {key: info[key] for key in REPLICA_KEYS}
            | {"gpu_memory_peak_bytes": after.get(replica, {}).get("gpu_memory_peak_bytes")}
            for replica, info in replicas.items()
        },
        "replicas_serving": len(replicas),
        "levels": levels,
        "errors": sum(level["errors"] for level in levels),
    }


def offline(setup: Setup, compiled: bool = False) -> dict[str, Any]:
    """``sentiment batch`` with its shipped defaults over the corpus; the actors' steady rate and GPU busy %."""
    output = setup.out / ("scored-compile" if compiled else "scored")
    argv = sentiment_command("batch", str(setup.corpus), str(output), "--model", str(setup.checkpoint), "--overwrite")
    if compiled:
        argv.append("--compile")
    log = setup.out / ("batch-compile.log" if compiled else "batch.log")
    with Sampler(gpu_busy_percent, interval_s=0.5, enabled=not setup.dry_run) as sampler:
        seconds = run_timed(argv, log, timeout_s=step_timeout_s("offline", setup.dry_run))
    report = json.loads((output / "_report.json").read_text())
    actors = report["actors"]
    rate = actors_rate(actors)
    # Only while the model actors ran: the job's start (Ray, workers, the model load) is not the card's work.
    busy = sampler.summary(rate["first_call_at"], rate["last_call_at"])
    return {
        "compile": compiled,
        "rows": report["processed_rows"],
        "errors": report["errors"],
        **{key: value for key, value in rate.items() if not key.endswith("_at")},
        "reviews_per_s_in_job": report["rows_per_second"],
        "reviews_per_s_whole_process": report["processed_rows"] / seconds,
        "job_seconds": report["seconds"],
        "process_seconds": seconds,
        "num_gpus_per_actor": report["model"]["num_gpus_per_actor"],
        "actors": actors,
        "gpu_busy": busy,
    }


def actors_rate(actors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The model actors' own rate from the job's actor log: each actor's rows over the seconds it spent in
    calls, summed over actors, with and without each actor's first call (CUDA set-up, compiling); and the
    wall-clock span of the actors' calls."""
    rows = sum(actor.get("rows", 0) for actor in actors)
    steady = sum(a["rows"] / a["model_seconds"] for a in actors if a.get("model_seconds"))
    warm = 0.0
    for actor in actors:
        seconds = actor.get("model_seconds", 0.0) - actor.get("first_call_seconds", 0.0)
        if seconds > 0:
            warm += (actor["rows"] - actor.get("first_call_rows", 0)) / seconds
    starts = [a["first_call_at"] for a in actors if a.get("first_call_at")]
    ends = [a["last_call_at"] for a in actors if a.get("last_call_at")]
    return {
        "actor_rows": rows,
        "actor_model_seconds": max((a.get("model_seconds", 0.0) for a in actors), default=0.0),
        "reviews_per_s_actors": steady,
        "reviews_per_s_actors_after_first_call": warm,
        "first_call_at": min(starts, default=None),
        "last_call_at": max(ends, default=None),
    }


def offline_compile(setup: Setup) -> dict[str, Any]:
    return offline(setup, compiled=True)


def oom(setup: Setup) -> dict[str, Any]:
    """A capped classifier asked for forward passes far over its memory: it splits, and gives the same
    probabilities as an uncapped one (both fp32, so that only the batches differ)."""
    import torch

    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier

    texts = make_reviews(256 if setup.dry_run else 1024, seed=4)
    base = ModelConfig(model_id=str(setup.checkpoint), device=setup.device, dtype="fp32")
    reference = SentimentClassifier(base)
    want = _probabilities(reference.predict(texts), reference.labels)
    weights = sum(p.numel() * p.element_size() for p in reference.model.parameters())
    del reference
    _free_cuda()

    fraction = None
    if setup.gpu_total_bytes:
        fraction = min(1.0, (weights + 2**30) / setup.gpu_total_bytes)
    # Budgets far over what the cap holds: hundreds of 512-token reviews in one pass.
    config = base.model_copy(
        update={"gpu_memory_fraction": fraction, "forward_max_tokens": 1024 * 512, "forward_max_inputs": 1024}
    )
    capped = SentimentClassifier(config)
    injected = setup.dry_run
    if injected:
        original = capped._forward_batch

        def forward(batch: Any) -> Any:
            if len(batch) > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected: dry run)")
            return original(batch)

        capped._forward_batch = forward  # type: ignore[method-assign]
    got = _probabilities(capped.predict(texts), capped.labels)
    return {
        "injected": injected,
        "reviews": len(texts),
        "splits": capped.oom_splits,
        "max_abs_dp": float(np.abs(got - want).max()),
        "gpu_memory_cap_bytes": capped.gpu_memory_cap_bytes,
        "gpu_memory_peak_bytes": capped.peak_gpu_memory_bytes(),
        "weights_bytes": weights,
    }


STEPS: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "precision": precision,
    "model_only": model_only,
    "compile": compile_step,
    "online": online,
    "offline": offline,
    "offline_compile": offline_compile,
    "oom": oom,
}


# -- what each step must show (targets aside) ------------------------------------------------------


def checks(name: str, result: dict[str, Any], setup: Setup) -> list[str]:
    """What must hold for a step to pass (targets aside): a list of failures, empty when it passed."""
    failed = []
    if name == "precision":
        if setup.device == "cuda" and not result["auto_outside_ray"]["device"].startswith("cuda"):
            failed.append(f"device auto resolved to {result['auto_outside_ray']['device']} on a GPU machine")
        for dtype, against in result["against_fp32"].items():
            if against["max_abs_dp"] > PRECISION_MAX_DP[dtype]:
                failed.append(
                    f"{dtype}: max |dp| {against['max_abs_dp']:.4f} against fp32, over {PRECISION_MAX_DP[dtype]}"
                )
    if name == "compile" and result["max_abs_dp"] > COMPILE_MAX_DP:
        failed.append(f"compiled: max |dp| {result['max_abs_dp']:.4f} against eager, over {COMPILE_MAX_DP}")
    if name == "online":
        if result["replicas_serving"] != REPLICAS:
            failed.append(f"{result['replicas_serving']} of {REPLICAS} replicas answered")
        if result["errors"]:
            failed.append(f"{result['errors']} requests failed")
        wanted_gpus = 0.0 if setup.dry_run else 1 / REPLICAS
        devices = {info["replica_gpus"] for info in result["replicas"].values()}
        if devices != {wanted_gpus}:
            failed.append(f"replicas reserved {sorted(devices)} GPU, expected {wanted_gpus}")
        if not setup.dry_run and any(not info["device"].startswith("cuda") for info in result["replicas"].values()):
            failed.append("a replica did not run on the GPU")
        failed += cap_failures(result["replicas"], setup.gpu_total_bytes)
    if name in ("offline", "offline_compile"):
        if result["rows"] != setup.rows or result["errors"]:
            failed.append(f"{result['rows']} rows scored of {setup.rows}, {result['errors']} with errors")
        if result["actor_rows"] != result["rows"]:
            failed.append(f"the actor log holds {result['actor_rows']} rows of {result['rows']}: no steady rate")
        if not setup.dry_run and any(not actor["device"].startswith("cuda") for actor in result["actors"]):
            failed.append("a batch actor did not run on the GPU")
    if name == "oom":
        if result["splits"] < 1:
            failed.append("no forward pass was split: the cap did not bite")
        if result["max_abs_dp"] > OOM_MAX_DP:
            failed.append(f"probabilities after splitting moved by up to {result['max_abs_dp']:.2e}, over {OOM_MAX_DP}")
    return failed


def cap_failures(replicas: dict[str, dict[str, Any]], total_bytes: int | None) -> list[str]:
    """Every replica with a fraction of a GPU must cap its CUDA memory to exactly that share of the card
    (a replica that set no cap can take the whole card: Ray does not isolate fractions), and stay under it."""
    failed = []
    for replica, info in sorted(replicas.items()):
        gpus, cap, peak = info["replica_gpus"], info["gpu_memory_cap_bytes"], info.get("gpu_memory_peak_bytes")
        if 0 < gpus < 1:
            share = None if total_bytes is None else int(total_bytes * gpus)
            if cap is None:
                failed.append(f"replica {replica} holds {gpus} GPU but set no memory cap")
            elif share is not None and cap != share:
                failed.append(f"replica {replica} capped at {cap} bytes; its {gpus} GPU share is {share} bytes")
        if cap is not None and peak is not None and peak > cap:
            failed.append(f"replica {replica} peaked at {peak} bytes, over its cap of {cap}")
    return failed


# -- running and reporting -------------------------------------------------------------------------


class StepTimeout(Exception):
    pass


def run_in_child(name: str, setup: Setup) -> dict[str, Any]:
    """Run step ``name`` in a child process of its own (its CUDA context, memory cap and compile caches die
    with it), in a process group stopped whole when the step runs past its time."""
    result = setup.out / "steps" / f"{name}.json"
    result.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(setup.out), "--step", name]
    timeout_s = step_timeout_s(name, setup.dry_run)
    log = setup.out / f"step-{name}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            argv, cwd=REPO, env=child_environment(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise StepTimeout(f"stopped after its {timeout_s:.0f} s (see {log})") from None
        finally:
            _stop_group(process)
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise RuntimeError(f"exited with {code}: {lines[-1] if lines else 'no output'} (see {log})")
    return dict(json.loads(result.read_text()))


def run_steps(
    setup: Setup,
    names: Sequence[str],
    facts: dict[str, Any],
    run: Callable[[str, Setup], dict[str, Any]] = run_in_child,
) -> list[Step]:
    """Each step in turn; the report (JSON and markdown) is written before the first and after every step."""
    steps: list[Step] = []
    started = time.perf_counter()
    write_report(setup, steps, facts, time.perf_counter() - started)
    for name in names:
        step = Step(name)
        print(f"[gpu_check] {name} (at most {step_timeout_s(name, setup.dry_run):.0f} s) ...", flush=True)
        began = time.perf_counter()
        try:
            step.result = run(name, setup)
            failures = checks(name, step.result, setup)
            step.ok = not failures
            step.error = "; ".join(failures) or None
        except Exception as exc:
            step.error = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, StepTimeout | RuntimeError):
                traceback.print_exc()
        step.seconds = time.perf_counter() - began
        print(
            f"[gpu_check] {name}: {'ok' if step.ok else 'FAILED: ' + str(step.error)} ({step.seconds:.0f} s)",
            flush=True,
        )
        steps.append(step)
        write_report(setup, steps, facts, time.perf_counter() - started)
    return steps


def write_report(setup: Setup, steps: list[Step], facts: dict[str, Any], seconds: float) -> str:
    """``gpu_check.json`` and ``gpu_check.md`` as they stand: called after every step, so nothing measured is lost."""
    report = {**facts, "dry_run": setup.dry_run, "rows": setup.rows, "seconds": seconds}
    write_json(setup.out / "gpu_check.json", {**report, "steps": [asdict(step) for step in steps]})
    try:
        table = render(setup, steps, facts)
    except Exception as exc:  # a result the table cannot show must not cost the JSON, written above
        table = f"GPU check: the table could not be rendered ({type(exc).__name__}: {exc}); see gpu_check.json\n"
    (setup.out / "gpu_check.md").write_text(table)
    return table


def render(setup: Setup, steps: list[Step], facts: dict[str, Any]) -> str:
    """The report: who ran what where, and one table of figures, each with its target where it has one."""
    results = {step.name: step.result for step in steps if step.result}

    def judged(met: bool) -> str:
        return "n/a (dry run)" if setup.dry_run else ("met" if met else "MISSED")

    def tokens_per_s(value: float, mfu: float | None) -> str:
        return f"{value:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")

    rows = [[step.name, "FAILED", str(step.error).replace("|", "/"), ""] for step in steps if not step.ok]
    free, total = facts.get("gpu_memory_free_bytes"), facts.get("gpu_memory_total_bytes")
    if free is not None:
        rows.append(["start", "GPU memory free (torch.cuda.mem_get_info)", f"{_gib(free)} of {_gib(total)}", ""])
    if r := results.get("precision"):
        resolved = r["auto_outside_ray"]
        rows.append(["precision", "auto outside Ray", f"{resolved['device']}, {resolved['dtype']}", ""])
        for dtype, against in r["against_fp32"].items():
            value = f"max abs dp {against['max_abs_dp']:.4f}, mean {against.get('mean_abs_dp', float('nan')):.5f}"
            rows.append(
                ["precision", f"{dtype} vs fp32 ({r['reviews']} reviews)", value, f"<= {PRECISION_MAX_DP[dtype]}"]
            )
    if r := results.get("model_only"):
        for f in r["variants"].values():
            value = f"{tokens_per_s(f['tokens_per_s'], f['mfu'])}, padding {f['padding_share']:.1%}"
            figure = f"{r['dtype']}, budget {f['forward_max_tokens']}, {f['forward_max_inputs']} rows"
            rows.append(["model-only", figure, value, ""])
        best = r["best"]
        target = f">= {TARGET_MFU:.0%} MFU: {judged(r['mfu'] is not None and r['mfu'] >= TARGET_MFU)}"
        figure = f"best ({best['forward_max_tokens']}, {best['forward_max_inputs']} rows)"
        rows.append(["model-only", figure, tokens_per_s(r["tokens_per_s"], r["mfu"]), target])
        bare = tokens_per_s(r["bare_forward_tokens_per_s"], r["bare_forward_mfu"])
        rows.append(["model-only", "bare forward passes (tensors on the device)", bare, "host work = the gap above"])
    if r := results.get("compile"):
        for variant in ("eager", "compiled"):
            f = r[variant]
            value = f"{tokens_per_s(f['tokens_per_s'], f['mfu'])}; first pass {f['first_pass_seconds']:.1f} s"
            figure = f"{variant}, {r['dtype']}, budget {r['forward_max_tokens']}, {r['forward_max_inputs']} rows"
            rows.append(["compile", figure, value, ""])
        rows.append(
            [
                "compile",
                "compiled vs eager",
                f"{r['speedup']:.2f}x, max abs dp {r['max_abs_dp']:.4f}",
                f"<= {COMPILE_MAX_DP}",
            ]
        )
    if r := results.get("online"):
        for replica, info in sorted(r["replicas"].items()):
            cap, peak = info["gpu_memory_cap_bytes"], info["gpu_memory_peak_bytes"]
            memory = f"cap {_gib(cap)}, peak {_gib(peak)}" if cap is not None else "no cap"
            value = f"{info['device']}, {info['dtype']}, {info['replica_gpus']} GPU, {r['replica_cpus']} CPU, {memory}"
            rows.append(["online", f"replica {replica}", value, ""])
        serving = r["replicas_serving"]
        rows.append(
            ["online", "replicas serving", f"{serving} of {REPLICAS}", f"all {REPLICAS}: {judged(serving == REPLICAS)}"]
        )
        for level in r["levels"]:
            value = (
                f"{level['requests_per_s']:.1f} requests/s, p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms"
            )
            figure = f"{level['clients']} clients, 1 review per request"
            rows.append(["online", figure, f"{value}, {level['errors']} errors", ""])
    for name in ("offline", "offline_compile"):
        if not (r := results.get(name)):
            continue
        actors = ", ".join(sorted({f"{a['device']} {a['dtype']}" for a in r["actors"]}))
        rows.append([name, "actors", f"{len(r['actors'])} at {r['num_gpus_per_actor']} GPU each: {actors}", ""])
        steady = r["reviews_per_s_actors"]
        value = f"{steady:,.0f} reviews/s ({r['actor_rows']:,} rows), {r['reviews_per_s_actors_after_first_call']:,.0f}"
        value += " after each actor's first call"
        target = f">= {TARGET_REVIEWS_PER_S:,.0f}/s: {judged(steady >= TARGET_REVIEWS_PER_S)}"
        rows.append([name, "model actors' steady rate (rows / seconds in calls)", value, target])
        value = f"{r['reviews_per_s_in_job']:,.0f} reviews/s in the job, {r['reviews_per_s_whole_process']:,.0f} whole"
        value += f" process ({r['process_seconds']:.0f} s: start, CUDA init and model load included)"
        rows.append([name, f"sentiment batch, {r['rows']:,} reviews{', --compile' if r['compile'] else ''}", value, ""])
        busy = r["gpu_busy"]
        value = f"mean {busy['mean']:.0f}%, max {busy['max']:.0f}% ({busy['samples']} samples)"
        rows.append(
            [name, "GPU busy (nvidia-smi, while the actors ran)", value if busy["samples"] else "not sampled", ""]
        )
    if r := results.get("oom"):
        how = "injected at _forward_batch"
        if not r["injected"]:
            how = f"cap {_gib(r['gpu_memory_cap_bytes'])}, peak {_gib(r['gpu_memory_peak_bytes'])}"
        value = f"{r['splits']} splits, max abs dp {r['max_abs_dp']:.1e} against uncapped (fp32)"
        rows.append(["oom", f"forced OOM ({how})", value, f"<= {OOM_MAX_DP}"])
    dry = " (DRY RUN on the CPU: no GPU figures)" if setup.dry_run else ""
    done = ", ".join(f"{step.name} {'ok' if step.ok else 'FAILED'}" for step in steps) or "none yet"
    header = (
        f"GPU check, {facts['date']}, {facts['gpu']}{dry}\n`{facts['command']}`; torch {facts['torch']}, "
        f"ray {facts['ray']}, {setup.size} checkpoint (random weights), {setup.rows:,} reviews offline; steps done: "
        f"{done}\n\n"
    )
    return header + markdown_table(["step", "figure", "value", "target"], rows) + "\n"


def start_facts(device: str) -> dict[str, Any]:
    """What the card and the cluster look like before anything runs: free memory, and ``ray status``."""
    import torch

    facts: dict[str, Any] = {}
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info(0)
        facts["gpu_memory_free_bytes"] = int(free)
        facts["gpu_memory_total_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
        print(f"[gpu_check] GPU memory free: {_gib(free)} of {_gib(facts['gpu_memory_total_bytes'])}", flush=True)
    ray = str(Path(sys.executable).with_name("ray"))
    try:
        status = subprocess.run([ray, "status"], capture_output=True, text=True, timeout=30, check=False)
        facts["ray_status"] = (status.stdout + status.stderr).strip()[-4000:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        facts["ray_status"] = f"ray status did not answer: {exc}"
    print(f"[gpu_check] ray status:\n{facts['ray_status']}", flush=True)
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and the work files")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with a tiny checkpoint (CI)")
    parser.add_argument(
        "--rows", type=int, help=f"reviews in the batch corpus (default {GPU_ROWS}; {DRY_RUN_ROWS} in a dry run)"
    )
    parser.add_argument("--clients", default="16,64", help="closed-loop client counts for the online step")
    parser.add_argument("--duration", type=float, help="seconds per client level (default 10; 5 in a dry run)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child running one step (run_in_child)
    options = parser.parse_args(argv)
    work_offline()
    out = Path(options.out).resolve()

    if options.step:
        setup = Setup.from_json(json.loads((out / "setup.json").read_text()))
        write_json(out / "steps" / f"{options.step}.json", STEPS[options.step](setup))
        return 0

    import torch

    if not options.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU here; run with --dry-run to check the script on the CPU", file=sys.stderr
        )
        return 2
    names = [name.strip() for name in options.steps.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; known: {', '.join(STEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if options.dry_run else "cuda"
    facts = {**machine("benchmarks.gpu_check", argv), **start_facts(device)}
    rows = options.rows or (DRY_RUN_ROWS if options.dry_run else GPU_ROWS)
    size = "tiny" if options.dry_run else "large"
    setup = Setup(
        out=out,
        dry_run=options.dry_run,
        device=device,
        checkpoint=ensure_checkpoint(out, size),
        corpus=ensure_corpus(out / f"corpus-{rows}", rows, files=8),
        rows=rows,
        clients=tuple(int(c) for c in options.clients.split(",")),
        duration=options.duration or (5.0 if options.dry_run else 10.0),
        gpu_total_bytes=facts.get("gpu_memory_total_bytes"),
    )
    write_json(out / "setup.json", setup.to_json())
    steps = run_steps(setup, names, facts)
    print((out / "gpu_check.md").read_text())
    return 0 if all(step.ok for step in steps) else 1


# -- helpers ---------------------------------------------------------------------------------------


def _model_only_inputs(classifier: Any, setup: Setup) -> tuple[list[list[int]], list[int], int, float]:
    """Pre-tokenized windows of the model-only reviews, their lengths, their tokens and forward FLOPs."""
    texts = make_reviews(min(MODEL_ONLY_REVIEWS, setup.rows), seed=2)
    windows = [window for text in classifier.encode(texts) for window in text.windows]
    lengths = [len(window) for window in windows]
    return windows, lengths, sum(lengths), forward_flops(classifier.model, lengths)


def _time_forward(
    classifier: Any,
    windows: list[list[int]],
    device: str,
    budget: int | None = None,
    inputs: int | None = None,
    warm: bool = True,
) -> float:
    """Seconds of one ``forward`` over ``windows`` (at this budget and row limit), after a warm-up on an eighth."""
    if budget is not None:
        classifier.forward_max_tokens = budget
    if inputs is not None:
        classifier.config = classifier.config.model_copy(update={"forward_max_inputs": inputs})
    if warm:
        classifier.forward(windows[: max(1, len(windows) // 8)])  # this variant's shapes
    _synchronize(device)
    started = time.perf_counter()
    classifier.forward(windows)  # reads its logits back: the device is done when it returns
    return time.perf_counter() - started


def _earlier_result(setup: Setup, name: str) -> dict[str, Any]:
    path = setup.out / "steps" / f"{name}.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _probabilities(predictions: Sequence[Any], labels: Sequence[str]) -> np.ndarray:
    return np.array([[p.scores[label] for label in labels] for p in predictions])


def _stop_group(process: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """Ctrl-C to the step's whole process group (its servers and their Ray), then kill what is left."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the step exited; its children may not have
                os.killpg(process.pid, signal.SIGKILL)
            return
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _free_cuda() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main())
