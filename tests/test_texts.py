"""`pipelines.texts`: every row's text error decided in one place, and text columns of another type than string."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.columns import TEXT_ERROR
from pipelines.texts import as_text, is_text_type, text_errors, utf8_error
from sentiment.errors import InvalidInputError
from tests.helpers import invalid_utf8_strings


def test_string_texts_get_the_cores_per_value_rule() -> None:
    batch = pa.table({"id": [1, 2, 3, 4], "text": pa.array(["a film", None, "", " \n"], pa.large_string())})
    checked = text_errors(batch, "text")
    assert checked.errors == [None, "text is null", "text is empty", "text is empty"]
    assert checked.texts == ["a film", None, "", " \n"]
    assert checked.batch.equals(batch)  # a string column is written as it is


def test_a_column_of_another_type_is_written_as_strings_and_every_row_gets_its_type() -> None:
    batch = pa.table({"id": [1, 2, 3], "text": pa.array([7, None, -1], pa.int64())})
    checked = text_errors(batch, "text")
    assert checked.errors == ["text must be a string, got int64"] * 3
    assert checked.batch.column_names == ["id", "text"]
    assert checked.batch.column("text").type == pa.string()
    assert checked.batch.column("text").to_pylist() == ["7", None, "-1"]
    # Types Arrow cannot cast to strings are written as Python writes them.
    nested = text_errors(pa.table({"text": pa.array([[1, 2], None])}), "text")
    assert nested.errors == ["text must be a string, got list<item: int64>"] * 2
    assert nested.batch.column("text").to_pylist() == ["[1, 2]", None]


def test_the_reads_reason_wins_and_never_leaves_the_stage() -> None:
    # What the read makes of a file whose text column is numeric, met by the stage.
    read = as_text(pa.table({"id": [1, 2], "text": pa.array([7, None], pa.int64())}), "text")
    assert read.column_names == ["id", "text", TEXT_ERROR]
    assert read.column(TEXT_ERROR).to_pylist() == ["text must be a string, got int64"] * 2
    checked = text_errors(read, "text")
    assert checked.errors == ["text must be a string, got int64"] * 2
    assert checked.batch.column_names == ["id", "text"]
    assert checked.batch.column("text").to_pylist() == ["7", None]
    # A string file's rows: null reasons, the core's rule decides.
    fine = as_text(pa.table({"text": ["a film", ""]}), "text")
    assert fine.column(TEXT_ERROR).to_pylist() == [None, None]
    assert text_errors(fine, "text").errors == [None, "text is empty"]


def test_texts_of_any_string_or_bytes_type_or_only_nulls_are_texts() -> None:
    assert all(
        is_text_type(data_type)
        for data_type in (
            pa.string(),
            pa.large_string(),
            pa.string_view(),
            pa.null(),
            pa.dictionary(pa.int8(), pa.string()),
            pa.binary(),
            pa.large_binary(),
            pa.binary_view(),
        )
    )
    assert not any(is_text_type(data_type) for data_type in (pa.int64(), pa.list_(pa.string()), pa.binary(4)))
    categorical = pa.table({"text": pa.array(["a film", None]).dictionary_encode()})
    assert text_errors(categorical, "text").errors == [None, "text is null"]


def test_a_batch_without_the_text_column_is_refused_naming_it() -> None:
    with pytest.raises(InvalidInputError, match=r"text column 'text' not found; columns are \['review'\]"):
        text_errors(pa.table({"review": ["x"]}), "text")


BAD = b"x" * 426 + b"\xff" * 64 + b" a good film"


def test_a_text_that_is_not_valid_utf8_is_a_row_error_and_keeps_what_can_be_decoded() -> None:
    texts = invalid_utf8_strings([b"a good film", BAD, None, b"caf\xc3\xa9", b""])
    with pytest.raises(UnicodeDecodeError):
        texts.to_pylist()  # what failed whole jobs
    batch = pa.table({"id": [1, 2, 3, 4, 5], "text": texts})
    checked = text_errors(batch, "text")
    assert checked.errors == [
        None,
        "text is not valid UTF-8 (byte 0xff at offset 426)",
        "text is null",
        None,
        "text is empty",
    ]
    assert checked.texts == ["a good film", "x" * 426 + "\ufffd" * 64 + " a good film", None, "café", ""]
    assert checked.batch.column_names == ["id", "text"]
    assert checked.batch.column("id").to_pylist() == [1, 2, 3, 4, 5]
    checked.batch.validate(full=True)  # every value decodes from here on


def test_bytes_columns_are_texts_when_they_are_utf8_and_row_errors_where_they_are_not() -> None:
    for data_type in (pa.binary(), pa.large_binary(), pa.binary_view()):
        batch = pa.table({"text": pa.array([b"a good film", b"\xc3(", None], data_type)})
        checked = text_errors(batch, "text")
        assert checked.errors == [None, "text is not valid UTF-8 (byte 0xc3 at offset 0)", "text is null"], data_type
        assert checked.texts == ["a good film", "\ufffd(", None]
        assert checked.batch.column("text").type in (pa.string(), pa.large_string(), pa.string_view())
    # All valid: the bytes become strings without a copy, every row is scored.
    fine = as_text(pa.table({"text": pa.array([b"film", b"caf\xc3\xa9"], pa.large_binary())}), "text")
    assert fine.column("text").type == pa.large_string()
    assert fine.column("text").to_pylist() == ["film", "café"]
    assert fine.column(TEXT_ERROR).to_pylist() == [None, None]
    # Categorical bytes too.
    categorical = pa.table({"text": pa.array([b"ok", b"\xff", b"ok"]).dictionary_encode()})
    assert text_errors(categorical, "text").errors == [None, "text is not valid UTF-8 (byte 0xff at offset 0)", None]


def test_the_reads_utf8_reasons_travel_with_the_rows_and_the_stage_keeps_them() -> None:
    # A slice whose string column has a bad value: the read decides it, the stage reads the reason.
    read = as_text(pa.table({"id": [1, 2], "text": invalid_utf8_strings([b"\xfe", b"fine"])}), "text")
    assert read.column(TEXT_ERROR).to_pylist() == ["text is not valid UTF-8 (byte 0xfe at offset 0)", None]
    assert read.column("text").to_pylist() == ["\ufffd", "fine"]
    assert text_errors(read, "text").errors == ["text is not valid UTF-8 (byte 0xfe at offset 0)", None]


def test_utf8_error_names_the_first_bad_byte_and_its_offset_in_the_value() -> None:
    assert utf8_error("café".encode()) is None
    assert utf8_error(b"ab\xe2\x82") == "text is not valid UTF-8 (byte 0xe2 at offset 2)"  # cut short
    assert utf8_error(b"\xed\xa0\x80") == "text is not valid UTF-8 (byte 0xed at offset 0)"  # a surrogate
