"""Texts the model cannot take, text columns of another type than string, and undecodable bytes, handled here once.

A row gets no prediction, and an ``error`` instead, when its text is null or empty (the core's
per-value rule, `sentiment.encoding.text_error`), when its text column is not a text column
(``text must be a string, got int64``; such a column is written as strings), or when its text is
not valid UTF-8 (``text is not valid UTF-8 (byte 0xff at offset 426)``; the row keeps its text
with U+FFFD replacement characters where the bad bytes were). A ``binary`` or ``large_binary``
column is a text column whose bytes are UTF-8 and is written as strings: writers that do not
validate (some Hive and Spark jobs, hand-rolled exporters) put undecodable bytes in ``string``
columns too, and one such value must cost its row, not the job. `text_errors` decides every row's
error, for the stages (`pipelines.stage`) over any Dataset with a text column.

The job's own read (`pipelines.read`) must turn such a column into valid strings at once, with
`as_text`: blocks of every input file share one schema from there on (a repartition may put rows of
two files in one block), and no undecodable byte travels further. The reason goes along in the
`TEXT_ERROR` working column, which `text_errors` reads and drops; over any other Dataset,
`text_errors` calls `as_text` itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.columns import TEXT_ERROR
from sentiment.encoding import text_error
from sentiment.errors import InvalidInputError

# Bytes types and the string types with the same layout: `pa.Array.view` turns one into the other without a copy.
_AS_STRING = {pa.binary(): pa.string(), pa.large_binary(): pa.large_string(), pa.binary_view(): pa.string_view()}
_AS_BYTES = {text: raw for raw, text in _AS_STRING.items()}


class CheckedTexts(NamedTuple):
    """A batch's texts, checked: the batch as it is written, its texts and every row's error."""

    batch: pa.Table
    """The batch, its text column as strings and without `TEXT_ERROR`."""
    texts: list[Any]
    errors: list[str | None]
    """Why each row gets no prediction; None for a row the model takes."""


def is_text_type(data_type: pa.DataType) -> bool:
    """Whether a column of this type holds texts (or only nulls), which the model can take: strings, or bytes
    (``binary``, ``large_binary``, ``binary_view``) read as UTF-8."""
    if pa.types.is_dictionary(data_type):
        return is_text_type(data_type.value_type)
    return pa.types.is_null(data_type) or data_type in _AS_STRING or data_type in _AS_BYTES


def as_text(table: pa.Table, text_column: str) -> pa.Table:
    """``table`` with `TEXT_ERROR` appended and its text column as valid strings: each row's reason not to score
    it, where its column holds another type than text or its text is not valid UTF-8; null elsewhere.

    A string column whose values are all valid UTF-8 is kept as it is; bytes become strings (a view, no copy).
    """
    position = table.schema.get_field_index(text_column)
    values = table.column(position)
    if not is_text_type(values.type):
        reason = pa.array([f"text must be a string, got {values.type}"] * table.num_rows, pa.string())
        return table.set_column(position, text_column, _as_strings(values)).append_column(TEXT_ERROR, reason)
    texts, reasons = _decoded(values)
    return table.set_column(position, text_column, texts).append_column(TEXT_ERROR, reasons)


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


def utf8_error(value: bytes) -> str | None:
    """Why ``value`` is no text (``text is not valid UTF-8 (byte 0xff at offset 426)``: the first bad byte, and
    its offset in the value); None when it is valid UTF-8."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"text is not valid UTF-8 (byte 0x{value[exc.start]:02x} at offset {exc.start})"
    return None


def _decoded(values: pa.ChunkedArray) -> tuple[pa.ChunkedArray | pa.Array, pa.Array]:
    """A text column as valid strings, and each row's `utf8_error` (all null when every value is valid).

    Checked for the whole column first (Arrow's vectorised UTF-8 validation): only a column that fails
    it is decoded value by value. Decoding a bad value to Python is what failed whole jobs before
    (``UnicodeDecodeError`` in ``to_pylist``), so the values are read as bytes.
    """
    valid = pa.nulls(len(values), pa.string())
    if pa.types.is_null(values.type):
        return values, valid
    if pa.types.is_dictionary(values.type):
        if values.type.value_type in _AS_BYTES and _is_valid(values):
            return values, valid
        values = pa.chunked_array([chunk.dictionary_decode() for chunk in values.chunks], values.type.value_type)
    text_type = _AS_STRING.get(values.type, values.type)
    texts = pa.chunked_array([chunk.view(text_type) for chunk in values.chunks], text_type)
    if _is_valid(texts):
        return texts, valid
    raw = pa.chunked_array([chunk.view(_AS_BYTES[text_type]) for chunk in texts.chunks], _AS_BYTES[text_type])
    decoded: list[str | None] = []
    reasons: list[str | None] = []
    for value in raw.to_pylist():
        reasons.append(None if value is None else utf8_error(value))
        # What can be kept of a bad text: its valid characters, U+FFFD for each undecodable byte.
        decoded.append(None if value is None else value.decode("utf-8", errors="replace"))
    return pa.array(decoded, text_type), pa.array(reasons, pa.string())


def _is_valid(values: pa.ChunkedArray) -> bool:
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _as_strings(values: pa.ChunkedArray) -> pa.Array:
    try:
        return pc.cast(values, pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if value is None else str(value) for value in values.to_pylist()], pa.string())
