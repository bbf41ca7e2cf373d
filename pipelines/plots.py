"""Pictures of an evaluation: the confusion matrix, the score distribution per gold class, and a
reliability (calibration) curve, written as PNGs by ``sentiment eval --plot DIR``.

The numbers behind the pictures are plain functions over NumPy arrays (`calibration_bins`,
`score_histograms`) that add up file by file, so a corpus of any size needs only its gold labels and
one score column of one file in memory at a time. matplotlib is an optional extra (``plot``) and is
imported only when a picture is drawn, with the headless Agg backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from pipelines import files
from pipelines.eval import EvalReport, gold_column, label_indices
from pipelines.schema import scored_labels
from sentiment.errors import InvalidInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FILES = ("confusion_matrix.png", "score_distribution.png", "calibration.png")
DEFAULT_BINS = 10


class PlotUnavailableError(InvalidInputError):
    """``--plot`` without matplotlib installed."""


def bin_index(probabilities: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each probability in [0, 1]: bin i holds [i/bins, (i+1)/bins); 1.0 goes to the last."""
    return np.minimum((np.asarray(probabilities, dtype=np.float64) * bins).astype(np.int64), bins - 1)


@dataclass
class CalibrationBins:
    """Per equal-width bin of P(positive): rows, summed probability, and rows whose gold label is positive."""

    counts: np.ndarray
    probability_sums: np.ndarray
    positives: np.ndarray

    @property
    def bins(self) -> int:
        return len(self.counts)

    def mean_probability(self) -> np.ndarray:
        """Mean predicted probability per bin; NaN where a bin is empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.probability_sums / self.counts, np.nan)

    def observed_frequency(self) -> np.ndarray:
        """Share of rows per bin whose gold label is the positive class; NaN where a bin is empty."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.positives / self.counts, np.nan)

    def expected_calibration_error(self) -> float:
        """ECE: the row-weighted mean gap between predicted probability and observed frequency (Guo et al. 2017)."""
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        filled = self.counts > 0
        gaps = np.abs(
            self.probability_sums[filled] / self.counts[filled] - self.positives[filled] / self.counts[filled]
        )
        return float((self.counts[filled] * gaps).sum() / total)


def calibration_bins(probabilities: np.ndarray, is_positive: np.ndarray, bins: int = DEFAULT_BINS) -> CalibrationBins:
    """Reliability-curve counts of P(positive) against whether the gold label is positive."""
    index = bin_index(probabilities, bins)
    return CalibrationBins(
        counts=np.bincount(index, minlength=bins),
        probability_sums=np.bincount(index, weights=np.asarray(probabilities, dtype=np.float64), minlength=bins),
        positives=np.bincount(index, weights=np.asarray(is_positive, dtype=np.float64), minlength=bins).astype(
            np.int64
        ),
    )


def score_histograms(probabilities: np.ndarray, gold: np.ndarray, classes: int, bins: int) -> np.ndarray:
    """``histograms[gold_class][bin]``: rows per gold class per equal-width bin of P(positive)."""
    index = bin_index(probabilities, bins)
    flat = np.bincount(np.asarray(gold, dtype=np.int64) * bins + index, minlength=classes * bins)
    return flat.reshape(classes, bins)


@dataclass
class ScoreCounts:
    """Everything the score pictures need, added up over a scored corpus."""

    labels: list[str]
    bins: int
    histograms: np.ndarray = field(init=False)
    calibration: CalibrationBins = field(init=False)

    def __post_init__(self) -> None:
        self.histograms = np.zeros((len(self.labels), self.bins), dtype=np.int64)
        zeros = np.zeros(self.bins, dtype=np.int64)
        self.calibration = CalibrationBins(zeros.copy(), zeros.astype(np.float64), zeros.copy())

    @property
    def positive(self) -> str:
        """The class whose probability is plotted: the last label (``pos`` for neg/pos models)."""
        return self.labels[-1]

    def add(self, probabilities: np.ndarray, gold: np.ndarray) -> None:
        self.histograms += score_histograms(probabilities, gold, len(self.labels), self.bins)
        part = calibration_bins(probabilities, gold == len(self.labels) - 1, self.bins)
        self.calibration.counts += part.counts
        self.calibration.probability_sums += part.probability_sums
        self.calibration.positives += part.positives


