"""One command, one table: the model's own speed, the batch job and the endpoint, side by side.

    python -m benchmarks.run [--rows 300] [--size base] [--dtypes fp32,bf16] [--duration 15]
                             [--concurrency 1,4,16] [--out benchmarks/out/run] [--results benchmarks/RESULTS.md]

On one synthetic corpus with IMDB-like lengths and one random-weight checkpoint
(`sentiment.testing`, no network), in one run:

1. **ceiling**: `SentimentClassifier.forward` alone on the corpus, pre-tokenized and length-sorted,
   at the best of a few token budgets (chosen on a sample): the most this machine gives this model;
2. **offline**: `pipelines.batch.run` (what ``sentiment batch`` runs, one actor) against
   ``transformers.pipeline("text-classification", batch_size=16, truncation=True)`` in fp32, with
   label agreement on the reviews that fit in 512 tokens (longer ones differ by design: the
   baseline keeps the head, the job head and tail);
3. **online**: the Serve app (`deployments.app.build_app`) against a Serve deployment that calls
   the pipeline once per request (`benchmarks.harness.PipelineBaseline`, fp32), closed-loop
   clients at each concurrency level, one text per request.

Throughput is in model tokens (what the model sees: each review cut to 512 tokens), the same count
for every contender, so "of ceiling" and "vs baseline" are ratios of the same work. The job and the
app run with the shipped defaults (``forward_max_tokens: auto``), so the table shows what a user
gets. Prints one table, a precision table (bf16 against fp32 on the same inputs) and writes both,
with the machine, the load average and the command, as a dated section of ``--results``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.harness import (
    cpu_supports_bf16,
    ensure_checkpoint,
    ensure_corpus,
    load_each,
    local_ray,
    machine,
    markdown_table,
    peak_tflops,
    pipeline_baseline,
    ratio,
    serve_on_loopback,
    timed,
    work_offline,
    write_json,
    write_section,
)
from sentiment.config import auto_max_batch_tokens
from sentiment.testing import review_lengths

SECTION = "benchmarks.run"
# Forward budgets tried for the ceiling: on a CPU one review at a time (512 fits any single window),
# the budgets 'auto' picks there, and bigger batches; on a GPU, 'auto' (16384) and around it.
CANDIDATE_BUDGETS = {"cpu": (512, 1024, 2048, 4096, 8192), "cuda": (4096, 16384, 65536)}
SAMPLE_WINDOWS = 48
DEFAULT_DTYPES = {"cpu": "fp32,bf16", "cuda": "fp32,bf16,fp16"}
BASELINE_BATCH_SIZE = 16


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
    sample = windows[:: max(1, len(windows) // SAMPLE_WINDOWS)][:SAMPLE_WINDOWS]
    classifier.warmup()
    speeds: dict[int, float] = {}
    for budget in budgets:
        classifier.forward_max_tokens = budget
        with timed() as took:
            classifier.forward(sample)
        speeds[budget] = sum(map(len, sample)) / took.seconds
    classifier.forward_max_tokens = best = max(speeds, key=lambda budget: speeds[budget])
    with timed() as took:
        probabilities = classifier.forward(windows)
    return Ceiling(took.seconds, best, probabilities, lengths, speeds, forward_flops(classifier.model, lengths))


def forward_flops(model: Any, lengths: Sequence[int]) -> float:
    """Forward FLOPs of a BERT encoder over windows of ``lengths`` tokens (padding not counted).

    Per token, 2 FLOPs per weight of every matrix (embedding lookups are not matrix products), plus
    attention's two n x n products per layer: QK^T and AV, 2 * n * hidden FLOPs each per token.
    """
    weights = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    return float(sum(2 * weights * n + 4 * layers * hidden * n * n for n in lengths))


def against_fp32(probabilities: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Each precision's class probabilities (reviews x labels) against fp32's on the same inputs."""
    reference = probabilities["fp32"]
    return {
        dtype: {
            "max_abs_dp": float(np.abs(values - reference).max()),
            "identical_labels": float((values.argmax(axis=1) == reference.argmax(axis=1)).mean()),
        }
        for dtype, values in probabilities.items()
        if dtype != "fp32"
    }


def run_baseline(checkpoint: Path, corpus: Path, device: str = "cpu") -> tuple[float, list[str]]:
    """Seconds and labels (in corpus id order) of the plain pipeline loop, in fp32 on ``device``."""
    import torch
    from transformers import pipeline

    with timed() as took:
        texts = pq.read_table(corpus).sort_by("id").column("text").to_pylist()
        classify = pipeline("text-classification", model=str(checkpoint), dtype=torch.float32, device=device)
        outputs = classify(texts, batch_size=BASELINE_BATCH_SIZE, truncation=True)
    # The checkpoint's id2label is LABEL_0/LABEL_1, which the job reports as neg/pos.
    return took.seconds, [{"LABEL_0": "neg", "LABEL_1": "pos"}[output["label"]] for output in outputs]


