"""The evaluation report: predictions against gold labels, laid out like a model card's Benchmarking section.

`report_from_counts` and friends are plain functions over a confusion matrix; `evaluate` reads the
two label columns of a scored Parquet file or directory (the batch job's output) and counts them
file by file, so a corpus of any size needs only two columns of one file in memory at a time. An
input that has not been scored yet goes through the batch job (`pipelines.batch.run`) first, the
same path as ``sentiment batch``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.schema import output_name, scored_labels
from sentiment.errors import InvalidInputError


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int

    def to_dict(self) -> dict[str, float | int]:
        return {"precision": self.precision, "recall": self.recall, "f1-score": self.f1, "support": self.support}


@dataclass(frozen=True)
class EvalReport:
    """Per-class and averaged precision, recall and F1, accuracy, and the confusion matrix.

    Only rows with both a gold label and a prediction count; rows whose text got an error (no
    prediction) and rows without a gold label are counted separately, never dropped silently.
    """

    labels: list[str]
    confusion: list[list[int]]
    """``confusion[gold][predicted]``, in `labels` order."""
    error_rows: int = 0
    missing_gold_rows: int = 0

    @property
    def evaluated(self) -> int:
        return int(sum(map(sum, self.confusion)))

    @property
    def total_rows(self) -> int:
        return self.evaluated + self.error_rows + self.missing_gold_rows

    @property
    def per_class(self) -> dict[str, ClassMetrics]:
        matrix = np.asarray(self.confusion, dtype=np.int64).reshape(len(self.labels), len(self.labels))
        metrics = {}
        for i, label in enumerate(self.labels):
            true_positive = int(matrix[i, i])
            predicted = int(matrix[:, i].sum())
            support = int(matrix[i, :].sum())
            # An empty denominator scores 0, as scikit-learn's zero_division default does.
            precision = true_positive / predicted if predicted else 0.0
            recall = true_positive / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            metrics[label] = ClassMetrics(precision, recall, f1, support)
        return metrics

    @property
    def accuracy(self) -> float:
        correct = sum(self.confusion[i][i] for i in range(len(self.labels)))
        return correct / self.evaluated if self.evaluated else 0.0

    def average(self, weighted: bool) -> ClassMetrics:
        metrics = list(self.per_class.values())
        total = self.evaluated
        if weighted:
            weights = [m.support / total if total else 0.0 for m in metrics]
        else:
            weights = [1 / len(metrics)] * len(metrics)
        return ClassMetrics(
            precision=sum(w * m.precision for w, m in zip(weights, metrics, strict=True)),
            recall=sum(w * m.recall for w, m in zip(weights, metrics, strict=True)),
            f1=sum(w * m.f1 for w, m in zip(weights, metrics, strict=True)),
            support=total,
        )

    def to_dict(self) -> dict[str, Any]:
        """The same numbers as `format_text`, for machines (``sentiment eval --json``)."""
        return {
            "labels": list(self.labels),
            "classes": {label: m.to_dict() for label, m in self.per_class.items()},
            "accuracy": self.accuracy,
            "macro avg": self.average(weighted=False).to_dict(),
            "weighted avg": self.average(weighted=True).to_dict(),
            "confusion_matrix": [list(row) for row in self.confusion],
            "rows": {
                "total": self.total_rows,
                "evaluated": self.evaluated,
                "errors": self.error_rows,
                "missing_gold": self.missing_gold_rows,
            },
        }

    def format_text(self, digits: int = 2) -> str:
        """scikit-learn's classification_report layout (as in Spark NLP's model cards), then the confusion matrix."""
        width = max(len("weighted avg"), *(len(label) for label in self.labels))
        head = f"{'':>{width}s}  {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"

        def row(name: str, m: ClassMetrics) -> str:
            return (
                f"{name:>{width}s}  {m.precision:>9.{digits}f} {m.recall:>9.{digits}f} "
                f"{m.f1:>9.{digits}f} {m.support:>9}"
            )

        lines = [head, ""]
        lines += [row(label, m) for label, m in self.per_class.items()]
        lines.append("")
        lines.append(f"{'accuracy':>{width}s}  {'':>9} {'':>9} {self.accuracy:>9.{digits}f} {self.evaluated:>9}")
        lines.append(row("macro avg", self.average(weighted=False)))
        lines.append(row("weighted avg", self.average(weighted=True)))

        cell = max(6, *(len(label) for label in self.labels), *(len(str(n)) for r in self.confusion for n in r))
        name_width = max(len("gold"), *(len(label) for label in self.labels))
        lines += ["", "confusion matrix (rows: gold, columns: predicted)"]
        lines.append(f"{'gold':<{name_width}s}" + "".join(f" {label:>{cell}s}" for label in self.labels))
        for label, counts in zip(self.labels, self.confusion, strict=True):
            lines.append(f"{label:<{name_width}s}" + "".join(f" {n:>{cell}d}" for n in counts))

        lines.append("")
        lines.append(
            f"{self.evaluated} of {self.total_rows} rows evaluated; {self.error_rows} without a prediction "
            f"(text errors), {self.missing_gold_rows} without a gold label"
        )
        return "\n".join(lines)


def report_from_counts(
    labels: Sequence[str], confusion: Sequence[Sequence[int]], error_rows: int = 0, missing_gold_rows: int = 0
) -> EvalReport:
    """An `EvalReport` from a confusion matrix (``confusion[gold][predicted]``)."""
    if len(confusion) != len(labels) or any(len(row) != len(labels) for row in confusion):
        raise ValueError(f"confusion must be {len(labels)}x{len(labels)} for labels {list(labels)}")
    return EvalReport(list(labels), [[int(n) for n in row] for row in confusion], error_rows, missing_gold_rows)


def label_indices(values: pa.Array | pa.ChunkedArray, labels: Sequence[str], column: str) -> np.ndarray:
    """Class indices of gold labels given as names (``neg``/``pos``) or as indices (0/1); -1 where null.

    Raises `InvalidInputError` naming the column and the first value that is neither.
    """
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_integer(values.type) or pa.types.is_boolean(values.type):
        numbers = values.cast(pa.int64())
        bad = pc.and_(pc.is_valid(numbers), pc.or_(pc.less(numbers, 0), pc.greater_equal(numbers, len(labels))))
        if pc.any(bad).as_py():
            raise InvalidInputError(
                f"gold label {numbers.filter(bad)[0].as_py()} in column {column!r} is not a class index "
                f"0..{len(labels) - 1} ({', '.join(labels)})"
            )
        return np.asarray(numbers.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type):
        names = values.cast(pa.string())
        positions = pc.index_in(names, value_set=pa.array(list(labels), pa.string()))
        bad = pc.and_(pc.is_valid(names), pc.is_null(positions))
        if pc.any(bad).as_py():
            raise InvalidInputError(
                f"gold label {names.filter(bad)[0].as_py()!r} in column {column!r} is not one of {list(labels)} "
                f"(or a class index 0..{len(labels) - 1})"
            )
        return np.asarray(positions.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    raise InvalidInputError(f"gold label column {column!r} has type {values.type}; expected label names or 0/1")


def gold_column(label_column: str, labels: Sequence[str]) -> str:
    """Where the batch job put the gold column: ``input_<name>`` when a prediction column took its name."""
    return output_name(label_column, labels)


def evaluate_scored(path: str, label_column: str = "label") -> EvalReport:
    """Count a scored Parquet file or directory (the batch job's output) into an `EvalReport`."""
    parquet = files.list_parquet(path)
    schema = files.read_footers(parquet[:1])[0].schema
    labels = scored_labels(schema)
    if labels is None:
        raise InvalidInputError(f"{path} is not the output of the batch job (no prediction columns)")
    gold = gold_column(label_column, labels)
    size = len(labels)
    confusion = np.zeros(size * size, dtype=np.int64)
    errors = missing = 0
    for location in parquet:
        with location.filesystem.open_input_file(location.path) as handle:
            file = pq.ParquetFile(handle)
            if gold not in file.schema_arrow.names:
                raise InvalidInputError(
                    f"{location.uri} has no gold label column {gold!r}; columns: {file.schema_arrow.names}"
                )
            table = file.read(columns=[gold, "label"])
        gold_index = label_indices(table.column(gold), labels, label_column)
        predicted = label_indices(table.column("label"), labels, "label")
        has_gold = gold_index >= 0
        has_prediction = predicted >= 0
        missing += int((~has_gold).sum())
        errors += int((has_gold & ~has_prediction).sum())
        both = has_gold & has_prediction
        confusion += np.bincount(gold_index[both] * size + predicted[both], minlength=size * size)
    return report_from_counts(labels, confusion.reshape(size, size).tolist(), errors, missing)


def evaluate(
    path: str,
    label_column: str = "label",
    pipeline: PipelineArgs | None = None,
    on_scored: Callable[[str, EvalReport], None] | None = None,
) -> EvalReport:
    """Evaluate ``path``: the batch job's output as is, or an unscored input after running the batch job on it.

    ``pipeline`` configures that run (model, actors, ...); its ``input``, ``output`` and ``keep`` are
    replaced by ``path``, a temporary directory and the gold column. ``on_scored(scored, report)``
    runs while the scored output still exists (``sentiment eval --plot`` draws its pictures there).
    """
    parquet = files.list_parquet(path)
    schema = files.read_footers(parquet[:1])[0].schema
    if scored_labels(schema) is not None:
        return _reported(path, evaluate_scored(path, label_column), on_scored)
    if label_column not in schema.names:
        raise InvalidInputError(f"{parquet[0].uri} has no gold label column {label_column!r}; columns: {schema.names}")

    from pipelines.batch import run

    settings = pipeline.model_dump(exclude={"input", "output", "keep", "overwrite", "resume"}) if pipeline else {}
    with tempfile.TemporaryDirectory(prefix="sentiment-eval-") as scratch:
        output = f"{scratch}/scored"
        run(PipelineArgs(**settings, input=path, output=output, keep=[label_column]))
        return _reported(output, evaluate_scored(output, label_column), on_scored)


def _reported(scored: str, report: EvalReport, on_scored: Callable[[str, EvalReport], None] | None) -> EvalReport:
    if on_scored is not None:
        on_scored(scored, report)
    return report


def format_json(report: EvalReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
