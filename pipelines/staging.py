"""Staging, commit and resume: every input row exactly once in the output, or nothing moved.

A run's state is one `RunState`: the output, its staging directory ``OUTPUT.staging``, whether the
run starts afresh, resumes an interrupted run or finds the output complete, its manifest and the
slices it has to score. `open_output` decides from what it finds there (refusing to clobber
results), before the model's labels are known; `prepare` checks it against the plan and readies
the staging directory.

Results are written under ``OUTPUT.staging``, one partition directory per slice
(``__slice=00003-00012/``), and `commit` moves them to ``OUTPUT`` only when the job has succeeded
and every slice's output holds exactly its row count; a mismatch fails the job and leaves the
staging directory for inspection. Each output file is moved once, to its final name: on local disk
a rename within staging, then one rename of the whole directory, so readers see all of it or
nothing; on object stores, where a rename is a copy and a delete, straight into ``OUTPUT`` (one
copy per object), ``_SUCCESS`` last. ``--resume`` keeps the slices whose outputs are complete,
deletes the others' partial outputs and scores only those, so a crash costs the slices in flight,
not whole input files. Within one run Ray Data writes each block once (a retried write task
rewrites the same file name), so a matching count means every row exactly once.

A run that fails (a stage that raised, a write that found the disk full, a lost worker) leaves its
staging directory as it is, with the traceback in ``OUTPUT.staging/_error.log`` (`ERROR_LOG`);
``--resume`` then keeps the slices that were complete and scores the rest. A partly written file
never counts as complete: it has no Parquet footer, or, where a full disk still left room for one,
a footer that lists empty column chunks (`files.is_whole`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.columns import SLICE
from pipelines.errors import RunFailedError
from pipelines.files import Location, ParquetInput
from pipelines.plan import STAGING_SUFFIX, InputPlan, Slice, is_within
from sentiment.errors import InvalidInputError

MANIFEST = "_manifest.json"
REPORT = "_report.json"
SUCCESS = "_SUCCESS"
ERROR_LOG = "_error.log"
"""In staging: the traceback of the run that failed last; deleted by the commit of the run that succeeds."""
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
_STAGED = re.compile(rf"^(?:{SLICE}=(\d+-\d+)/[^/]+|part-(\d+)-(\d+)-[^/]*\.parquet)$")


class BatchJobError(RunFailedError):
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
    return staging.child(f"{SLICE}={piece.id}")


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


def complete_slices(staging: Location, plan: InputPlan) -> list[Slice]:
    """Slices whose staged output is complete: every row, in readable files."""
    staged = staged_outputs(staging)
    return [piece for piece in plan.slices if _is_complete(piece, staged)]


def pending_slices(staging: Location, plan: InputPlan) -> list[Slice]:
    """Slices whose staged output is not complete; their partial outputs are deleted."""
    staged = staged_outputs(staging)
    pending = []
    for piece in plan.slices:
        if not _is_complete(piece, staged):
            for entry in staged.get(piece.id, []):
                files.delete(entry)
            pending.append(piece)
    return pending


def _is_complete(piece: Slice, staged: Mapping[str, Sequence[Location]]) -> bool:
    return complete_rows(staged.get(piece.id, [])) == piece.rows


class Start(enum.Enum):
    """How a run begins, from what it finds at its output."""

    FRESH = "fresh"
    """Nothing to continue: the staging directory is made anew, every slice is scored."""
    RESUME = "resume"
    """``--resume`` of an interrupted run: the complete slices in its staging directory are kept."""
    COMPLETE = "complete"
    """``--resume`` of a finished output: nothing to do."""


@dataclass(frozen=True)
class RunState:
    """Where a run writes, what it found there and what it does about it: decided once, before anything is scored."""

    output: Location
    staging: Location
    """``OUTPUT.staging``: where results wait for the commit, and an interrupted run's for a resume."""
    start: Start
    manifest: Mapping[str, Any] = field(default_factory=dict)
    """What this run reads and with what model (`manifest`); set by `prepare`."""
    pending: tuple[Slice, ...] = ()
    """The slices this run scores; set by `prepare`."""

    @property
    def resumed(self) -> bool:
        return self.start is Start.RESUME

    @property
    def complete(self) -> bool:
        return self.start is Start.COMPLETE


def open_output(args: PipelineArgs) -> RunState:
    """The run's output and staging locations and how it starts, from what is there; refuses to clobber results.

    Needs no plan and no model, so a bad output fails before the model's config is read.
    """
    output = files.locate(args.output)
    if output.path.strip("/") == "" or (output.scheme and "/" not in output.path.strip("/")):
        raise InvalidInputError(f"output {args.output} must be a directory below a bucket or filesystem root")
    staging = output.sibling(STAGING_SUFFIX)
    if output.filesystem.get_file_info(output.path).type == pafs.FileType.File:
        raise InvalidInputError(f"output {output.uri} is a file; give a directory")
    holds_results = bool(files.list_files(output))
    has_staging = files.exists(staging)
    if args.overwrite:
        return RunState(output, staging, Start.FRESH)
    if args.resume:
        if has_staging:
            return RunState(output, staging, Start.RESUME)
        if files.exists(output.child(SUCCESS)):
            return RunState(output, staging, Start.COMPLETE)
        if holds_results:
            raise InvalidInputError(
                f"output {output.uri} holds files but no {SUCCESS} marker and there is no {staging.uri} "
                "to resume; pass --overwrite to replace it"
            )
        return RunState(output, staging, Start.FRESH)
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
    return RunState(output, staging, Start.FRESH)


