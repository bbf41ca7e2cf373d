"""``sentiment eval --plot``: the numbers behind the pictures, checked against plain loops, and the PNGs."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.plots import PLOT_FILES, calibration_bins, score_counts
from ray_sentiment.cli import main

BINS = 10


def scored_rows(n: int, seed: int) -> pa.Table:
    """Batch-job-shaped output with spread-out scores, a few text errors and a few rows without gold."""
    rng = random.Random(seed)
    gold: list[str | None] = []
    p_pos: list[float | None] = []
    for i in range(n):
        g = rng.choice(["neg", "pos"])
        # Skewed towards the gold class, so the pictures look like a (mediocre) model's.
        p = min(1.0, max(0.0, rng.betavariate(4, 2) if g == "pos" else rng.betavariate(2, 4)))
        gold.append(None if i % 37 == 5 else g)
        p_pos.append(None if i % 41 == 7 else p)
    # Values on the bin edges, including exactly 0 and 1.
    p_pos[:6] = [0.0, 0.1, 0.5, 0.9, 1.0, 0.30000000000000004]
    return pa.table(
        {
            "id": list(range(n)),
            "input_label": gold,
            "label": [None if p is None else ("pos" if p >= 0.5 else "neg") for p in p_pos],
            "score": [None if p is None else max(p, 1 - p) for p in p_pos],
            "score_neg": [None if p is None else 1 - p for p in p_pos],
            "score_pos": p_pos,
            "num_tokens": pa.array([None if p is None else 12 for p in p_pos], pa.int64()),
            "truncated": pa.array([None if p is None else False for p in p_pos], pa.bool_()),
            "error": [None if p is not None else "text is empty" for p in p_pos],
        }
    )


def plain_bins(pairs: list[tuple[float, str]]) -> tuple[list[int], list[float], list[int], list[list[int]]]:
    """Per bin [i/10, (i+1)/10) (1.0 in the last): rows, summed P(pos), gold-pos rows; and rows per gold class."""
    counts, sums, positives = [0] * BINS, [0.0] * BINS, [0] * BINS
    per_class = [[0] * BINS, [0] * BINS]
    for p, g in pairs:
        b = next(i for i in range(BINS) if i / BINS <= p < (i + 1) / BINS) if p < 1.0 else BINS - 1
        counts[b] += 1
        sums[b] += p
        positives[b] += g == "pos"
        per_class[("neg", "pos").index(g)][b] += 1
    return counts, sums, positives, per_class


def write_scored(directory: Path, table: pa.Table) -> Path:
    directory.mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), directory / "part-00000-a-0000.parquet")
    pq.write_table(table.slice(half), directory / "part-00001-b-0000.parquet")
    return directory


def test_plot_numbers_equal_plain_counting_over_the_rows(tmp_path: Path) -> None:
    table = scored_rows(500, seed=3)
    scored = write_scored(tmp_path / "scored", table)
    pairs = [
        (p, g)
        for p, g in zip(table.column("score_pos").to_pylist(), table.column("input_label").to_pylist(), strict=True)
        if p is not None and g is not None
    ]
    counts, sums, positives, per_class = plain_bins(pairs)

    got = score_counts(str(scored), bins=BINS)
    assert got.positive == "pos"
    assert got.calibration.counts.tolist() == counts
    assert got.calibration.probability_sums.tolist() == pytest.approx(sums)
    assert got.calibration.positives.tolist() == positives
    assert got.histograms.tolist() == per_class
    assert sum(counts) == len(pairs)
    # The edge values: 0.0 and 0.1 open their bins, 1.0 joins the last one.
    edges = calibration_bins(np.array([0.0, 0.1, 0.5, 0.9, 1.0, 0.0999]), np.zeros(6, dtype=bool), BINS)
    assert edges.counts.tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    filled = [i for i in range(BINS) if counts[i]]
    assert got.calibration.mean_probability()[filled] == pytest.approx([sums[i] / counts[i] for i in filled])
    assert got.calibration.observed_frequency()[filled] == pytest.approx([positives[i] / counts[i] for i in filled])
    ece = sum(counts[i] * abs(sums[i] / counts[i] - positives[i] / counts[i]) for i in filled) / len(pairs)
    assert got.calibration.expected_calibration_error() == pytest.approx(ece)


def test_eval_plot_writes_three_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    scored = write_scored(tmp_path / "scored", scored_rows(400, seed=5))
    pictures = tmp_path / "pictures"
    assert main(["eval", str(scored), "--plot", str(pictures)]) == 0
    assert "pictures written to" in capsys.readouterr().out
    assert sorted(path.name for path in pictures.iterdir()) == sorted(PLOT_FILES)
    for name in PLOT_FILES:
        data = (pictures / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, name
    print(f"eval pictures: {pictures}")


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scored = write_scored(tmp_path / "scored", scored_rows(20, seed=1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["eval", str(scored), "--plot", str(tmp_path / "pictures")]) == 1
    assert "--plot needs matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "pictures").exists()
