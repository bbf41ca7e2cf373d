"""The offline job's figures, each against a baseline measured in the same run.

    python -m benchmarks.offline_bench overhead [--rows 40000]  # pipeline cost, tiny model
    python -m benchmarks.offline_bench user [--rows 300]        # what a user sees: BERT-base, fp32
    python -m benchmarks.offline_bench resume [--rows 40000]    # a one-file corpus killed at 60%

- **overhead**: ``sentiment batch`` with its shipped defaults and a tiny checkpoint (so that the
  pipeline's own cost shows) against a one-process loop of the same class over the same Parquet, in
  slices of ``--rows-per-call`` rows: rows/s of both (model load included in both, imports and
  Ray's start in neither), and their ratio; runs alternate, ``--repeats`` each, each in a fresh process.
- **user**: ``sentiment batch IN OUT --model <BERT-base-sized dir> --dtype fp32`` with the shipped
  defaults, timed as a whole process (Python start, Ray start and model load included), against a
  process running the ``transformers.pipeline("text-classification")(texts, batch_size=16,
  truncation=True)`` a user would write; runs alternate, ``--repeats`` each.
- **resume**: one Parquet file, a full run timed, a second run killed once its model has scored
  60% of the rows (its progress lines, every 0.5 s), then ``--resume``: how many rows the killed
  run had scored that the resumed run scores again (the slices in flight), and how many it kept.

Random-weight checkpoints (`sentiment.testing.make_checkpoint`), synthetic IMDB-length reviews
(`benchmarks.corpus`), no network. Prints a markdown table and writes ``OUT/<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_name, ensure_checkpoint
from benchmarks.corpus import write_corpus

REPO = Path(__file__).resolve().parents[1]
# The one-process loop a user would write around the same class, timed from the model load on
# (imports done, as the job's timer starts with Ray up). Its tokenizer runs as a user's would (Rust
# threads on every core: TOKENIZERS_PARALLELISM is left alone).
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
outputs = classify(texts, batch_size=16, truncation=True)
print(len(outputs))
"""


def environment() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # A fresh local Ray for each job, never one a developer has running.
    env.pop("RAY_ADDRESS", None)
    return env


def batch_command(corpus: Path, output: Path, checkpoint: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ray_sentiment",
        "batch",
        str(corpus),
        str(output),
        "--model",
        str(checkpoint),
        *flags,
    ]


