"""`sentiment batch` against a plain ``transformers.pipeline`` loop, on the same Parquet, in the same run.

    python -m benchmarks.batch_bench [--rows 2000] [--out benchmarks/out/batch]

Builds a random-weight BERT-base checkpoint (`sentiment.testing.make_checkpoint`, no network) and a
synthetic corpus with IMDB-like lengths (`benchmarks.corpus`), then times, end to end (model load
included, Ray start excluded):

- the baseline: ``transformers.pipeline("text-classification", batch_size=16, truncation=True)``
  over the texts read from the Parquet files. It pads each batch of 16 to its longest member, and
  88% of batches of 16 IMDB-length reviews hold one over 512 tokens, so most batches run at 512;
- the batch job (`pipelines.batch.run`) in fp32: one actor with all cores as threads, length-sorted
  token-budget batches;
- the batch job in bf16, when the CPU has bf16 instructions (avx512_bf16 or amx_bf16).

It reports rows/s, tokens/s (tokens of the whole reviews, the same count for every contender), the
ratio to the baseline, label agreement with the baseline on reviews that fit in 512 tokens (longer
ones differ by design: the baseline keeps the head, the job head and tail), and for bf16 the share of
labels that differ from fp32, and the mean load average during each run (this machine may be shared:
a load well above the thread count means other work competed). The weights are random, so the labels
mean nothing and their margins are tiny: bf16's rounding flips more of them than it would on a
fine-tuned model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import cpu_name, cpu_supports_bf16, ensure_checkpoint
from benchmarks.corpus import write_corpus

BASELINE_BATCH_SIZE = 16


class LoadSampler:
    """The 1-minute load average, sampled every few seconds per phase: a shared machine's other work shows."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.samples: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        samples = self.samples.setdefault(name, [])
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval_s):
                samples.append(float(Path("/proc/loadavg").read_text().split()[0]))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def mean(self, name: str) -> float:
        samples = self.samples.get(name) or [0.0]
        return sum(samples) / len(samples)


def run_baseline(checkpoint: Path, corpus: Path, device: str = "cpu") -> tuple[float, list[str]]:
    """Seconds and labels (in corpus id order) of the plain pipeline loop, in fp32 on ``device``."""
    import torch
    from transformers import pipeline

    started = time.perf_counter()
    table = pq.read_table(corpus).sort_by("id")
    texts = table.column("text").to_pylist()
    classify = pipeline("text-classification", model=str(checkpoint), dtype=torch.float32, device=device)
    outputs = classify(texts, batch_size=BASELINE_BATCH_SIZE, truncation=True)
    seconds = time.perf_counter() - started
    # The checkpoint's id2label is LABEL_0/LABEL_1, which the job reports as neg/pos.
    names = {"LABEL_0": "neg", "LABEL_1": "pos"}
    return seconds, [names[output["label"]] for output in outputs]


