"""Staging, commit and resume: every input row exactly once in the output, or nothing moved.

Results are written under ``OUTPUT.staging``, one partition directory per slice
(``__slice=00003-00012/``), and moved to ``OUTPUT`` only when the job has succeeded and every
slice's output holds exactly its row count; a mismatch fails the job and leaves the staging
directory for inspection. ``--resume`` keeps the slices whose outputs are complete, deletes the
others' partial outputs and scores only those, so a crash costs the slices in flight, not whole
input files. Within one run Ray Data writes each block once (a retried write task rewrites the same
file name), so a matching count means every row exactly once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.files import Location, ParquetInput
from pipelines.plan import SLICE_COLUMN, InputPlan, Slice, is_within
from sentiment.errors import InvalidInputError, SentimentError

MANIFEST = "_manifest.json"
REPORT = "_report.json"
SUCCESS = "_SUCCESS"
# ModelConfig fields that change predictions: a resumed run must not mix outputs that differ in them.
_PREDICTION_FIELDS = (
    "model_id",
    "revision",
    "labels",
    "dtype",
    "max_length",
    "long_text",
    "head_tokens",
    "chunk_stride",
)
# A partition Ray Data wrote, or a part file an earlier (interrupted) commit renamed it to.
_STAGED = re.compile(rf"^(?:{SLICE_COLUMN}=(\d+-\d+)/[^/]+|part-(\d+)-(\d+)-[^/]*\.parquet)$")


class BatchJobError(SentimentError):
    """The job ran but its result cannot be trusted (rows lost or doubled); nothing was moved into place."""


def manifest(args: PipelineArgs, plan: InputPlan) -> dict[str, Any]:
    """What a run reads and with what model; a resumed run must match it."""
    model = args.model.model_dump()
    return {
        "format": 2,
        "model": {name: model[name] for name in _PREDICTION_FIELDS},
        "text_column": args.text_column,
        "columns": plan.output_columns,
        # The slices are cut by rows_per_call: a resumed run must cut them the same way.
        "rows_per_call": args.rows_per_call,
        "inputs": [
            {"index": item.index, "uri": item.uri, "rows": item.rows, "bytes": item.size} for item in plan.inputs
        ],
    }


def part_name(item: ParquetInput, piece: Slice, number: int) -> str:
    """``part-<file index>-<slice number>-<input name>[-n].parquet``: the slice's output file."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(item.path).name.split(".")[0])[:48] or "input"
    suffix = f"-{number}" if number else ""
    return f"part-{item.index:05d}-{piece.number:05d}-{stem}{suffix}.parquet"


def _partition(staging: Location, piece: Slice) -> Location:
    return staging.child(f"{SLICE_COLUMN}={piece.id}")


def staged_outputs(staging: Location) -> dict[str, list[Location]]:
    """Files in staging per slice id: in Ray's partition directories, or already renamed to parts."""
    outputs: dict[str, list[Location]] = {}
    for entry in files.list_files(staging):
        match = _STAGED.match(entry.path[len(staging.path) :].lstrip("/"))
        if match:
            key = match.group(1) or f"{match.group(2)}-{match.group(3)}"
            outputs.setdefault(key, []).append(entry)
    return outputs


def complete_rows(outputs: Sequence[Location]) -> int | None:
    """Rows in these files, or None if one of them is unreadable (cut short by a crash)."""
    total = 0
    for output in outputs:
        rows = files.parquet_rows(output)
        if rows is None:
            return None
        total += rows
    return total


def pending_slices(staging: Location, plan: InputPlan) -> list[Slice]:
    """Slices whose staged output is not complete; their partial outputs are deleted."""
    staged = staged_outputs(staging)
    pending = []
    for piece in plan.slices:
        if complete_rows(staged.get(piece.id, [])) != piece.rows:
            for entry in staged.get(piece.id, []):
                files.delete(entry)
            pending.append(piece)
    return pending


