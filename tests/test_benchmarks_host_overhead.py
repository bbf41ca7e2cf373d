"""``python -m benchmarks host-overhead``: both paths give the same table, and the figures come out."""

from __future__ import annotations

from pathlib import Path

from benchmarks.host_overhead import measure, new_path, old_path, tokenized_call


def test_the_old_and_new_paths_write_the_same_columns_and_the_benchmark_times_both(tiny_checkpoint: Path) -> None:
    classifier, table = tokenized_call(tiny_checkpoint, rows=200)
    assert new_path(classifier, table).equals(old_path(classifier, table))
    result = measure(tiny_checkpoint, rows=100, calls=2)
    assert (result["rows"], result["calls"]) == (100, 2)
    assert set(result["median_ms"]) == {"old", "new", "old_read", "new_read"}
    assert result["speedup"] > 0
