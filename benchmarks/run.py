"""One command, one table: the model's own speed, the batch job and the endpoint, side by side.

    python -m benchmarks.run [--rows 300] [--size base] [--dtypes fp32,bf16] [--duration 15]
                             [--concurrency 1,4,16] [--out benchmarks/out/run] [--results benchmarks/RESULTS.md]

On one synthetic corpus with IMDB-like lengths (`benchmarks.corpus`) and one random-weight
checkpoint (`sentiment.testing.make_checkpoint`, no network), in one run:

1. **ceiling**: `SentimentClassifier.forward` alone on the corpus, pre-tokenized and length-sorted,
   at the best of a few token budgets (chosen on a sample): the most this machine gives this model;
2. **offline**: `pipelines.batch.run` (what ``sentiment batch`` runs) against
   ``transformers.pipeline("text-classification", batch_size=16, truncation=True)`` in fp32;
3. **online**: the Serve app (`deployments.app.build_app`) against a Serve deployment that calls
   the pipeline once per request (`benchmarks.serve_bench.PipelineBaseline`, fp32), closed-loop
   clients at each concurrency level, one text per request.

Throughput is in model tokens (what the model sees: each review cut to 512 tokens), the same count
for every contender, so "of ceiling" and "vs baseline" are ratios of the same work. The job and the
app run with the shipped defaults (``forward_max_tokens: auto``), so the table shows what a user
gets. Prints one table, a precision table (bf16 against fp32 on the same inputs) and writes both,
with the machine, the load average and the command, as a dated section of ``--results``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.batch_bench import BASELINE_BATCH_SIZE, agreement, run_baseline, run_job
from benchmarks.common import cpu_name, cpu_supports_bf16, ensure_checkpoint, start_serve
from benchmarks.corpus import write_corpus
from benchmarks.serve_bench import PipelineBaseline, closed_loop, summarize
from sentiment.config import auto_max_batch_tokens

SECTION_START = "<!-- benchmarks.run: start -->"
SECTION_END = "<!-- benchmarks.run: end -->"
# Forward budgets tried for the ceiling: on a CPU one review at a time (512 fits any single window),
# the budgets 'auto' picks there, and bigger batches; on a GPU, 'auto' (16384) and around it.
CANDIDATE_BUDGETS = {"cpu": (512, 1024, 2048, 4096, 8192), "cuda": (4096, 16384, 65536)}
SAMPLE_WINDOWS = 48
DEFAULT_DTYPES = {"cpu": "fp32,bf16", "cuda": "fp32,bf16,fp16"}
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by GPU name, for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


@dataclass
class Row:
    """One line of the table."""

    part: str
    system: str
    dtype: str
    setting: str
    seconds: float
    texts: int
    tokens: int
    baseline_seconds_per_token: float | None = None
    ceiling_seconds_per_token: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    labels: str = "-"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Ceiling:
    """The model alone over every window of the corpus, at the best budget found on a sample."""

    seconds: float
    budget: int
    probabilities: np.ndarray
    lengths: list[int]
    """Tokens of each window."""
    sample_speeds: dict[int, float]
    """Model tokens/s of each budget tried on the sample."""
    flops: float
    """Forward FLOPs over all windows."""


def ceiling(checkpoint: Path, texts: list[str], dtype: str, budgets: Sequence[int], device: str = "cpu") -> Ceiling:
    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier

    classifier = SentimentClassifier(ModelConfig(model_id=str(checkpoint), dtype=dtype, device=device))  # type: ignore[arg-type]
    windows = [window for text in classifier.encode(texts) for window in text.windows]
    lengths = [len(window) for window in windows]
    step = max(1, len(windows) // SAMPLE_WINDOWS)
    sample = windows[::step][:SAMPLE_WINDOWS]
    sample_tokens = sum(len(window) for window in sample)
    classifier.warmup()
    speeds: dict[int, float] = {}
    for budget in budgets:
        classifier.forward_max_tokens = budget
        started = time.perf_counter()
        classifier.forward(sample)
        speeds[budget] = sample_tokens / (time.perf_counter() - started)
    best = max(speeds, key=lambda budget: speeds[budget])
    classifier.forward_max_tokens = best
    started = time.perf_counter()
    probabilities = classifier.forward(windows)
    seconds = time.perf_counter() - started
    return Ceiling(seconds, best, probabilities, lengths, speeds, forward_flops(classifier.model, lengths))


def forward_flops(model: Any, lengths: Sequence[int]) -> float:
    """Forward FLOPs of a BERT encoder over windows of ``lengths`` tokens (padding not counted).

    Per token, 2 FLOPs per weight of every matrix (embedding lookups are not matrix products), plus
    attention's two n x n products per layer: QK^T and AV, 2 * n * hidden FLOPs each per token.
    """
    weights = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    return float(sum(2 * weights * n + 4 * layers * hidden * n * n for n in lengths))


def online(
    checkpoint: Path,
    texts: list[str],
    model_tokens: list[int],
    dtypes: Sequence[str],
    levels: Sequence[int],
    duration: float,
    device: str = "cpu",
    replicas: int = 1,
) -> list[Row]:
    """Closed-loop runs of the fp32 per-request baseline and of our app per precision, at each level.

    On a GPU the baseline holds the whole card and our app runs ``replicas`` replicas sharing it.
    """
    import ray
    from ray import serve

    from deployments.app import build_app

    cpus = os.cpu_count() or 1
    gpu = device == "cuda"
    resources = {"num_cpus": cpus, "num_gpus": 1 if gpu else 0}
    replica_resources = {"num_cpus": max(1, cpus // replicas), "num_gpus": 1 / replicas if gpu else 0}
    payloads = [{"texts": [text]} for text in texts]
    if not ray.is_initialized():
        ray.init(num_cpus=cpus, num_gpus=_gpus(device), include_dashboard=False, log_to_driver=False)
    port = start_serve()
    rows: list[Row] = []
    systems: list[tuple[str, str, Any, str]] = [
        (
            "baseline",
            "fp32",
            serve.deployment(
                PipelineBaseline, name="PipelineBaseline", num_replicas=1, ray_actor_options=resources
            ).bind(str(checkpoint), "fp32", device),
            "",
        )
    ]
    for dtype in dtypes:
        app = build_app(
            {
                # The shipped defaults (auto forward budget, batching limits), only the model and
                # resources set: the table measures what a user gets.
                "model": {"model_id": str(checkpoint), "dtype": dtype},
                "num_replicas": replicas,
                "ray_actor_options": replica_resources,
            }
        )
        systems.append(("ours", dtype, app, "/v1/classify"))
    try:
        for system, dtype, app, path in systems:
            serve.run(app, name=system, route_prefix=f"/{system}")
            url = f"http://127.0.0.1:{port}/{system}{path}"
            for clients in levels:
                measured = asyncio.run(closed_loop(url, payloads, clients, 10**9, duration, clients))
                result = summarize(system, dtype, clients, measured)
                # Requests go out in corpus order, cycling, so the answered ones are (nearly) a prefix.
                tokens = sum(model_tokens[i % len(texts)] for i in range(result.texts))
                label = "baseline: pipeline per request" if system == "baseline" else "ours: Serve app"
                budget = f", budget auto ({auto_max_batch_tokens(device, dtype)})" if system == "ours" else ""
                if system == "ours" and replicas > 1:
                    budget += f", {replicas} replicas"
                rows.append(
                    Row(
                        "online",
                        label,
                        dtype,
                        f"{clients} clients{budget}",
                        result.seconds,
                        result.texts,
                        tokens,
                        p50_ms=result.p50_ms,
                        p95_ms=result.p95_ms,
                        p99_ms=result.p99_ms,
                        extra={"errors": result.errors},
                    )
                )
                print(json.dumps(asdict(result)), flush=True)
            serve.delete(system)
    finally:
        serve.shutdown()
    return rows


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def render(rows: list[Row], flops_per_token: float | None = None, peak_tflops: float | None = None) -> str:
    """The table; with a peak (a GPU), an MFU column for the bf16/fp16 rows."""
    # Fraction of the peak per model token/s; None (no MFU column) without a peak.
    mfu_per_token = (
        flops_per_token / (peak_tflops * 1e12) if flops_per_token is not None and peak_tflops is not None else None
    )
    mfu = mfu_per_token is not None
    lines = [
        "| part | system | precision | setting | texts/s | model tokens/s | of ceiling | vs fp32 baseline "
        "| p50 ms | p95 ms | p99 ms | labels |" + (" MFU |" if mfu else ""),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if mfu else ""),
    ]
    for row in rows:
        baseline_speed = 1 / row.baseline_seconds_per_token if row.baseline_seconds_per_token else None
        of_ceiling = f"{row.tokens_per_s * row.ceiling_seconds_per_token:.0%}" if row.ceiling_seconds_per_token else "-"
        lines.append(
            f"| {row.part} | {row.system} | {row.dtype} | {row.setting} | {row.texts_per_s:.2f} "
            f"| {row.tokens_per_s:.0f} | {of_ceiling} | {ratio(row.tokens_per_s, baseline_speed)} "
            f"| {_ms(row.p50_ms)} | {_ms(row.p95_ms)} | {_ms(row.p99_ms)} | {row.labels} |"
        )
        if mfu_per_token is not None:
            tensor_core = row.dtype in ("bf16", "fp16")
            lines[-1] += f" {row.tokens_per_s * mfu_per_token:.1%} |" if tensor_core else " - |"
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of ``path`` (between its markers), or append one."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{SECTION_START}\n{section.rstrip()}\n{SECTION_END}"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + block + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse_parser()
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()
    started = time.perf_counter()

    out = Path(options.out).resolve()
    checkpoint = ensure_checkpoint(out, options.size)
    corpus = out / f"corpus-{options.rows}"
    if not corpus.exists():
        write_corpus(corpus, rows=options.rows, files=options.files, seed=0)
    texts = pq.read_table(corpus).sort_by("id").column("text").to_pylist()
    import ray
    import torch

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    dtypes = [d for d in (options.dtypes or DEFAULT_DTYPES[device]).split(",") if d]
    if "fp32" not in dtypes:
        dtypes.insert(0, "fp32")
    if device == "cpu" and "bf16" in dtypes and not cpu_supports_bf16():
        print("this CPU has no bf16 instructions (avx512_bf16/amx_bf16): skipping bf16", file=sys.stderr)
        dtypes.remove("bf16")
    levels = [int(level) for level in options.concurrency.split(",") if level]
    budgets_tried = [int(b) for b in options.budgets.split(",") if b] or list(CANDIDATE_BUDGETS[device])
    replicas = options.replicas or (4 if device == "cuda" else 1)

    torch.set_num_threads(options.threads)

    # 1. Ceiling, and the precision comparison on the same windows.
    rows: list[Row] = []
    ceiling_spt: dict[str, float] = {}
    probabilities: dict[str, np.ndarray] = {}
    model_tokens_total = 0
    flops_per_token = 0.0
    for dtype in dtypes:
        best = ceiling(checkpoint, texts, dtype, budgets_tried, device)
        model_tokens_total = sum(best.lengths)
        flops_per_token = best.flops / model_tokens_total
        ceiling_spt[dtype] = best.seconds / model_tokens_total
        probabilities[dtype] = best.probabilities
        sampled = ", ".join(f"{b}: {s:.0f}" for b, s in best.sample_speeds.items())
        rows.append(
            Row(
                "ceiling",
                "model forward only",
                dtype,
                f"budget {best.budget}",
                best.seconds,
                len(texts),
                model_tokens_total,
            )
        )
        rows[-1].extra["sampled_tokens_per_s_by_budget"] = sampled
        print(
            f"ceiling {dtype}: {model_tokens_total / best.seconds:.0f} tokens/s at budget {best.budget} ({sampled})",
            flush=True,
        )
    # With head_tail, every review is one window, so windows line up with texts.
    model_tokens = [min(n, 512) for n in _review_tokens(corpus)]

    # 2. Offline.
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=_gpus(device),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=runtime_env,
    )
    try:
        baseline_seconds, baseline_labels = run_baseline(checkpoint, corpus, device)
        baseline_spt = baseline_seconds / model_tokens_total
        rows.append(
            Row(
                "offline",
                f"baseline: transformers.pipeline, batch_size={BASELINE_BATCH_SIZE}",
                "fp32",
                "truncation=True",
                baseline_seconds,
                len(texts),
                model_tokens_total,
            )
        )
        fits = [n <= 512 for n in _review_tokens(corpus)]
        for dtype in dtypes:
            result, table = run_job(
                checkpoint,
                corpus,
                out / f"scored-{dtype}",
                dtype,
                options.threads,
                num_gpus=1 if device == "cuda" else 0,
            )
            same, compared = agreement(table.column("label").to_pylist(), baseline_labels, fits)
            rows.append(
                Row(
                    "offline",
                    "ours: sentiment batch",
                    dtype,
                    f"1 actor, budget auto ({auto_max_batch_tokens(device, dtype)})",
                    result.seconds,
                    len(texts),
                    model_tokens_total,
                    labels=f"{same}/{compared} = baseline (reviews <= 512 tokens)",
                )
            )
            print(f"offline {dtype}: {result.summary_line()}", flush=True)

        # 3. Online.
        if levels:
            rows += online(checkpoint, texts, model_tokens, dtypes, levels, options.duration, device, replicas)
    finally:
        ray.shutdown()

    for row in rows:
        row.ceiling_seconds_per_token = ceiling_spt[row.dtype]
        row.baseline_seconds_per_token = baseline_spt
    online_baselines = {r.setting: r for r in rows if r.part == "online" and r.system.startswith("baseline")}
    for row in rows:
        if row.part == "online" and row.system.startswith("ours"):
            base = online_baselines.get(row.setting.split(",")[0])
            if base is not None:
                # Online, "vs baseline" is against the per-request deployment at the same concurrency.
                row.baseline_seconds_per_token = base.seconds / base.tokens
                row.labels = f"p99 {ratio(row.p99_ms, base.p99_ms)} baseline's"
    for row in rows:
        if row.part == "online" and row.system.startswith("baseline"):
            row.baseline_seconds_per_token = row.seconds / row.tokens

    precision_lines = [
        "| precision | max abs probability difference vs fp32 | identical labels vs fp32 |",
        "|---|---:|---:|",
    ]
    for dtype in dtypes[1:]:
        difference = float(np.abs(probabilities[dtype] - probabilities["fp32"]).max())
        same_labels = float((probabilities[dtype].argmax(1) == probabilities["fp32"].argmax(1)).mean())
        precision_lines.append(f"| {dtype} | {difference:.4f} | {same_labels:.1%} |")

    peak = options.peak_tflops or peak_tflops(device)
    table = render(rows, flops_per_token if peak else None, peak)
    precision = "\n".join(precision_lines)
    load_after = os.getloadavg()
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    header = (
        f"## One table: ceiling, offline, online (`benchmarks.run`)\n\n"
        f"**Date** {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. **Machine** {cpu_name()}, "
        f"{os.cpu_count()} cores, {_gpu_name(device)}; torch {torch.__version__}, ray {ray.__version__}. "
        f"**Load average** (1/5/15 min) {_load(load_before)} at the start, {_load(load_after)} at the end. "
        f"**Run time** {time.perf_counter() - started:.0f} s.\n\n"
        f"```bash\n{command}\n```\n\n"
        f"{len(texts)} reviews, {model_tokens_total} model tokens ({sum(not f for f in fits)} reviews cut to 512), "
        f"random-weight {options.size} checkpoint, {options.threads} torch threads. Ceiling budgets tried "
        f"(model tokens/s on a {SAMPLE_WINDOWS}-review sample): "
        + "; ".join(f"{r.dtype}: {r.extra['sampled_tokens_per_s_by_budget']}" for r in rows if r.part == "ceiling")
        + ".\n"
    )
    section = f"{header}\n{table}\n\n{precision}\n"
    print("\n" + section)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if options.results:
        write_section(Path(options.results), section)
    return 0


def _gpus(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def _gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = _gpu_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _review_tokens(corpus: Path) -> list[int]:
    # Corpus reviews have exactly their drawn token count in make_checkpoint's vocab.
    from benchmarks.corpus import review_lengths

    total = sum(pq.read_metadata(path).num_rows for path in corpus.glob("*.parquet"))
    return [int(n) for n in review_lengths(total, seed=0)]


def argparse_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="synthetic reviews (default %(default)s)")
    parser.add_argument("--files", type=int, default=2, help="Parquet files in the corpus (default %(default)s)")
    parser.add_argument("--size", default="base", choices=["tiny", "base", "large"], help="checkpoint shape")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="precisions (default: fp32,bf16 on a CPU, fp32,bf16,fp16 on a GPU); bf16 is skipped on a CPU without it",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    parser.add_argument(
        "--replicas", type=int, default=None, help="replicas of our app (default: 1 on a CPU, 4 sharing a GPU)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU (default: known GPUs)"
    )
    parser.add_argument("--duration", type=float, default=15, help="seconds of load per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts; empty: skip online")
    parser.add_argument(
        "--budgets",
        default="",
        help="forward token budgets to try (default: 512 to 8192 on a CPU, 4096 to 65536 on a GPU)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--out", default="benchmarks/out/run", help="working directory (default %(default)s)")
    parser.add_argument(
        "--results", default="benchmarks/RESULTS.md", help="file to write the dated section to; empty: do not write"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