def timed(argv: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as sink:
        subprocess.run(argv, cwd=REPO, env=environment(), stdout=sink, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def overhead(out: Path, rows: int, rows_per_call: int, repeats: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "tiny")
    corpus = out / f"corpus-{rows}-1"
    if not corpus.exists():
        write_corpus(corpus, rows=rows, files=1, seed=0)
    parquet = next(corpus.glob("*.parquet"))
    loop_argv = [sys.executable, "-c", _LOOP_SCRIPT, str(parquet), str(checkpoint), str(rows_per_call)]
    loop_env = {key: value for key, value in environment().items() if key != "TOKENIZERS_PARALLELISM"}
    job_argv = batch_command(corpus, out / "scored", checkpoint, "--overwrite")
    job, job_whole, loop = [], [], []
    for repeat in range(repeats):
        # Alternating, each in a fresh process: neither runs beside the other's leftovers.
        whole = timed(job_argv, out / f"overhead-job-{repeat}.log")
        report = json.loads((out / "scored" / "_report.json").read_text())
        job.append(report["rows_per_second"])
        job_whole.append(rows / whole)
        time.sleep(3)  # the job's local Ray winds down
        printed = subprocess.run(loop_argv, cwd=REPO, env=loop_env, capture_output=True, text=True, check=True)
        result = json.loads(printed.stdout.strip().splitlines()[-1])
        loop.append(result["rows"] / result["seconds"])
    return {
        "rows": rows,
        "job_rows_per_s": job,
        "job_whole_process_rows_per_s": job_whole,
        "loop_rows_per_s": loop,
        "ratios_in_job": [j / lp for j, lp in zip(job, loop, strict=True)],
        "ratio_of_means_in_job": sum(job) / sum(loop),
        "pool": report["pool"],
        "actors": [{k: a[k] for k in ("device", "dtype", "torch_threads", "rows")} for a in report["actors"]],
        "padding_share": report["padding_share"],
    }


def user(out: Path, rows: int, repeats: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "base")
    corpus = out / f"corpus-{rows}-1"
    if not corpus.exists():
        write_corpus(corpus, rows=rows, files=1, seed=0)
    pipeline_argv = [sys.executable, "-c", _PIPELINE_SCRIPT, str(corpus), str(checkpoint)]
    job_argv = batch_command(corpus, out / "scored", checkpoint, "--dtype", "fp32", "--overwrite")
    baseline, ours = [], []
    for repeat in range(repeats):
        baseline.append(timed(pipeline_argv, out / f"user-baseline-{repeat}.log"))
        ours.append(timed(job_argv, out / f"user-job-{repeat}.log"))
    report = json.loads((out / "scored" / "_report.json").read_text())
    return {
        "rows": rows,
        "baseline_seconds": baseline,
        "job_seconds": ours,
        "ratios": [b / o for b, o in zip(baseline, ours, strict=True)],
        "ratio_of_means": sum(baseline) / sum(ours),
        "pool": report["pool"],
        "actors": [{k: a[k] for k in ("device", "dtype", "torch_threads")} for a in report["actors"]],
        "padding_share": report["padding_share"],
    }


def resume(out: Path, rows: int) -> dict[str, Any]:
    checkpoint = ensure_checkpoint(out, "tiny")
    corpus = out / f"corpus-{rows}-1"
    if not corpus.exists():
        write_corpus(corpus, rows=rows, files=1, seed=0)
    output = out / "scored-resume"
    full = timed(batch_command(corpus, output, checkpoint, "--overwrite"), out / "resume-full.log")
    killed_log = out / "resume-killed.log"
    with killed_log.open("w") as sink:
        process = subprocess.Popen(
            batch_command(corpus, output, checkpoint, "--overwrite", "--progress-interval", "0.5"),
            cwd=REPO,
            env=environment(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started = time.perf_counter()
        # Killed once the model has scored 60% of the rows (its progress lines say so).
        while scored_rows(killed_log) < 0.6 * rows and process.poll() is None:
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_after = time.perf_counter() - started
    scored_before_kill = scored_rows(killed_log)
    # The killed run's local Ray goes with its process group; give its workers a moment to exit.
    time.sleep(5)
    resumed = timed(batch_command(corpus, output, checkpoint, "--resume"), out / "resume-resumed.log")
    report = json.loads((output / "_report.json").read_text())
    kept = rows - report["processed_rows"]
    return {
        "rows": rows,
        "full_run_seconds": full,
        "killed_after_seconds": killed_after,
        "scored_before_kill": scored_before_kill,
        "kept_rows": kept,
        # Rows the killed run had scored that the resumed run scored again (in-flight slices).
        "rescored_rows": max(0, scored_before_kill - kept),
        "rescored_share": max(0, scored_before_kill - kept) / rows,
        "resumed_run_processed_rows": report["processed_rows"],
        "resumed_run_seconds": resumed,
        "slices": report["slices"],
        "skipped_slices": report["skipped_slices"],
        "output_rows": report["output_rows"],
    }


def scored_rows(log: Path) -> int:
    """Rows scored by the model, from the last progress line of a ``sentiment batch`` log."""
    found = re.findall(r"scored ([\d,]+) of", log.read_text(errors="replace"))
    return int(found[-1].replace(",", "")) if found else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["overhead", "user", "resume"])
    parser.add_argument("--rows", type=int, help="reviews (default: overhead 40000, user 300, resume 40000)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each contender (overhead, user)")
    parser.add_argument("--rows-per-call", type=int, default=1024, help="rows per call of the loop (overhead)")
    parser.add_argument("--out", default="benchmarks/out/offline", help="working directory (default: %(default)s)")
    options = parser.parse_args(argv)
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # overhead: 40,000 rows, so that a job's fixed start (Ray Data's workers, the model actors'
    # imports and loads: 6 to 8 s on 2 cores) weighs as in a job worth distributing.
    rows = options.rows or {"overhead": 40000, "user": 300, "resume": 40000}[options.mode]
    if options.mode == "overhead":
        result = overhead(out, rows, options.rows_per_call, options.repeats)
    elif options.mode == "user":
        result = user(out, rows, options.repeats)
    else:
        result = resume(out, rows)
    result = {"mode": options.mode, "cpu": cpu_name(), "cores": os.cpu_count(), **result}
    (out / f"{options.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
