"""`pipelines.report`: the summary line, formatted from the run report, and the progress line."""

from __future__ import annotations

import io
import time
from typing import Any

from pipelines.report import BatchResult, Progress, format_summary, progress_line


def report(**changes: Any) -> dict[str, Any]:
    counts = BatchResult(
        output="out/scored",
        rows=2000,
        processed_rows=2000,
        seconds=212.4,
        tokens=579_234,
        truncated=246,
        errors=0,
        input_files=2,
        slices=4,
    ).counts()
    return {**counts, **changes}


def test_the_summary_line_gives_rows_speed_truncation_errors_and_where_the_rows_are() -> None:
    assert format_summary(report()) == (
        "2000 rows in 212.4 s: 9.4 rows/s, 2727 tokens/s, 12.3% truncated, 0 rows with errors; 2000 rows in out/scored"
    )
    # The truncated share is of the rows that got a prediction.
    assert "25.0% truncated, 1000 rows with errors" in format_summary(report(errors=1000, truncated=250))


def test_a_resumed_run_says_how_many_slices_were_already_complete_and_a_complete_one_that_it_did_nothing() -> None:
    resumed = report(processed_rows=500, skipped_slices=3, rows_per_second=500 / 212.4)
    assert format_summary(resumed).endswith("; resumed: 3 of 4 slices were already complete; 2000 rows in out/scored")
    assert format_summary(report(processed_rows=0)) == "nothing to do: out/scored is complete with 2000 rows"


def test_the_progress_line_gives_rows_done_rate_and_eta() -> None:
    assert progress_line(12_288, 40_000, 29.8) == "scored 12,288 of 40,000 rows (30.7%), 412.3 rows/s, ETA 1m07s"
    assert progress_line(0, 40_000, 5.0) == "scored 0 of 40,000 rows (0.0%), 0.0 rows/s, ETA unknown"
    assert progress_line(40_000, 40_000, 4000.0).endswith("10.0 rows/s, ETA unknown")
    assert progress_line(100, 4_000_000, 1.0).endswith("ETA 11h06m")


def test_progress_prints_a_line_every_interval_while_the_job_runs() -> None:
    stream = io.StringIO()
    with Progress(100, lambda: 50, interval_s=0.05, stream=stream):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines
    assert all(line.startswith("scored 50 of 100 rows (50.0%)") for line in lines)
