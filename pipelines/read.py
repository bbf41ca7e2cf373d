"""Reading the pending slices of the input Parquet files: the source of the batch job's Ray Data graph.

`slice_items` lists one item per row group that holds pending slices, `slice_source` makes them a
Dataset (one block, so one read task, each), and the read stage (`read_slices`, listed by
`pipelines.dataset.stages`) yields each pending slice as one table: the plan's read columns cast to
their unified types, the text column as strings (`pipelines.texts.as_text`), and the slice id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.columns import SLICE, TEXT_ERROR
from pipelines.plan import InputPlan, Slice, slice_id
from pipelines.texts import as_text

if TYPE_CHECKING:
    from ray.data import Dataset


def slice_items(plan: InputPlan, pending: Sequence[Slice]) -> list[dict[str, Any]]:
    """One item per row group that holds pending slices: where it is, its rows, its slices' numbers."""
    inputs = {item.index: item for item in plan.inputs}
    first_slice: dict[tuple[int, int], int] = {}
    for piece in plan.slices:
        first_slice.setdefault((piece.file, piece.row_group), piece.number)
    groups: dict[tuple[int, int], list[int]] = {}
    for piece in pending:
        groups.setdefault((piece.file, piece.row_group), []).append(piece.number)
    return [
        {
            "file": file,
            "path": inputs[file].path,
            "row_group": row_group,
            "rows": inputs[file].row_groups[row_group],
            "first_slice": first_slice[(file, row_group)],
            "slices": numbers,
        }
        for (file, row_group), numbers in groups.items()
    ]


def slice_source(plan: InputPlan, pending: Sequence[Slice]) -> Dataset:
    """`slice_items` as a Dataset of one block each: the read stage then runs one task per row group."""
    import ray

    items = slice_items(plan, pending)
    return ray.data.from_items(items, override_num_blocks=len(items))


def item_slices(items: pa.Table) -> tuple[list[str], None]:
    """The ids of the slices `read_slices` is asked to read from ``items`` (what a read failure names)."""
    return [slice_id(item["file"], number) for item in items.to_pylist() for number in item["slices"]], None


def read_slices(
    items: pa.Table, *, filesystem: Any, schema: pa.Schema, rows_per_slice: int, text_column: str
) -> Iterator[pa.Table]:
    """The pending slices of the row groups in ``items``: ``schema``'s columns, `TEXT_ERROR` and `SLICE`.

    A row group is decoded in slice-sized batches, start to end (Parquet has no cheaper way to a
    row in the middle); the slices that are not pending are skipped.
    """
    for item in items.to_pylist():
        pending = set(item["slices"])
        sizes = [min(rows_per_slice, item["rows"] - offset) for offset in range(0, item["rows"], rows_per_slice)]
        with filesystem.open_input_file(item["path"]) as handle:
            batches = pq.ParquetFile(handle).iter_batches(
                batch_size=rows_per_slice, row_groups=[item["row_group"]], columns=schema.names
            )
            for number, table in enumerate(_exact_chunks(batches, sizes), start=item["first_slice"]):
                if number not in pending:
                    continue
                table = as_text(table, text_column)
                piece = slice_id(item["file"], number)
                yield pa.Table.from_arrays(
                    [
                        *(table.column(field.name).cast(field.type) for field in schema),
                        table.column(TEXT_ERROR),
                        pa.array([piece] * table.num_rows, pa.string()),
                    ],
                    names=[*schema.names, TEXT_ERROR, SLICE],
                )


def _exact_chunks(batches: Iterator[pa.RecordBatch], sizes: Sequence[int]) -> Iterator[pa.Table]:
    """Tables of exactly ``sizes`` rows, in order, cut from a stream of record batches."""
    buffer: list[pa.RecordBatch] = []
    buffered = 0
    for size in sizes:
        while buffered < size:
            batch = next(batches)
            buffer.append(batch)
            buffered += batch.num_rows
        table = pa.Table.from_batches(buffer)
        yield table.slice(0, size)
        rest = table.slice(size)
        buffer = rest.to_batches()
        buffered = rest.num_rows
