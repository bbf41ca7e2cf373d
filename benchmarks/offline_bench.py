"""The offline job's figures, each against a baseline measured in the same run, each run a fresh process.

    python -m benchmarks.offline_bench overhead [--rows 40000]  # pipeline cost, tiny model
    python -m benchmarks.offline_bench user [--rows 300]        # what a user sees: BERT-base, fp32

- **overhead**: ``sentiment batch`` with its shipped defaults and a tiny checkpoint (so that the
  pipeline's own cost shows) against a one-process loop of the same class over the same Parquet, in
  slices of ``--rows-per-call`` rows: rows/s of both (model load included in both, imports and
  Ray's start in neither), and their ratio.
- **user**: ``sentiment batch IN OUT --model <BERT-base-sized dir> --dtype fp32`` with the shipped
  defaults, timed as a whole process (Python start, Ray start and model load included), against a
  process running the ``transformers.pipeline("text-classification")(texts, batch_size=16,
  truncation=True)`` a user would write.

The contenders alternate, ``--repeats`` runs each, so neither runs beside the other's leftovers.
Random-weight checkpoints and synthetic IMDB-length reviews (`sentiment.testing`), no network.
Prints and writes ``OUT/<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    child_environment,
    ensure_checkpoint,
    ensure_corpus,
    machine,
    run_timed,
    sentiment_command,
    work_offline,
    write_json,
)

# The one-process loop a user would write around the same class, timed from the model load on
# (imports done, as the job's timer starts with Ray up).
_LOOP_SCRIPT = """
import json, sys, time, pyarrow.parquet as pq
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
corpus, checkpoint, rows_per_call = sys.argv[1], sys.argv[2], int(sys.argv[3])
started = time.perf_counter()
classifier = SentimentClassifier(ModelConfig(model_id=checkpoint, device="cpu"))
done = 0
for batch in pq.ParquetFile(corpus).iter_batches(batch_size=rows_per_call, columns=["text"]):
    done += len(classifier.predict(batch.column(0).to_pylist()))
print(json.dumps({"rows": done, "seconds": time.perf_counter() - started}))
"""
_PIPELINE_SCRIPT = """
import sys, time, torch, pyarrow.parquet as pq
from transformers import pipeline
texts = pq.read_table(sys.argv[1]).column("text").to_pylist()
classify = pipeline("text-classification", model=sys.argv[2], dtype=torch.float32, device="cpu")
print(len(classify(texts, batch_size=16, truncation=True)))
"""


def job_report(output: Path) -> dict[str, Any]:
    report = json.loads((output / "_report.json").read_text())
    actors = [{k: a[k] for k in ("device", "dtype", "torch_threads", "rows")} for a in report["actors"]]
    return {"pool": report["pool"], "actors": actors, "padding_share": report["padding_share"]}


def overhead(out: Path, rows: int, rows_per_call: int, repeats: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "tiny")
    corpus = ensure_corpus(out / f"corpus-{rows}-1", rows)
    loop_argv = [sys.executable, "-c", _LOOP_SCRIPT, str(next(corpus.glob("*.parquet"))), str(checkpoint)]
    # The loop's tokenizer runs as a user's would: Rust threads on every core.
    loop_env = {key: value for key, value in child_environment().items() if key != "TOKENIZERS_PARALLELISM"}
    job_argv = sentiment_command("batch", str(corpus), str(out / "scored"), "--model", str(checkpoint), "--overwrite")
    job, job_whole, loop = [], [], []
    for repeat in range(repeats):
        whole = run_timed(job_argv, out / f"overhead-job-{repeat}.log")
        job.append(json.loads((out / "scored" / "_report.json").read_text())["rows_per_second"])
        job_whole.append(rows / whole)
        time.sleep(3)  # the job's local Ray winds down
        loop_log = out / f"overhead-loop-{repeat}.log"
        run_timed([*loop_argv, str(rows_per_call)], loop_log, env=loop_env)
        result = json.loads(loop_log.read_text().strip().splitlines()[-1])
        loop.append(result["rows"] / result["seconds"])
    return {
        "rows": rows,
        "job_rows_per_s": job,
        "job_whole_process_rows_per_s": job_whole,
        "loop_rows_per_s": loop,
        "ratios_in_job": [j / lp for j, lp in zip(job, loop, strict=True)],
        "ratio_of_means_in_job": sum(job) / sum(loop),
        **job_report(out / "scored"),
    }


def user(out: Path, rows: int, repeats: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "base")
    corpus = ensure_corpus(out / f"corpus-{rows}-1", rows)
    pipeline_argv = [sys.executable, "-c", _PIPELINE_SCRIPT, str(corpus), str(checkpoint)]
    job_argv = sentiment_command("batch", str(corpus), str(out / "scored"), "--model", str(checkpoint))
    job_argv += ["--dtype", "fp32", "--overwrite"]
    baseline, ours = [], []
    for repeat in range(repeats):
        baseline.append(run_timed(pipeline_argv, out / f"user-baseline-{repeat}.log"))
        ours.append(run_timed(job_argv, out / f"user-job-{repeat}.log"))
    return {
        "rows": rows,
        "baseline_seconds": baseline,
        "job_seconds": ours,
        "ratios": [b / o for b, o in zip(baseline, ours, strict=True)],
        "ratio_of_means": sum(baseline) / sum(ours),
        **job_report(out / "scored"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_bench", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("mode", choices=["overhead", "user"])
    add("--rows", type=int, help="reviews (default: overhead 40000, user 300)")
    add("--repeats", type=int, default=2, help="alternating runs of each contender")
    add("--rows-per-call", type=int, default=1024, help="rows per call of the loop (overhead)")
    add("--out", default="benchmarks/out/offline", help="working directory (default: %(default)s)")
    options = parser.parse_args(argv)
    work_offline()
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # overhead: 40,000 rows, so that a job's fixed start (Ray Data's workers, the model actors'
    # imports and loads: 6 to 8 s on 2 cores) weighs as in a job worth distributing.
    rows = options.rows or {"overhead": 40000, "user": 300}[options.mode]
    if options.mode == "overhead":
        result = overhead(out, rows, options.rows_per_call, options.repeats)
    else:
        result = user(out, rows, options.repeats)
    result = {"mode": options.mode, **machine("benchmarks.offline_bench", argv), **result}
    write_json(out / f"{options.mode}.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
