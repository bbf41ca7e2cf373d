"""Texts the model cannot take, and text columns of another type than string, handled here once.

A row gets no prediction, and an ``error`` instead, when its text is null or empty (the core's
per-value rule, `sentiment.encoding.text_error`) or when its text column is not a string column
(``text must be a string, got int64``); such a column is written as strings. `text_errors` decides
every row's error, for the stages (`pipelines.stage`) over any Dataset with a text column.

The job's own read (`pipelines.read`) must turn such a column into strings at once, with `as_text`:
blocks of every input file share one schema from there on (a repartition may put rows of two files
in one block). The reason goes along in the `TEXT_ERROR` working column, which `text_errors` reads
and drops.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.columns import TEXT_ERROR
from sentiment.encoding import text_error
from sentiment.errors import InvalidInputError


class CheckedTexts(NamedTuple):
    """A batch's texts, checked: the batch as it is written, its texts and every row's error."""

    batch: pa.Table
    """The batch, its text column as strings and without `TEXT_ERROR`."""
    texts: list[Any]
    errors: list[str | None]
    """Why each row gets no prediction; None for a row the model takes."""


def is_text_type(data_type: pa.DataType) -> bool:
    """Whether a column of this type holds texts (or only nulls), which the model can take."""
    if pa.types.is_dictionary(data_type):
        return is_text_type(data_type.value_type)
    return bool(
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
        or pa.types.is_null(data_type)
    )


def as_text(table: pa.Table, text_column: str) -> pa.Table:
    """``table`` with `TEXT_ERROR` appended: where the text column holds another type than string, the
    column as strings and every row's error; else the column as it is and null errors."""
    position = table.schema.get_field_index(text_column)
    values = table.column(position)
    if is_text_type(values.type):
        return table.append_column(TEXT_ERROR, pa.nulls(table.num_rows, pa.string()))
    reason = pa.array([f"text must be a string, got {values.type}"] * table.num_rows, pa.string())
    return table.set_column(position, text_column, _as_strings(values)).append_column(TEXT_ERROR, reason)


def text_errors(batch: pa.Table, text_column: str) -> CheckedTexts:
    """Every row's error, decided here once: the reason `as_text` gave, else the core's `text_error`.

    Raises `InvalidInputError` naming the columns when ``batch`` has no ``text_column``.
    """
    if text_column not in batch.column_names:
        raise InvalidInputError(f"text column {text_column!r} not found; columns are {batch.column_names}")
    if TEXT_ERROR not in batch.column_names:
        batch = as_text(batch, text_column)
    reasons = batch.column(TEXT_ERROR).to_pylist()
    texts = batch.column(text_column).to_pylist()
    errors = [reason or text_error(text) for reason, text in zip(reasons, texts, strict=True)]
    return CheckedTexts(batch.drop_columns([TEXT_ERROR]), texts, errors)


def _as_strings(values: pa.ChunkedArray) -> pa.Array:
    try:
        return pc.cast(values, pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if value is None else str(value) for value in values.to_pylist()], pa.string())
