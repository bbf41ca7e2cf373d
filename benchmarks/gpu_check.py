"""The GPU check: one command that proves the GPU path on a real card in a few minutes, no network.

    python -m benchmarks.gpu_check --out DIR [--dry-run] [--rows N] [--clients 16,64] [--duration 15]

On one random-weight BERT-large checkpoint built here (`sentiment.testing.make_checkpoint`) and one
synthetic corpus of IMDB-length reviews (`sentiment.testing`), each step runs the shipped code:

1. **precision**: `SentimentClassifier` in fp32, bf16 and fp16 on the same reviews: max |Δp| and
   the share of identical labels against fp32, and what ``device/dtype: auto`` resolve to;
2. **model-only**: ``SentimentClassifier.forward`` on pre-tokenized reviews in the auto precision at
   a few token budgets: tokens/s and MFU (forward FLOPs counted from the model's shapes over the
   card's dense bf16 peak), the padding share, and the same batches as bare forward passes on
   tensors already on the card (what host work costs);
3. **online**: ``sentiment serve`` with 4 replicas, ``num_gpus: auto`` (0.25 GPU each on one card),
   closed-loop clients at each level: requests/s, p50/p99, errors; every replica's resolved device,
   dtype and memory cap from ``/info``, and its peak CUDA memory after the load against its cap;
4. **offline**: ``sentiment batch`` with its shipped defaults over the corpus: reviews/s in the job
   and for the whole process, GPU busy % sampled with ``nvidia-smi``, what each actor resolved;
5. **oom**: a classifier capped to its weights plus 1 GiB, asked for far bigger forward passes: it
   must split them and return the same labels as an uncapped one.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (the table), prints the table, exits 0 when
every step ran and its checks held (targets missed are reported, not failures). ``--dry-run`` runs
every step on the CPU with a tiny checkpoint and 300 reviews (the OOM is injected at
``_forward_batch``, since a CPU never raises CUDA OOM), so CI keeps this script from rotting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    Background,
    Sampler,
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
# Targets of the GPU path issue, judged on a real card only.
TARGET_MFU = 0.50
TARGET_REVIEWS_PER_S = 3000.0
PRECISION_REVIEWS = 512
MODEL_ONLY_REVIEWS = 2048
GPU_BUDGETS = (16384, 32768, 65536)
CPU_BUDGETS = (512, 1024)
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

    @property
    def size(self) -> str:
        return "tiny" if self.dry_run else "large"


# -- steps -----------------------------------------------------------------------------------------


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
        probabilities[dtype] = np.array(
            [[p.scores[label] for label in classifier.labels] for p in classifier.predict(texts)]
        )
        del classifier
        _free_cuda()
    return {"reviews": len(texts), "auto_outside_ray": resolved, "against_fp32": against_fp32(probabilities)}


def model_only(setup: Setup) -> dict[str, Any]:
    """``forward`` alone on pre-tokenized reviews at a few budgets, then the same batches as bare passes."""
    import torch

    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier, plan_batches

    classifier = SentimentClassifier(ModelConfig(model_id=str(setup.checkpoint), device=setup.device))
    dtype = classifier.describe()["dtype"]
    texts = make_reviews(min(MODEL_ONLY_REVIEWS, setup.rows), seed=2)
    windows = [window for text in classifier.encode(texts) for window in text.windows]
    lengths = [len(window) for window in windows]
    tokens = sum(lengths)
    flops = forward_flops(classifier.model, lengths)
    peak = peak_tflops(setup.device)
    classifier.warmup()
    budgets: dict[str, Any] = {}
    for budget in GPU_BUDGETS if setup.device == "cuda" else CPU_BUDGETS:
        classifier.forward_max_tokens = budget
        classifier.forward(windows[: max(1, len(windows) // 8)])  # warm this budget's shapes
        _synchronize(setup.device)
        started = time.perf_counter()
        classifier.forward(windows)
        _synchronize(setup.device)
        seconds = time.perf_counter() - started
        batches = plan_batches(lengths, budget, classifier.config.forward_max_inputs)
        padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
        budgets[str(budget)] = {
            "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / (peak * 1e12) if peak else None,
            "padding_share": 1 - tokens / padded,
            "forward_passes": len(batches),
        }
    best = max(budgets, key=lambda budget: budgets[budget]["tokens_per_s"])

    # The best budget's batches again, as tensors built and moved beforehand: only the model runs in
    # the timed loop, so the gap to `forward` is host work (padding, copies, softmax, syncs).
    batches = plan_batches(lengths, int(best), classifier.config.forward_max_inputs)
    prepared = []
    for batch in batches:
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
        "dtype": dtype,
        "reviews": len(texts),
        "model_tokens": tokens,
        "peak_tflops": peak,
        "budgets": budgets,
        "best_budget": int(best),
        "tokens_per_s": budgets[best]["tokens_per_s"],
        "mfu": budgets[best]["mfu"],
        "bare_forward_tokens_per_s": bare,
        "bare_forward_mfu": flops * bare / tokens / (peak * 1e12) if peak else None,
    }


def online(setup: Setup) -> dict[str, Any]:
    """``sentiment serve`` with 4 replicas (0.25 GPU each on a card), closed-loop clients at each level."""
    port = free_port()
    config = setup.out / "serve.yaml"
    # num_gpus stays auto: on a machine with a GPU it must resolve to 0.25. On the CPU (dry run),
    # four replicas must fit beside each other on however few cores there are.
    cpus = os.cpu_count() or 1
    actor_options = {"num_cpus": 0.25} if setup.dry_run else {"num_cpus": max(1, cpus // (REPLICAS + 1))}
    config.write_text(
        json.dumps(
            {"model": {"model_id": str(setup.checkpoint)}, "num_replicas": REPLICAS, "ray_actor_options": actor_options}
        )
    )
    argv = sentiment_command("serve", "--config", str(config), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    with Background(argv, setup.out / "serve.log") as server:
        server.wait_for("Serving ", timeout_s=420)
        replicas = replica_infos(base, REPLICAS, timeout_s=120)
        texts = make_reviews(512, seed=3)
        payloads = [{"texts": [text]} for text in texts]
        levels = []
        for clients in setup.clients:
            load = asyncio.run(closed_loop(f"{base}/v1/classify", payloads, clients, setup.duration, warmup=clients))
            levels.append({"system": "ours", "dtype": "auto", **load.summary()})
        after = replica_infos(base, REPLICAS, timeout_s=120)
    under_cap = {
        replica: info["gpu_memory_cap_bytes"] is None or info["gpu_memory_peak_bytes"] <= info["gpu_memory_cap_bytes"]
        for replica, info in after.items()
    }
    return {
        "replicas": {
            replica: {key: info[key] for key in REPLICA_KEYS}
            | {"gpu_memory_peak_bytes": after.get(replica, {}).get("gpu_memory_peak_bytes")}
            for replica, info in replicas.items()
        },
        "replicas_serving": len(replicas),
        "levels": levels,
        "errors": sum(level["errors"] for level in levels),
        "all_under_cap": all(under_cap.values()) and len(under_cap) == REPLICAS,
    }


def offline(setup: Setup) -> dict[str, Any]:
    """``sentiment batch`` with its shipped defaults over the corpus, GPU busy % sampled meanwhile."""
    output = setup.out / "scored"
    argv = sentiment_command("batch", str(setup.corpus), str(output), "--model", str(setup.checkpoint), "--overwrite")
    with Sampler(gpu_busy_percent, interval_s=0.5, enabled=not setup.dry_run) as sampler:
        seconds = run_timed(argv, setup.out / "batch.log", timeout_s=480)
    report = json.loads((output / "_report.json").read_text())
    return {
        "rows": report["processed_rows"],
        "errors": report["errors"],
        "reviews_per_s_in_job": report["rows_per_second"],
        "reviews_per_s_whole_process": report["processed_rows"] / seconds,
        "job_seconds": report["seconds"],
        "process_seconds": seconds,
        "num_gpus_per_actor": report["model"]["num_gpus_per_actor"],
        "actors": report["actors"],
        "gpu_busy": sampler.summary(),
    }


def oom(setup: Setup) -> dict[str, Any]:
    """A capped classifier asked for forward passes far over its memory: it splits and gives the same labels.

    Runs in a child process: a CUDA memory cap holds for the process that set it.
    """
    result = setup.out / "oom.json"
    argv = [sys.executable, "-m", "benchmarks.gpu_check", "--oom-probe", str(setup.checkpoint), "--out", str(result)]
    if setup.dry_run:
        argv.append("--dry-run")
    run_timed(argv, setup.out / "oom.log", timeout_s=300)
    return dict(json.loads(result.read_text()))


def oom_probe(checkpoint: Path, result: Path, dry_run: bool) -> None:
    import torch

    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier

    device = "cpu" if dry_run else "cuda"
    texts = make_reviews(256 if dry_run else 1024, seed=4)
    reference = SentimentClassifier(ModelConfig(model_id=str(checkpoint), device=device))
    want = [p.label for p in reference.predict(texts)]
    weights = sum(p.numel() * p.element_size() for p in reference.model.parameters())
    del reference
    _free_cuda()

    if dry_run:
        fraction = None
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, (weights + 2**30) / total)
    # Budgets far over what the cap holds: hundreds of 512-token reviews in one pass.
    config = ModelConfig(
        model_id=str(checkpoint),
        device=device,
        gpu_memory_fraction=fraction,
        forward_max_tokens=1024 * 512,
        forward_max_inputs=1024,
    )
    capped = SentimentClassifier(config)
    injected = False
    if dry_run:
        original = capped._forward_batch

        def forward(batch: list[Any]) -> Any:
            if len(batch) > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected: dry run)")
            return original(batch)

        capped._forward_batch = forward  # type: ignore[method-assign]
        injected = True
    got = [p.label for p in capped.predict(texts)]
    figures = {"injected": injected, "reviews": len(texts), "splits": capped.oom_splits}
    figures["identical_labels"] = sum(a == b for a, b in zip(got, want, strict=True)) / len(want)
    figures["gpu_memory_cap_bytes"] = capped.gpu_memory_cap_bytes
    figures["gpu_memory_peak_bytes"] = capped.peak_gpu_memory_bytes()
    write_json(result, {**figures, "weights_bytes": weights})


STEPS: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "precision": precision,
    "model_only": model_only,
    "online": online,
    "offline": offline,
    "oom": oom,
}


def checks(name: str, result: dict[str, Any], setup: Setup) -> list[str]:
    """What must hold for a step to pass (targets aside): a list of failures, empty when it passed."""
    failed = []
    if name == "precision" and setup.device == "cuda" and not result["auto_outside_ray"]["device"].startswith("cuda"):
        failed.append(f"device auto resolved to {result['auto_outside_ray']['device']} on a GPU machine")
    if name == "online":
        if result["replicas_serving"] != REPLICAS:
            failed.append(f"{result['replicas_serving']} of {REPLICAS} replicas answered")
        if result["errors"]:
            failed.append(f"{result['errors']} requests failed")
        if not result["all_under_cap"]:
            failed.append("a replica's peak CUDA memory exceeded its cap")
        wanted_gpus = 0.0 if setup.dry_run else 1 / REPLICAS
        devices = {info["replica_gpus"] for info in result["replicas"].values()}
        if devices != {wanted_gpus}:
            failed.append(f"replicas reserved {sorted(devices)} GPU, expected {wanted_gpus}")
        if not setup.dry_run and any(not info["device"].startswith("cuda") for info in result["replicas"].values()):
            failed.append("a replica did not run on the GPU")
    if name == "offline":
        if result["rows"] != setup.rows or result["errors"]:
            failed.append(f"{result['rows']} rows scored of {setup.rows}, {result['errors']} with errors")
        if not setup.dry_run and any(not actor["device"].startswith("cuda") for actor in result["actors"]):
            failed.append("a batch actor did not run on the GPU")
    if name == "oom":
        if result["splits"] < 1:
            failed.append("no forward pass was split: the cap did not bite")
        if result["identical_labels"] != 1.0:
            failed.append(f"labels after splitting differ: {result['identical_labels']:.2%} identical")
    return failed


# -- running and reporting -------------------------------------------------------------------------


def run_steps(setup: Setup, names: Sequence[str]) -> list[Step]:
    steps = []
    for name in names:
        step = Step(name)
        print(f"[gpu_check] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            step.result = STEPS[name](setup)
            failures = checks(name, step.result, setup)
            step.ok = not failures
            step.error = "; ".join(failures) or None
        except Exception as exc:
            step.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        step.seconds = time.perf_counter() - started
        print(
            f"[gpu_check] {name}: {'ok' if step.ok else 'FAILED: ' + str(step.error)} ({step.seconds:.0f} s)",
            flush=True,
        )
        steps.append(step)
        _free_cuda()
    return steps


def render(setup: Setup, steps: list[Step], machine: dict[str, Any]) -> str:
    """The report: who ran what where, and one table of figures, each with its target where it has one."""
    results = {step.name: step.result for step in steps if step.result}
    ok = {step.name: step.ok for step in steps}

    def judged(met: bool) -> str:
        return "n/a (dry run)" if setup.dry_run else ("met" if met else "MISSED")

    def tokens_per_s(value: float, mfu: float | None) -> str:
        return f"{value:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")

    rows = [[step.name, "FAILED", str(step.error).replace("|", "/"), ""] for step in steps if not step.ok]
    if r := results.get("precision"):
        rows.append(
            [
                "precision",
                "auto outside Ray",
                f"{r['auto_outside_ray']['device']}, {r['auto_outside_ray']['dtype']}",
                "",
            ]
        )
        for dtype, against in r["against_fp32"].items():
            value = f"max abs dp {against['max_abs_dp']:.4f}, identical labels {against['identical_labels']:.1%}"
            rows.append(["precision", f"{dtype} vs fp32 ({r['reviews']} reviews)", value, "reported"])
    if r := results.get("model_only"):
        for budget, f in r["budgets"].items():
            value = f"{tokens_per_s(f['tokens_per_s'], f['mfu'])}, padding {f['padding_share']:.1%}"
            rows.append(["model-only", f"{r['dtype']}, budget {budget}", value, ""])
        target = f">= {TARGET_MFU:.0%} MFU: {judged(r['mfu'] is not None and r['mfu'] >= TARGET_MFU)}"
        rows.append(["model-only", f"best ({r['best_budget']})", tokens_per_s(r["tokens_per_s"], r["mfu"]), target])
        bare = tokens_per_s(r["bare_forward_tokens_per_s"], r["bare_forward_mfu"])
        rows.append(
            ["model-only", "bare forward passes (tensors on the device)", bare, "host work = the gap to the row above"]
        )
    if r := results.get("online"):
        for replica, info in sorted(r["replicas"].items()):
            cap, peak = info["gpu_memory_cap_bytes"], info["gpu_memory_peak_bytes"]
            memory = f"cap {_gib(cap)}, peak {_gib(peak)}" if cap is not None else "no cap"
            value = f"{info['device']}, {info['dtype']}, {info['replica_gpus']} GPU, {memory}"
            rows.append(["online", f"replica {replica}", value, ""])
        serving = r["replicas_serving"]
        target = f"all {REPLICAS}: {judged(serving == REPLICAS)}"
        rows.append(["online", "replicas serving", f"{serving} of {REPLICAS}", target])
        for level in r["levels"]:
            value = (
                f"{level['requests_per_s']:.1f} requests/s, p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms"
            )
            rows.append(
                [
                    "online",
                    f"{level['clients']} clients, 1 review per request",
                    f"{value}, {level['errors']} errors",
                    "",
                ]
            )
    if r := results.get("offline"):
        actors = ", ".join(sorted({f"{a['device']} {a['dtype']}" for a in r["actors"]}))
        rows.append(["offline", "actors", f"{len(r['actors'])} at {r['num_gpus_per_actor']} GPU each: {actors}", ""])
        value = f"{r['reviews_per_s_in_job']:,.0f} reviews/s in the job, "
        value += f"{r['reviews_per_s_whole_process']:,.0f} whole process"
        target = f">= {TARGET_REVIEWS_PER_S:,.0f}/s: {judged(r['reviews_per_s_in_job'] >= TARGET_REVIEWS_PER_S)}"
        rows.append(["offline", f"sentiment batch, {r['rows']:,} reviews, defaults", value, target])
        busy = r["gpu_busy"]
        value = f"mean {busy['mean']:.0f}%, max {busy['max']:.0f}% ({busy['samples']} samples)"
        rows.append(
            ["offline", "GPU busy (nvidia-smi, whole process)", value if busy["samples"] else "not sampled", ""]
        )
    if r := results.get("oom"):
        how = "injected at _forward_batch"
        if not r["injected"]:
            how = f"cap {_gib(r['gpu_memory_cap_bytes'])}, peak {_gib(r['gpu_memory_peak_bytes'])}"
        value = f"{r['splits']} splits, labels identical {r['identical_labels']:.1%}"
        rows.append(["oom", f"forced OOM ({how})", value, "survived" if ok["oom"] else "FAILED"])
    dry = " (DRY RUN on the CPU: no GPU figures)" if setup.dry_run else ""
    header = (
        f"GPU check, {machine['date']}, {machine['gpu']}{dry}\n`{machine['command']}`; torch {machine['torch']}, "
        f"ray {machine['ray']}, {setup.size} checkpoint (random weights)\n\n"
    )
    return header + markdown_table(["step", "figure", "value", "target"], rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and the work files")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with a tiny checkpoint (CI)")
    parser.add_argument("--rows", type=int, help="reviews in the batch corpus (default 12000; 300 in a dry run)")
    parser.add_argument("--clients", default="16,64", help="closed-loop client counts for the online step")
    parser.add_argument("--duration", type=float, help="seconds per client level (default 15; 5 in a dry run)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--oom-probe", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    work_offline()

    if options.oom_probe:
        oom_probe(Path(options.oom_probe), Path(options.out), options.dry_run)
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
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = options.rows or (300 if options.dry_run else 12000)
    size = "tiny" if options.dry_run else "large"
    corpus = ensure_corpus(out / f"corpus-{rows}", rows, files=4)
    setup = Setup(
        out=out,
        dry_run=options.dry_run,
        device="cpu" if options.dry_run else "cuda",
        checkpoint=ensure_checkpoint(out, size),
        corpus=corpus,
        rows=rows,
        clients=tuple(int(c) for c in options.clients.split(",")),
        duration=options.duration or (5.0 if options.dry_run else 15.0),
    )
    facts = machine("benchmarks.gpu_check", argv)
    started = time.perf_counter()
    steps = run_steps(setup, names)
    table = render(setup, steps, facts)
    (out / "gpu_check.md").write_text(table)
    seconds = time.perf_counter() - started
    report = {**facts, "dry_run": setup.dry_run, "rows": setup.rows, "seconds": seconds}
    write_json(out / "gpu_check.json", {**report, "steps": [asdict(step) for step in steps]})
    print(table)
    return 0 if all(step.ok for step in steps) else 1


# -- helpers ---------------------------------------------------------------------------------------


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
