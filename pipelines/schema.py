"""The scored-output contract, in one place: column names, types and order, and the ``input_<name>`` rule.

The batch job writes it (`pipelines.stage`), plans and checks it (`pipelines.batch`), and eval,
plots and resume read it back; each imports it from here. An output file holds the kept input
columns (an input column named like a prediction column is kept as ``input_<name>``), then
``label``, ``score``, ``score_<label>`` per label in the model's class order, ``num_tokens``,
``truncated`` and ``error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from sentiment.model import Prediction

_LEADING = ("label", "score")
_TRAILING = ("num_tokens", "truncated", "error")


def prediction_columns(labels: Sequence[str]) -> list[str]:
    """The prediction columns, in order."""
    return [*_LEADING, *(f"score_{label}" for label in labels), *_TRAILING]


def prediction_schema(labels: Sequence[str]) -> pa.Schema:
    """Types of the prediction columns."""
    fields = [pa.field("label", pa.string()), pa.field("score", pa.float64())]
    fields += [pa.field(f"score_{label}", pa.float64()) for label in labels]
    fields += [pa.field("num_tokens", pa.int64()), pa.field("truncated", pa.bool_()), pa.field("error", pa.string())]
    return pa.schema(fields)


def output_name(column: str, labels: Sequence[str]) -> str:
    """The name an input column gets in the output: ``input_<name>`` if a prediction column has its name."""
    return f"input_{column}" if column in prediction_columns(labels) else column


def scored_labels(schema: pa.Schema) -> list[str] | None:
    """The model's labels if ``schema`` ends with the prediction columns, else None."""
    names = schema.names
    if len(names) < len(_LEADING) + 2 + len(_TRAILING) or tuple(names[-len(_TRAILING) :]) != _TRAILING:
        return None
    if "score" not in names:
        return None
    start = len(names) - 1 - names[::-1].index("score")
    middle = names[start + 1 : -len(_TRAILING)]
    if start < 1 or names[start - 1] != "label" or len(middle) < 2 or not all(n.startswith("score_") for n in middle):
        return None
    return [name[len("score_") :] for name in middle]


def with_predictions(
    table: pa.Table, predictions: Sequence[Prediction | None], errors: Sequence[str | None], labels: Sequence[str]
) -> pa.Table:
    """``table`` (the input columns, renamed by `output_name`) followed by the prediction columns.

    A row with an ``errors`` entry has no prediction (None) and null prediction columns.
    """
    schema = prediction_schema(labels)
    rows: dict[str, list[Any]] = {
        "label": [p.label if p else None for p in predictions],
        "score": [p.score if p else None for p in predictions],
    }
    for label in labels:
        rows[f"score_{label}"] = [p.scores[label] if p else None for p in predictions]
    rows["num_tokens"] = [p.num_tokens if p else None for p in predictions]
    rows["truncated"] = [p.truncated if p else None for p in predictions]
    rows["error"] = list(errors)
    table = table.rename_columns([output_name(name, labels) for name in table.column_names])
    for name in schema.names:
        table = table.append_column(schema.field(name), pa.array(rows[name], type=schema.field(name).type))
    return table
