"""What a batch run reports: its result, the run report (``_report.json``), its summary line, its progress.

The summary line is formatted from the run report, so the two never disagree; the progress line
comes from what the model actors report to the job's `ActorLog` while it runs.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipelines.args import PipelineArgs


@dataclass(frozen=True)
class BatchResult:
    """What a finished job did; `summary_line` is the one line ``sentiment batch`` prints."""

    output: str
    rows: int
    """Rows in the output, every input row exactly once."""
    processed_rows: int
    """Rows this run scored (fewer than `rows` when it resumed)."""
    seconds: float
    """Wall time of this run's Ray Data execution, actor start and model load included."""
    tokens: int
    truncated: int
    errors: int
    input_files: int
    slices: int = 0
    """Slices of the input (see `pipelines.plan.Slice`)."""
    skipped_slices: int = 0
    """Slices whose outputs an interrupted run had already completed."""
    skipped_files: int = 0
    """Input files all of whose slices an interrupted run had already completed."""
    labels: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    """The run report written as ``_report.json`` (see `run_report`); `summary_line` formats it."""

    @property
    def rows_per_second(self) -> float:
        return self.processed_rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return format_summary(self.report or self.counts())

    def counts(self) -> dict[str, Any]:
        """The numbers of the run report."""
        return {
            "output": self.output,
            "input_rows": self.rows,
            "output_rows": self.rows,
            "processed_rows": self.processed_rows,
            "errors": self.errors,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "rows_per_second": self.rows_per_second,
            "tokens_per_second": self.tokens_per_second,
            "input_files": self.input_files,
            "slices": self.slices,
            "skipped_slices": self.skipped_slices,
            "skipped_files": self.skipped_files,
        }


def format_summary(report: Mapping[str, Any]) -> str:
    """The one line ``sentiment batch`` prints, from a run report (``_report.json``'s contents)."""
    processed = report["processed_rows"]
    if processed == 0:
        return f"nothing to do: {report['output']} is complete with {report['output_rows']} rows"
    scored = processed - report["errors"]
    truncated = report["truncated"] / scored if scored else 0.0
    line = (
        f"{processed} rows in {report['seconds']:.1f} s: {report['rows_per_second']:.1f} rows/s, "
        f"{report['tokens_per_second']:.0f} tokens/s, {truncated:.1%} truncated, {report['errors']} rows with errors"
    )
    if report["skipped_slices"]:
        line += f"; resumed: {report['skipped_slices']} of {report['slices']} slices were already complete"
    return line + f"; {report['output_rows']} rows in {report['output']}"


def run_report(
    result: BatchResult,
    args: PipelineArgs,
    started_at: str,
    finished_at: str,
    resolved: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run did and with what: `BatchResult.counts`, the model, the config, Ray's version, timestamps.

    Rates count this run's rows (fewer than the output's when it resumed) over the wall time of its
    Ray Data execution, actor start and model load included. ``model.device`` and ``model.dtype``
    are as configured; ``resolved`` says what they became: ``num_gpus_per_actor`` and ``actors``, one
    entry per model actor with the device, dtype, memory cap and torch threads it runs with, and
    the rows and tokens it ran; ``pool`` how many model actors were allowed, with what, and why.
    The padding share is of the tokens the model ran: ``1 - tokens_run / tokens_padded``.
    """
    import ray

    model = args.model
    resolved = resolved or {}
    actors = list(resolved.get("actors", []))
    tokens_run = sum(actor.get("tokens_run", 0) for actor in actors)
    tokens_padded = sum(actor.get("tokens_padded", 0) for actor in actors)
    return {
        "format": 2,
        **result.counts(),
        "padding_share": 1 - tokens_run / tokens_padded if tokens_padded else None,
        "model": {
            "model_id": model.model_id,
            "revision": model.revision,
            "labels": list(result.labels),
            "backend": model.backend,
            "dtype": model.dtype,
            "device": model.device,
            "num_gpus_per_actor": resolved.get("num_gpus_per_actor"),
        },
        "pool": dict(resolved.get("pool", {})),
        "actors": actors,
        # PipelineArgs holds no secrets; mode="json" makes every value JSON-ready.
        "config": args.model_dump(mode="json"),
        "ray_version": ray.__version__,
        "started_at": started_at,
        "finished_at": finished_at,
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Progress:
    """Prints rows done of total, rows/s and an ETA every ``interval_s`` while a job runs (a thread).

    ``done`` returns the rows scored so far; it is called from the thread, so it must be cheap.
    """

    def __init__(
        self, total: int, done: Callable[[], float], interval_s: float = 10.0, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.done = done
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sentiment-progress", daemon=True)

    def __enter__(self) -> Progress:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                rows = self.done()
            except Exception:  # a progress line is not worth failing a job for
                continue
            print(progress_line(rows, self.total, time.perf_counter() - self.started), file=self.stream, flush=True)


def progress_line(rows: float, total: int, seconds: float) -> str:
    """``scored 12,288 of 40,000 rows (30.7%), 412.0 rows/s, ETA 1m07s``."""
    rate = rows / seconds if seconds > 0 else 0.0
    eta = f"ETA {_duration((total - rows) / rate)}" if rate > 0 and rows < total else "ETA unknown"
    share = rows / total if total else 1.0
    return f"scored {rows:,.0f} of {total:,} rows ({share:.1%}), {rate:.1f} rows/s, {eta}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