def score_counts(path: str, label_column: str = "label", bins: int = DEFAULT_BINS) -> ScoreCounts:
    """Read gold labels and P(positive) of a scored Parquet file or directory, file by file, into `ScoreCounts`.

    Rows without a gold label or without a prediction (a text error) are left out, as in the report.
    """
    parquet = files.list_parquet(path)
    labels = scored_labels(files.read_footers(parquet[:1])[0].schema)
    if labels is None:
        raise InvalidInputError(f"{path} is not the output of the batch job (no prediction columns)")
    gold_name = gold_column(label_column, labels)
    counts = ScoreCounts(labels, bins)
    score_name = f"score_{counts.positive}"
    for location in parquet:
        with location.filesystem.open_input_file(location.path) as handle:
            table = pq.ParquetFile(handle).read(columns=[gold_name, score_name])
        gold = label_indices(table.column(gold_name), labels, label_column)
        scores = table.column(score_name).to_numpy(zero_copy_only=False).astype(np.float64)
        keep = (gold >= 0) & ~np.isnan(scores)
        counts.add(scores[keep], gold[keep])
    return counts


def write_plots(report: EvalReport, counts: ScoreCounts, directory: str | Path) -> list[Path]:
    """Draw the three PNGs into ``directory`` (created if missing) and return their paths."""
    pyplot = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "confusion_matrix.png": _confusion_figure(pyplot, report),
        "score_distribution.png": _distribution_figure(pyplot, counts),
        "calibration.png": _calibration_figure(pyplot, counts),
    }
    paths = []
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        pyplot.close(figure)
        paths.append(out / name)
    return paths


def require_matplotlib() -> None:
    """Raise `PlotUnavailableError` now, before a long job, if matplotlib is missing."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailableError(
            "--plot needs matplotlib, which is not installed: pip install 'ray-sentiment[plot]' (or matplotlib>=3.8)"
        ) from exc
    # Headless: no display here or on a cluster node. Set only when drawing, never at import time.
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _confusion_figure(pyplot: Any, report: EvalReport) -> Figure:
    matrix = np.asarray(report.confusion, dtype=np.int64)
    size = len(report.labels)
    figure, axes = pyplot.subplots(figsize=(1.6 * size + 2.4, 1.4 * size + 1.8))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(size), report.labels)
    axes.set_yticks(range(size), report.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    threshold = matrix.max() / 2 if matrix.size else 0
    for gold in range(size):
        support = matrix[gold].sum()
        for predicted in range(size):
            n = int(matrix[gold, predicted])
            share = f"\n{n / support:.0%}" if support else ""
            axes.text(
                predicted,
                gold,
                f"{n}{share}",
                ha="center",
                va="center",
                color="white" if n > threshold else "black",
            )
    axes.set_title(f"Confusion matrix: accuracy {report.accuracy:.3f} on {report.evaluated} rows")
    return figure


def _distribution_figure(pyplot: Any, counts: ScoreCounts) -> Figure:
    figure, axes = pyplot.subplots(figsize=(6.4, 4.0))
    edges = np.linspace(0.0, 1.0, counts.bins + 1)
    for index, label in enumerate(counts.labels):
        axes.stairs(counts.histograms[index], edges, fill=True, alpha=0.45, label=f"gold {label}")
    axes.set_xlim(0, 1)
    axes.set_xlabel(f"P({counts.positive})")
    axes.set_ylabel("rows")
    axes.set_title(f"Score distribution per gold class ({int(counts.histograms.sum())} rows)")
    axes.legend()
    return figure


def _calibration_figure(pyplot: Any, counts: ScoreCounts) -> Figure:
    calibration = counts.calibration
    figure, (curve, histogram) = pyplot.subplots(
        2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curve.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    mean = calibration.mean_probability()
    observed = calibration.observed_frequency()
    filled = calibration.counts > 0
    curve.plot(mean[filled], observed[filled], marker="o", label="model")
    curve.set_ylim(0, 1)
    curve.set_ylabel(f"observed frequency of gold {counts.positive}")
    curve.set_title(f"Reliability curve (ECE {calibration.expected_calibration_error():.3f})")
    curve.legend(loc="upper left")
    edges = np.linspace(0.0, 1.0, calibration.bins + 1)
    histogram.stairs(calibration.counts, edges, fill=True)
    for index in np.flatnonzero(filled):
        histogram.text(
            (edges[index] + edges[index + 1]) / 2,
            calibration.counts[index],
            str(calibration.counts[index]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    histogram.set_xlim(0, 1)
    histogram.set_xlabel(f"mean predicted P({counts.positive}) per bin")
    histogram.set_ylabel("rows")
    return figure


def plot_evaluation(path: str, report: EvalReport, directory: str | Path, label_column: str = "label") -> list[Path]:
    """The three PNGs for the scored output at ``path`` and its ``report``."""
    require_matplotlib()  # before reading the corpus
    return write_plots(report, score_counts(path, label_column), directory)