def run_job(checkpoint: Path, corpus: Path, output: Path, dtype: str, threads: int, num_gpus: float) -> Any:
    """The batch job's result (shipped defaults, one actor holding ``num_gpus``) and its labels by id."""
    from pipelines.args import PipelineArgs
    from pipelines.batch import run
    from sentiment.config import ModelConfig

    args = PipelineArgs(
        model=ModelConfig(model_id=str(checkpoint), dtype=dtype),  # type: ignore[arg-type]
        input=str(corpus),
        output=str(output),
        overwrite=True,
        # One actor using every core: on a small machine two actors would split the same cores and
        # each pay for its own model copy. num_cpus 1 leaves a Ray CPU for the read and write tasks.
        min_actors=1,
        max_actors=1,
        num_cpus=1,
        num_gpus=num_gpus,
        cpu_threads=threads,
    )
    result = run(args)
    return result, pq.read_table(output).sort_by("id").column("label").to_pylist()


def online(
    port: int,
    checkpoint: Path,
    texts: list[str],
    dtypes: Sequence[str],
    baselines: Sequence[str],
    options: Any,
    texts_per_request: int = 1,
    max_requests: int | None = None,
) -> list[Row]:
    """Closed-loop runs of the per-request baseline in each of ``baselines`` and of our app in each of
    ``dtypes``, at each ``options.levels`` client count; ``texts`` have `review_lengths(len(texts), seed)`.

    On a GPU the baseline holds the whole card and our app runs ``options.replicas`` replicas sharing
    it. Each of our rows is compared with the baseline of its precision at its level, or else fp32's.
    """
    from deployments.builder import build_app

    cpus, gpu, replicas = os.cpu_count() or 1, options.device == "cuda", options.replicas
    whole = {"num_cpus": cpus, "num_gpus": 1 if gpu else 0}
    apps = [(f"baseline-{d}", pipeline_baseline(checkpoint, d, options.device, whole), "") for d in baselines]
    for dtype in dtypes:
        # The shipped defaults (auto forward budget, batching limits), only the model and resources
        # set: the table measures what a user gets.
        resources = {"num_cpus": max(1, cpus // replicas), "num_gpus": 1 / replicas if gpu else 0}
        args = {"model": {"model_id": str(checkpoint), "dtype": dtype}, "num_replicas": replicas}
        args |= {"ray_actor_options": resources, "max_texts_per_request": max(64, texts_per_request)}
        apps.append((f"ours-{dtype}", build_app(args), "/v1/classify"))
    per = texts_per_request
    payloads = [{"texts": texts[i : i + per]} for i in range(0, len(texts) - per + 1, per)]
    # Model tokens of each text (each review cut to 512) as sent: cycling, so answered texts are (nearly) a prefix.
    sent = [min(n, 512) for n in options.lengths[: len(payloads) * per]]
    rows, loads = [], load_each(port, apps, payloads, options.levels, options.duration, max_requests)
    for (name, clients), load in loads.items():
        system, dtype = name.split("-")
        setting = f"{clients} clients"
        if system == "ours":
            setting += f", budget auto ({auto_max_batch_tokens(options.device, dtype)})"
            setting += f", {replicas} replicas" if replicas > 1 else ""
        tokens = sum(sent[i % len(sent)] for i in range(load.texts))
        summary = load.summary()
        latencies = {key: summary[key] for key in ("p50_ms", "p95_ms", "p99_ms")}
        label = "baseline: pipeline per request" if system == "baseline" else "ours: Serve app"
        rows.append(Row("online", label, dtype, setting, load.seconds, load.texts, tokens, **latencies))
        rows[-1].extra = {"errors": load.errors, "requests": summary["requests"], "clients": clients}
    for row in rows:
        clients = row.extra["clients"]
        same = [r for r in rows if r.system.startswith("baseline") and r.extra["clients"] == clients]
        base = next((r for r in same if r.dtype == row.dtype), next((r for r in same if r.dtype == "fp32"), None))
        if base is not None:
            row.baseline_seconds_per_token = base.seconds / base.tokens
            if base is not row:
                row.labels = f"p99 {ratio(row.p99_ms, base.p99_ms)} baseline's"
    return rows


def render(rows: list[Row], flops_per_token: float | None = None, peak_tflops: float | None = None) -> str:
    """The table; with a peak (a GPU), an MFU column for the bf16/fp16 rows.

    "vs baseline": offline and for the ceiling, the fp32 pipeline; online, the per-request
    deployment at the same concurrency (in the same precision where one ran, else fp32).
    """
    mfu = flops_per_token / (peak_tflops * 1e12) if flops_per_token is not None and peak_tflops else None
    header = ["part", "system", "precision", "setting", "texts/s", "model tokens/s", "of ceiling"]
    header += ["vs baseline", "p50 ms", "p95 ms", "p99 ms", "labels"] + (["MFU"] if mfu else [])
    lines = []
    for row in rows:
        baseline = 1 / row.baseline_seconds_per_token if row.baseline_seconds_per_token else None
        of_ceiling = f"{row.tokens_per_s * row.ceiling_seconds_per_token:.0%}" if row.ceiling_seconds_per_token else "-"
        latencies = ["-" if value is None else f"{value:.0f}" for value in (row.p50_ms, row.p95_ms, row.p99_ms)]
        cells = [row.part, row.system, row.dtype, row.setting, f"{row.texts / row.seconds:.2f}"]
        cells += [f"{row.tokens_per_s:.0f}", of_ceiling, ratio(row.tokens_per_s, baseline), *latencies, row.labels]
        if mfu:
            # fp32 does not run on the bf16/fp16 tensor-core peak.
            cells.append(f"{row.tokens_per_s * mfu:.1%}" if row.dtype in ("bf16", "fp16") else "-")
        lines.append(cells)
    return markdown_table(header, lines, right=[4, 5, 6, 7, 8, 9, 10] + ([12] if mfu else []))


def ceilings(checkpoint: Path, texts: list[str], dtypes: Sequence[str], budgets: Sequence[int], device: str) -> Any:
    """Part 1: a ceiling row per precision, the probabilities for the precision table, FLOPs per token."""
    rows, probabilities, flops_per_token = [], {}, 0.0
    for dtype in dtypes:
        best = ceiling(checkpoint, texts, dtype, budgets, device)
        tokens, probabilities[dtype] = sum(best.lengths), best.probabilities
        flops_per_token = best.flops / tokens
        sampled = ", ".join(f"{b}: {s:.0f}" for b, s in best.sample_speeds.items())
        setting = f"budget {best.budget}"
        rows.append(Row("ceiling", "model forward only", dtype, setting, best.seconds, len(texts), tokens))
        rows[-1].extra["sampled_tokens_per_s_by_budget"] = sampled
        print(f"ceiling {dtype}: {tokens / best.seconds:.0f} tokens/s at {setting} ({sampled})", flush=True)
    return rows, probabilities, flops_per_token


def offline(checkpoint: Path, corpus: Path, tokens: int, dtypes: Sequence[str], options: Any) -> list[Row]:
    """Part 2: the fp32 pipeline, then the batch job per precision, with label agreement; Ray must be up."""
    texts, device, fits = len(options.lengths), options.device, [n <= 512 for n in options.lengths]
    seconds, baseline_labels = run_baseline(checkpoint, corpus, device)
    baseline = f"baseline: transformers.pipeline, batch_size={BASELINE_BATCH_SIZE}"
    rows = [Row("offline", baseline, "fp32", "truncation=True", seconds, texts, tokens)]
    for dtype in dtypes:
        output, gpus = Path(options.out).resolve() / f"scored-{dtype}", 1 if device == "cuda" else 0
        result, labels = run_job(checkpoint, corpus, output, dtype, options.threads, gpus)
        same = sum(a == b for a, b, fit in zip(labels, baseline_labels, fits, strict=True) if fit)
        setting = f"1 actor, budget auto ({auto_max_batch_tokens(device, dtype)})"
        rows.append(Row("offline", "ours: sentiment batch", dtype, setting, result.seconds, texts, tokens))
        rows[-1].labels = f"{same}/{sum(fits)} = baseline (reviews <= 512 tokens)"
        print(f"offline {dtype}: {result.summary_line()}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse_parser()
    options = parser.parse_args(argv)
    work_offline()
    load_before, started = os.getloadavg(), time.perf_counter()
    import torch

    if options.device == "auto":
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    device = options.device
    dtypes = [d for d in (options.dtypes or DEFAULT_DTYPES[device]).split(",") if d]
    dtypes = dtypes if "fp32" in dtypes else ["fp32", *dtypes]
    if device == "cpu" and "bf16" in dtypes and not cpu_supports_bf16():
        print("this CPU has no bf16 instructions (avx512_bf16/amx_bf16): skipping bf16", file=sys.stderr)
        dtypes.remove("bf16")
    options.levels = [int(level) for level in options.concurrency.split(",") if level]
    options.replicas = options.replicas or (4 if device == "cuda" else 1)
    budgets = [int(b) for b in options.budgets.split(",") if b] or CANDIDATE_BUDGETS[device]
    torch.set_num_threads(options.threads)
    out = Path(options.out).resolve()
    checkpoint = ensure_checkpoint(out, options.size)
    corpus = ensure_corpus(out / f"corpus-{options.rows}", options.rows, options.files)
    # Corpus reviews have exactly their drawn token count in make_checkpoint's vocab.
    options.lengths = [int(n) for n in review_lengths(options.rows, seed=0)]
    texts = pq.read_table(corpus).sort_by("id").column("text").to_pylist()

    rows, probabilities, flops_per_token = ceilings(checkpoint, texts, dtypes, budgets, device)
    tokens = rows[0].tokens
    with local_ray(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if device == "cuda" else 0):
        rows += offline(checkpoint, corpus, tokens, dtypes, options)
        if options.levels:
            with serve_on_loopback() as port:
                rows += online(port, checkpoint, texts, dtypes, ["fp32"], options)
    ceiling_spt = {row.dtype: row.seconds / row.tokens for row in rows if row.part == "ceiling"}
    baseline = next(row for row in rows if row.part == "offline")
    for row in rows:
        row.ceiling_seconds_per_token = ceiling_spt[row.dtype]
        if row.part != "online":
            row.baseline_seconds_per_token = baseline.seconds / tokens
    precision = markdown_table(
        ["precision", "max abs probability difference vs fp32", "identical labels vs fp32"],
        [[d, f"{a['max_abs_dp']:.4f}", f"{a['identical_labels']:.1%}"] for d, a in against_fp32(probabilities).items()],
        right=[1, 2],
    )
    peak = options.peak_tflops or peak_tflops(device)
    facts = machine("benchmarks.run", argv)
    before, after = ("/".join(f"{v:.2f}" for v in load) for load in (load_before, os.getloadavg()))
    sampled = "; ".join(f"{r.dtype}: {r.extra['sampled_tokens_per_s_by_budget']}" for r in rows if r.part == "ceiling")
    section = (
        f"## One table: ceiling, offline, online (`benchmarks.run`)\n\n"
        f"**Date** {facts['date']}. **Machine** {facts['cpu']}, {facts['cores']} cores, {facts['gpu']}; "
        f"torch {facts['torch']}, ray {facts['ray']}. **Load average** (1/5/15 min) {before} at the start, "
        f"{after} at the end. **Run time** {time.perf_counter() - started:.0f} s.\n\n"
        f"```bash\n{facts['command']}\n```\n\n"
        f"{len(texts)} reviews, {tokens} model tokens ({sum(n > 512 for n in options.lengths)} reviews cut to 512), "
        f"random-weight {options.size} checkpoint, {options.threads} torch threads. Ceiling budgets tried "
        f"(model tokens/s on a {SAMPLE_WINDOWS}-review sample): {sampled}.\n\n"
        f"{render(rows, flops_per_token if peak else None, peak)}\n\n{precision}\n"
    )
    print("\n" + section)
    write_json(out / "results.json", [asdict(r) for r in rows])
    if options.results:
        write_section(Path(options.results), section, SECTION)
    return 0


def argparse_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rows", type=int, default=300, help="synthetic reviews (default %(default)s)")
    add("--files", type=int, default=2, help="Parquet files in the corpus (default %(default)s)")
    add("--size", default="base", choices=["tiny", "base", "large"], help="checkpoint shape")
    add(
        "--dtypes",
        help="precisions (default: fp32,bf16 on a CPU, fp32,bf16,fp16 on a GPU); no bf16 on a CPU without it",
    )
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    add("--replicas", type=int, help="replicas of our app (default: 1 on a CPU, 4 sharing a GPU)")
    add("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: known GPUs)")
    add("--duration", type=float, default=15, help="seconds of load per concurrency level")
    add("--concurrency", default="1,4,16", help="closed-loop client counts; empty: skip online")
    add(
        "--budgets",
        default="",
        help="forward token budgets to try (default: 512 to 8192 on a CPU, 4096 to 65536 on a GPU)",
    )
    add("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    add("--out", default="benchmarks/out/run", help="working directory (default %(default)s)")
    add("--results", default="benchmarks/RESULTS.md", help="file to write the dated section to; empty: do not write")
    return parser


if __name__ == "__main__":
    sys.exit(main())