def run_job(
    checkpoint: Path,
    corpus: Path,
    output: Path,
    dtype: str,
    threads: int,
    forward_max_tokens: int | None = None,
    num_gpus: float = 0,
) -> tuple[Any, pa.Table]:
    """The batch job's result and its output table (sorted by id); ``forward_max_tokens`` None: the default.

    ``num_gpus`` 1 gives the job's one actor a whole GPU.
    """
    from pipelines.args import PipelineArgs
    from pipelines.batch import run
    from sentiment.config import ModelConfig

    args = PipelineArgs(
        model=ModelConfig(
            model_id=str(checkpoint),
            dtype=dtype,  # type: ignore[arg-type]
            **({} if forward_max_tokens is None else {"forward_max_tokens": forward_max_tokens}),
        ),
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
    return result, pq.read_table(output).sort_by("id")


def tokenization_seconds(checkpoint: Path, texts: list[str]) -> float:
    """How long the fast tokenizer takes over the corpus: the most a separate tokenizing stage could hide."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    started = time.perf_counter()
    tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return time.perf_counter() - started


def agreement(a: Sequence[str | None], b: Sequence[str | None], mask: Sequence[bool]) -> tuple[int, int]:
    """Equal labels and rows compared, over rows where ``mask`` holds."""
    pairs = [(x, y) for x, y, keep in zip(a, b, mask, strict=True) if keep]
    return sum(x == y for x, y in pairs), len(pairs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="synthetic reviews (default 2000)")
    parser.add_argument("--files", type=int, default=4, help="Parquet files in the corpus (default 4)")
    parser.add_argument("--out", default="benchmarks/out/batch", help="working directory (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument(
        "--forward-max-tokens",
        type=int,
        default=2048,
        help="the job's token budget per forward pass (default 2048: measured fastest on CPU; 16384 suits GPUs)",
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 run even if the CPU supports it")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out).resolve()
    checkpoint = ensure_checkpoint(out, "base")
    corpus = out / f"corpus-{args.rows}"
    if not corpus.exists():
        write_corpus(corpus, rows=args.rows, files=args.files, seed=0)
    texts = pq.read_table(corpus).sort_by("id").column("text").to_pylist()

    import ray
    import torch

    torch.set_num_threads(args.threads)
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})

    load = LoadSampler()
    with load.phase("baseline"):
        baseline_seconds, baseline_labels = run_baseline(checkpoint, corpus)
    rows: list[dict[str, Any]] = []
    with load.phase("fp32"):
        fp32_result, fp32 = run_job(
            checkpoint, corpus, out / "scored-fp32", "fp32", args.threads, args.forward_max_tokens
        )
    tokens = int(sum(fp32.column("num_tokens").to_pylist()))
    fits = [n <= 512 for n in fp32.column("num_tokens").to_pylist()]
    rows.append(
        {
            "name": f"transformers.pipeline, batch_size={BASELINE_BATCH_SIZE}, fp32",
            "seconds": baseline_seconds,
            "load": load.mean("baseline"),
        }
    )
    same, compared = agreement(fp32.column("label").to_pylist(), baseline_labels, fits)
    rows.append(
        {
            "name": "sentiment batch, fp32",
            "seconds": fp32_result.seconds,
            "same_as_baseline": f"{same}/{compared}",
            "load": load.mean("fp32"),
        }
    )
    if cpu_supports_bf16() and not args.no_bf16:
        with load.phase("bf16"):
            bf16_result, bf16 = run_job(
                checkpoint, corpus, out / "scored-bf16", "bf16", args.threads, args.forward_max_tokens
            )
        same_bf16, _ = agreement(bf16.column("label").to_pylist(), baseline_labels, fits)
        pairs = zip(bf16.column("label").to_pylist(), fp32.column("label").to_pylist(), strict=True)
        differ = sum(x != y for x, y in pairs)
        rows.append(
            {
                "name": "sentiment batch, bf16",
                "seconds": bf16_result.seconds,
                "same_as_baseline": f"{same_bf16}/{compared}",
                "differs_from_fp32": f"{differ}/{len(texts)} ({differ / len(texts):.1%})",
                "load": load.mean("bf16"),
            }
        )
    tokenize = tokenization_seconds(checkpoint, texts)

    for row in rows:
        row["rows_per_s"] = len(texts) / row["seconds"]
        row["tokens_per_s"] = tokens / row["seconds"]
        row["vs_baseline"] = baseline_seconds / row["seconds"]
    report = {
        "rows": len(texts),
        "tokens": tokens,
        "over_512": sum(not fit for fit in fits),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "forward_max_tokens": args.forward_max_tokens,
        "tokenization_seconds": tokenize,
        "results": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"{len(texts)} reviews, {tokens} tokens ({report['over_512']} over 512), random-weight BERT-base, "
        f"{report['cpu']}, {report['cores']} cores, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(
        "| run | seconds | rows/s | tokens/s | vs baseline | labels = baseline (<= 512 tokens) | labels != fp32 "
        "| mean load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['name']} | {row['seconds']:.1f} | {row['rows_per_s']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['vs_baseline']:.2f}x | {row.get('same_as_baseline', '-')} | {row.get('differs_from_fp32', '-')} "
            f"| {row['load']:.1f} |"
        )
    print(f"tokenizing the whole corpus takes {tokenize:.2f} s (a separate tokenization stage could hide at most that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
