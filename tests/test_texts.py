"""`pipelines.texts`: every row's text error decided in one place, and text columns of another type than string."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.columns import TEXT_ERROR
from pipelines.texts import as_text, is_text_type, text_errors
from sentiment.errors import InvalidInputError


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


def test_texts_of_any_string_type_or_only_nulls_are_texts() -> None:
    assert all(
        is_text_type(data_type)
        for data_type in (
            pa.string(),
            pa.large_string(),
            pa.string_view(),
            pa.null(),
            pa.dictionary(pa.int8(), pa.string()),
        )
    )
    assert not any(is_text_type(data_type) for data_type in (pa.int64(), pa.binary(), pa.list_(pa.string())))
    categorical = pa.table({"text": pa.array(["a film", None]).dictionary_encode()})
    assert text_errors(categorical, "text").errors == [None, "text is null"]


def test_a_batch_without_the_text_column_is_refused_naming_it() -> None:
    with pytest.raises(InvalidInputError, match=r"text column 'text' not found; columns are \['review'\]"):
        text_errors(pa.table({"review": ["x"]}), "text")
