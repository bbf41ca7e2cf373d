"""`pipelines.read`: the job's source, each pending slice of the input Parquet read as one table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.args import PipelineArgs
from pipelines.columns import SLICE, TEXT_ERROR
from pipelines.plan import plan_inputs
from pipelines.read import item_slices, read_slices, slice_items
from sentiment.config import ModelConfig
from tests.helpers import invalid_utf8_strings

ABSENT_MODEL = ModelConfig(model_id="/nonexistent/model")


def test_each_pending_slice_comes_as_one_table_with_its_id_and_the_unified_types(tmp_path: Path) -> None:
    ids = pa.array(range(10), pa.int32())
    pq.write_table(
        pa.table({"id": ids, "text": [f"film {i}" for i in range(10)]}), tmp_path / "a.parquet", row_group_size=6
    )
    pq.write_table(
        pa.table({"id": pa.array([10, 11], pa.int64()), "text": pa.array([7, None])}), tmp_path / "b.parquet"
    )
    plan = plan_inputs(PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path), output="o", rows_per_call=4))
    assert [piece.id for piece in plan.slices] == ["00000-00000", "00000-00001", "00000-00002", "00001-00000"]

    pending = [plan.slices[1], plan.slices[2], plan.slices[3]]
    items = slice_items(plan, pending)
    assert items == [
        {"file": 0, "path": str(tmp_path / "a.parquet"), "row_group": 0, "rows": 6, "first_slice": 0, "slices": [1]},
        {"file": 0, "path": str(tmp_path / "a.parquet"), "row_group": 1, "rows": 4, "first_slice": 2, "slices": [2]},
        {"file": 1, "path": str(tmp_path / "b.parquet"), "row_group": 0, "rows": 2, "first_slice": 0, "slices": [0]},
    ]
    tables = [
        table
        for item in items
        for table in read_slices(
            pa.Table.from_pylist([item]),
            filesystem=pafs.LocalFileSystem(),
            schema=plan.read_schema,
            rows_per_slice=4,
            text_column="text",
        )
    ]
    # The slice that is not pending (rows 0-3) is decoded but never yielded.
    assert [table.to_pydict() for table in tables] == [
        {"id": [4, 5], "text": ["film 4", "film 5"], TEXT_ERROR: [None, None], SLICE: ["00000-00001"] * 2},
        {
            "id": [6, 7, 8, 9],
            "text": ["film 6", "film 7", "film 8", "film 9"],
            TEXT_ERROR: [None] * 4,
            SLICE: ["00000-00002"] * 4,
        },
        {
            "id": [10, 11],
            "text": ["7", None],
            TEXT_ERROR: ["text must be a string, got int64"] * 2,
            SLICE: ["00001-00000"] * 2,
        },
    ]
    # Every block has one schema, whatever its file held: ids widened, texts as strings.
    assert {table.schema for table in tables} == {
        pa.schema([("id", pa.int64()), ("text", pa.string()), (TEXT_ERROR, pa.string()), (SLICE, pa.string())])
    }


def test_undecodable_texts_are_read_as_row_errors_whatever_the_column_holds(tmp_path: Path) -> None:
    # A string column holding unchecked bytes (as some Hive/Spark writers leave it) and a binary text column.
    strings = invalid_utf8_strings([b"a good film", b"x" * 426 + b"\xff" * 64, None])
    pq.write_table(pa.table({"id": [0, 1, 2], "text": strings}), tmp_path / "a.parquet", compression="none")
    raw = pa.array([b"caf\xc3\xa9", b"\xc3("], pa.binary())
    pq.write_table(pa.table({"id": [3, 4], "text": raw}), tmp_path / "b.parquet")
    plan = plan_inputs(PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path), output="o", rows_per_call=4))
    assert plan.read_schema.field("text").type == pa.string()

    items = slice_items(plan, plan.slices)
    tables = [
        table
        for item in items
        for table in read_slices(
            pa.Table.from_pylist([item]),
            filesystem=pafs.LocalFileSystem(),
            schema=plan.read_schema,
            rows_per_slice=4,
            text_column="text",
        )
    ]
    got = pa.concat_tables(tables)
    got.validate(full=True)  # nothing undecodable leaves the read
    assert got.column(TEXT_ERROR).to_pylist() == [
        None,
        "text is not valid UTF-8 (byte 0xff at offset 426)",
        None,
        None,
        "text is not valid UTF-8 (byte 0xc3 at offset 0)",
    ]
    assert got.column("text").to_pylist() == ["a good film", "x" * 426 + "\ufffd" * 64, None, "café", "\ufffd("]


def test_a_read_failure_names_the_slices_it_was_asked_for() -> None:
    items = pa.Table.from_pylist(
        [{"file": 3, "path": "/in/a.parquet", "row_group": 1, "rows": 10, "first_slice": 4, "slices": [5, 6]}]
    )
    assert item_slices(items) == (["00003-00005", "00003-00006"], None)
