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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def with_scores(
    table: pa.Table,
    probabilities: np.ndarray,
    predicted: np.ndarray,
    num_tokens: pa.Array | pa.ChunkedArray,
    truncated: pa.Array | pa.ChunkedArray,
    errors: pa.Array | pa.ChunkedArray,
    labels: Sequence[str],
) -> pa.Table:
    """``table`` (the input columns, renamed by `output_name`) followed by the prediction columns.

    ``probabilities`` (float, rows x labels) holds each row's class probabilities; ``predicted``
    (bool per row) says which rows have a prediction: the others (those with an ``errors`` entry)
    get null prediction columns. Built from arrays, with no Python object per row.
    """
    schema = prediction_schema(labels)
    missing = ~np.asarray(predicted, dtype=bool)
    has = pa.array(~missing)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(missing), len(labels))
    best = probabilities.argmax(axis=1) if len(labels) else np.zeros(len(missing), dtype=np.int64)
    columns: dict[str, Any] = {
        "label": pc.take(pa.array(list(labels), pa.string()), pa.array(best, mask=missing)),
        "score": pa.array(probabilities.max(axis=1, initial=0.0), mask=missing),
    }
    for index, label in enumerate(labels):
        columns[f"score_{label}"] = pa.array(probabilities[:, index], mask=missing)
    columns["num_tokens"] = pc.if_else(has, num_tokens, pa.scalar(None, pa.int64()))
    columns["truncated"] = pc.if_else(has, truncated, pa.scalar(None, pa.bool_()))
    columns["error"] = errors
    table = table.rename_columns([output_name(name, labels) for name in table.column_names])
    for name in schema.names:
        field = schema.field(name)
        table = table.append_column(field, _as_chunked(columns[name]).cast(field.type))
    return table


def _as_chunked(column: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