def check_output_location(args: PipelineArgs, output: Location, staging: Location) -> bool:
    """Refuse to clobber results; return whether an interrupted run's staging directory is to be resumed."""
    if output.filesystem.get_file_info(output.path).type == pafs.FileType.File:
        raise InvalidInputError(f"output {output.uri} is a file; give a directory")
    holds_results = bool(files.list_files(output))
    has_staging = files.exists(staging)
    if args.overwrite:
        return False
    if args.resume:
        if not has_staging and holds_results and not files.exists(output.child(SUCCESS)):
            raise InvalidInputError(
                f"output {output.uri} holds files but no {SUCCESS} marker and there is no {staging.uri} "
                "to resume; pass --overwrite to replace it"
            )
        return has_staging
    if holds_results:
        raise InvalidInputError(
            f"output {output.uri} already holds results; pass --overwrite to replace them "
            "or --resume to continue an interrupted run"
        )
    if has_staging:
        raise InvalidInputError(
            f"{staging.uri} holds the partial output of an interrupted run; pass --resume to continue it "
            "or --overwrite to start over"
        )
    return False


def check_manifest(location: Location, expected: dict[str, Any], what: str, ignore: Sequence[str] = ()) -> None:
    """Refuse to resume a run whose manifest differs from this one's (but for the ``ignore`` keys)."""
    try:
        found = json.loads(files.read_text(location))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot resume: {location.uri} is unreadable ({exc}); pass --overwrite") from exc
    for key in expected:
        if key not in ignore and found.get(key) != expected[key]:
            hint = f"pass --rows-per-call {found.get(key)} or" if key == "rows_per_call" else "pass"
            raise InvalidInputError(
                f"cannot resume {what}: its {key!r} differs from this run's (it was {found.get(key)!r}); "
                f"{hint} --overwrite to start over"
            )


def commit(staging: Location, output: Location, plan: InputPlan, report: dict[str, Any] | None = None) -> None:
    """Rename partitions to flat part files, check every input's row count, then move staging to output.

    ``report``, with the output's counted rows, goes into staging as `REPORT` after the check, so
    it moves into place with the results it describes.
    """
    inputs = {item.index: item for item in plan.inputs}
    staged = staged_outputs(staging)
    for piece in plan.slices:
        partition = _partition(staging, piece)
        entries = staged.get(piece.id, [])
        fresh = [entry for entry in entries if is_within(entry.path, partition.path)]
        if not fresh:
            continue
        # Parts renamed by an earlier, interrupted commit keep their numbers.
        done = len(entries) - len(fresh)
        for number, entry in enumerate(fresh, start=done):
            files.move(entry, staging.child(part_name(inputs[piece.file], piece, number)))
        files.delete(partition)

    staged = staged_outputs(staging)
    counted: dict[int, int | None] = {item.index: 0 for item in plan.inputs}
    for piece in plan.slices:
        rows = complete_rows(staged.get(piece.id, []))
        previous = counted[piece.file]
        counted[piece.file] = None if rows is None or previous is None else previous + rows
    mismatches = [
        f"{item.uri}: {item.rows} rows in, {'unreadable' if counted[item.index] is None else counted[item.index]} out"
        for item in plan.inputs
        if counted[item.index] != item.rows
    ]
    if mismatches:
        raise BatchJobError(
            f"output rows differ from input rows for {len(mismatches)} input file(s); nothing was moved to "
            f"{output.uri}, the results stay in {staging.uri}:\n" + "\n".join(mismatches[:20])
        )
    output_rows = sum(rows or 0 for rows in counted.values())
    parts = sum(len(entries) for entries in staged.values())
    if report is not None:
        files.write_text(staging.child(REPORT), json.dumps({**report, "output_rows": output_rows}, indent=2) + "\n")
    files.write_text(staging.child(SUCCESS), json.dumps({"rows": plan.rows, "files": parts}) + "\n")
    if files.exists(output):
        files.delete(output)
    files.move(staging, output)


def run_stats(outputs: Sequence[Location]) -> tuple[int, int, int]:
    """Tokens, truncated rows and rows with errors in these output files."""
    tokens = truncated = errors = 0
    for output in outputs:
        with output.filesystem.open_input_file(output.path) as handle:
            table = pq.read_table(handle, columns=["num_tokens", "truncated", "error"])
        tokens += int(pc.sum(table.column("num_tokens")).as_py() or 0)
        truncated += int(pc.sum(table.column("truncated").cast(pa.int64())).as_py() or 0)
        errors += len(table) - table.column("error").null_count
    return tokens, truncated, errors