def prepare(state: RunState, expected: Mapping[str, Any], plan: InputPlan) -> RunState:
    """``state`` checked against this run's manifest (``expected``), its staging directory ready, its pending slices.

    A complete output must hold the plan's rows; a resumed run's manifest must match (its incomplete
    slices' partial outputs are deleted); a fresh run gets an empty staging directory with its manifest.
    """
    output, staging = state.output, state.staging
    if state.start is Start.COMPLETE:
        # Complete: how it was sliced no longer matters.
        check_manifest(output.child(MANIFEST), expected, f"into {output.uri}", ignore=("rows_per_call",))
        rows = complete_rows([entry for entry in files.list_files(output) if entry.path.endswith(".parquet")])
        if rows != plan.rows:
            raise BatchJobError(f"output {output.uri} holds {rows} rows but the inputs hold {plan.rows}")
        return replace(state, manifest=expected, pending=())
    if state.start is Start.RESUME and files.exists(staging.child(MANIFEST)):
        check_manifest(staging.child(MANIFEST), expected, f"the interrupted run in {staging.uri}")
        return replace(state, manifest=expected, pending=tuple(pending_slices(staging, plan)))
    # An interrupted run that had not written its manifest had written nothing else either: start afresh.
    files.delete(staging)
    staging.filesystem.create_dir(staging.path, recursive=True)
    files.write_text(staging.child(MANIFEST), _json(expected))
    return replace(state, start=Start.FRESH, manifest=expected, pending=tuple(plan.slices))


def check_manifest(location: Location, expected: Mapping[str, Any], what: str, ignore: Sequence[str] = ()) -> None:
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


def commit(state: RunState, plan: InputPlan, report: Mapping[str, Any] | None = None) -> None:
    """Check every input's row count in staging, then move each staged file once, to its name in the output.

    On local disk a rename is free and a directory moves whole: the files are renamed within staging,
    which then replaces the output with one rename, so readers see all of it or nothing. On object
    stores a rename is a copy and a delete: each file is moved straight into the output, the
    `_SUCCESS` marker written last. ``report``, with the output's counted rows, is written after the
    check, so it lands with the results it describes.
    """
    staging, output = state.staging, state.output
    in_place = files.renames_directories(staging.filesystem)
    files.delete(staging.child(ERROR_LOG))  # an earlier, failed run's: not part of the output
    moves = _output_names(staging, plan)
    if in_place:
        for source, name in moves:
            files.move(source, staging.child(name))
        for partition in sorted({source.path.rsplit("/", 1)[0] for source, _ in moves}):
            files.delete(staging.at(partition))
    output_rows, parts = _checked_rows(state, plan)

    markers = {} if report is None else {REPORT: _json({**report, "output_rows": output_rows})}
    markers[SUCCESS] = json.dumps({"rows": plan.rows, "files": parts}) + "\n"  # last: readers wait for it
    if in_place:
        for name, text in markers.items():
            files.write_text(staging.child(name), text)
        files.delete(output)
        files.move(staging, output)
        return
    files.delete(output)
    output.filesystem.create_dir(output.path, recursive=True)
    for source, name in moves:
        files.move(source, output.child(name))
    # Written anew rather than moved: one copy fewer.
    for name, text in {MANIFEST: _json(state.manifest), **markers}.items():
        files.write_text(output.child(name), text)
    files.delete(staging)


def _checked_rows(state: RunState, plan: InputPlan) -> tuple[int, int]:
    """Rows and files in staging; raises `BatchJobError` naming every input whose rows are not all there once."""
    staged = staged_outputs(state.staging)
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
            f"{state.output.uri}, the results stay in {state.staging.uri}:\n" + "\n".join(mismatches[:20])
        )
    return sum(rows or 0 for rows in counted.values()), sum(len(entries) for entries in staged.values())


def _output_names(staging: Location, plan: InputPlan) -> list[tuple[Location, str]]:
    """Each file Ray Data wrote into a slice's partition directory, and its name in the output (`part_name`).

    Parts renamed by an earlier, interrupted commit keep their names; the new ones are numbered after them.
    """
    inputs = {item.index: item for item in plan.inputs}
    staged = staged_outputs(staging)
    names: list[tuple[Location, str]] = []
    for piece in plan.slices:
        entries = staged.get(piece.id, [])
        fresh = [entry for entry in entries if is_within(entry.path, _partition(staging, piece).path)]
        for number, entry in enumerate(fresh, start=len(entries) - len(fresh)):
            names.append((entry, part_name(inputs[piece.file], piece, number)))
    return names


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


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
