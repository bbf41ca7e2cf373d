"""The offline batch job: Parquet in, the shared classifier on a Ray Data actor pool, Parquet out.

``read_parquet`` -> tag each row with its input file -> ``map_batches(SentimentClassifier)`` on an
actor pool -> ``write_parquet``. The model stage is `build_pipeline`; `run` wraps it in what makes
a job safe to run on a real corpus:

- **Checks first.** Every input file's footer is read before Ray starts: a missing file or text
  column, a file that is not Parquet, files whose columns disagree, or an input without rows fail
  the job with the file's and column's names, before any model loads.
- **Staging, then one move.** Results are written under ``OUTPUT.staging`` and moved to ``OUTPUT``
  only when the job has succeeded and every input file's row count matches its output's; a
  mismatch fails the job and leaves the staging directory for inspection.
- **Resume by input file.** Rows carry their input file's index, and the write partitions by it
  (``__source_file=00003/``), so the output of each input file is known. ``--resume`` keeps the
  files whose outputs hold exactly their row count, deletes the others' partial outputs and
  processes only those files. Within one run Ray Data writes each block once (a retried write task
  rewrites the same file name), so a matching count means every row exactly once. Ray Data's own
  row-level checkpointing (``DataContext.checkpoint_config``) needs a unique id column, which a
  review corpus need not have; input files always exist.

The output directory holds ``part-<input index>-<input name>-<n>.parquet`` files with the input
columns (or the ``keep`` subset; a column named like a prediction column is kept as
``input_<name>``) followed by ``label``, ``score``, ``score_<label>`` per label, ``num_tokens``,
``truncated`` and ``error``, plus ``_manifest.json`` (what was read, with which model),
``_report.json`` (what this run did: rows, errors, speed, model, config) and ``_SUCCESS``. Readers
of the directory skip the ``_`` files, as Arrow's dataset readers do.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.files import Location, ParquetInput
from pipelines.schema import output_name, prediction_columns
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError, SentimentError
from sentiment.labels import resolve_labels
from sentiment.loading import load_model_config

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(__name__)

SOURCE_COLUMN = "__source_file"
"""Index of the row's input file; the write partitions by it, and it is not in the output files."""
_TEXT_ERROR = "__text_error"
_TEXT_RAW = "__text_raw"
_PATH_COLUMN = "path"  # what read_parquet(include_paths=True) adds, overwriting a column of that name
RESERVED_COLUMNS = (_PATH_COLUMN, SOURCE_COLUMN, _TEXT_ERROR, _TEXT_RAW)
STAGING_SUFFIX = ".staging"
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


class BatchJobError(SentimentError):
    """The job ran but its result cannot be trusted (rows lost or doubled); nothing was moved into place."""


@dataclass(frozen=True)
class BatchResult:
    """What a finished job did; `summary_line` is the one line ``sentiment batch`` prints."""

    output: str
    rows: int
    """Rows in the output, every input row exactly once."""
    processed_rows: int
    """Rows this run scored (fewer than `rows` when it resumed)."""
    seconds: float
    """Wall time of this run's Ray Data execution, actor start and model load included."""
    tokens: int
    truncated: int
    errors: int
    input_files: int
    skipped_files: int = 0
    """Input files whose outputs an interrupted run had already completed."""
    labels: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    """The run report written as ``_report.json`` (see `run_report`); `summary_line` formats it."""

    @property
    def rows_per_second(self) -> float:
        return self.processed_rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return format_summary(self.report or self.counts())

    def counts(self) -> dict[str, Any]:
        """The numbers of the run report."""
        return {
            "output": self.output,
            "input_rows": self.rows,
            "output_rows": self.rows,
            "processed_rows": self.processed_rows,
            "errors": self.errors,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "rows_per_second": self.rows_per_second,
            "tokens_per_second": self.tokens_per_second,
            "input_files": self.input_files,
            "skipped_files": self.skipped_files,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": self.rows_per_second, "tokens_per_second": self.tokens_per_second}


def format_summary(report: Mapping[str, Any]) -> str:
    """The one line ``sentiment batch`` prints, from a run report (``_report.json``'s contents)."""
    processed = report["processed_rows"]
    if processed == 0:
        return f"nothing to do: {report['output']} is complete with {report['output_rows']} rows"
    scored = processed - report["errors"]
    truncated = report["truncated"] / scored if scored else 0.0
    line = (
        f"{processed} rows in {report['seconds']:.1f} s: {report['rows_per_second']:.1f} rows/s, "
        f"{report['tokens_per_second']:.0f} tokens/s, {truncated:.1%} truncated, {report['errors']} rows with errors"
    )
    if report["skipped_files"]:
        line += f"; resumed: {report['skipped_files']} of {report['input_files']} input files were already complete"
    return line + f"; {report['output_rows']} rows in {report['output']}"


def run_report(
    result: BatchResult,
    args: PipelineArgs,
    started_at: str,
    finished_at: str,
    resolved: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run did and with what: `BatchResult.counts`, the model, the config, Ray's version, timestamps.

    Rates count this run's rows (fewer than the output's when it resumed) over the wall time of its
    Ray Data execution, actor start and model load included. ``model.device`` and ``model.dtype``
    are as configured; ``resolved`` says what they became: ``num_gpus_per_actor`` and ``actors``, one
    entry per model actor with the device, dtype, memory cap and torch threads it runs with.
    """
    import ray

    model = args.model
    resolved = resolved or {}
    return {
        "format": 1,
        **result.counts(),
        "model": {
            "model_id": model.model_id,
            "revision": model.revision,
            "labels": list(result.labels),
            "dtype": model.dtype,
            "device": model.device,
            "num_gpus_per_actor": resolved.get("num_gpus_per_actor"),
        },
        "actors": list(resolved.get("actors", [])),
        # PipelineArgs holds no secrets; mode="json" makes every value JSON-ready.
        "config": args.model_dump(mode="json"),
        "ray_version": ray.__version__,
        "started_at": started_at,
        "finished_at": finished_at,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class InputPlan:
    """The checked inputs: files, the columns to read and write, and the model's labels."""

    inputs: list[ParquetInput]
    kept: list[str]
    """Input columns written to the output, in order."""
    read_columns: list[str]
    """Input columns read: the kept ones and the text column."""
    labels: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.inputs)

    @property
    def output_columns(self) -> list[str]:
        """Columns of every output file, in order."""
        return [*(output_name(name, self.labels) for name in self.kept), *prediction_columns(self.labels)]


# -- checks before anything runs -------------------------------------------------------------------


def plan_inputs(args: PipelineArgs) -> InputPlan:
    """Find and check the input files; raise `InvalidInputError` naming the file and column at fault.

    Reads footers only. The plan has no labels yet: `with_labels` adds the model's.
    """
    found: list[Location] = []
    for spec in args.inputs:
        found.extend(files.list_parquet(spec))
    filesystems = {type(item.filesystem).__name__ for item in found}
    if len(filesystems) > 1:
        raise InvalidInputError(f"inputs must all be on one filesystem, got {sorted(filesystems)}")
    duplicates = [path for path, count in Counter(item.path for item in found).items() if count > 1]
    if duplicates:
        raise InvalidInputError(f"input names a file more than once: {duplicates[0]}")
    # A directory input that holds the output (data/ and data/scored/) must not read it back.
    output = files.locate(args.output)
    found = [
        item
        for item in found
        if not _is_within(item.path, output.path) and not _is_within(item.path, output.path + STAGING_SUFFIX)
    ]
    if not found:
        raise InvalidInputError(f"input {', '.join(args.inputs)} holds no files besides the output {args.output}")
    inputs = files.read_footers(found)

    text = args.text_column
    for item in inputs:
        names = item.schema.names
        if text not in names:
            raise InvalidInputError(f"input file {item.uri} has no text column {text!r}; its columns are {names}")
        missing = [name for name in args.keep or [] if name not in names]
        if missing:
            raise InvalidInputError(f"input file {item.uri} has no column {missing[0]!r} (from keep); columns: {names}")

    if args.keep is not None:
        kept = list(args.keep)
    else:
        kept = list(inputs[0].schema.names)
        for item in inputs[1:]:
            if set(item.schema.names) != set(kept):
                raise InvalidInputError(
                    f"input file {item.uri} has columns {item.schema.names} but {inputs[0].uri} has {kept}; "
                    "choose the columns to write with keep (--keep)"
                )
    read_columns = kept if text in kept else [*kept, text]
    clashes = [name for name in read_columns if name in RESERVED_COLUMNS]
    if clashes:
        raise InvalidInputError(
            f"input column {clashes[0]!r} clashes with a column the batch job adds while it runs; "
            "leave it out with keep (--keep) or rename it"
        )
    _check_column_types(inputs, [name for name in read_columns if name != text])

    if sum(item.rows for item in inputs) == 0:
        raise InvalidInputError(f"input {', '.join(args.inputs)} has no rows ({len(inputs)} file(s), all empty)")
    return InputPlan(inputs, kept, read_columns)


def with_labels(plan: InputPlan, labels: Sequence[str]) -> InputPlan:
    """The plan with the model's labels, which name the output's score columns."""
    plan = replace(plan, labels=list(labels))
    columns = plan.output_columns
    if len(set(columns)) != len(columns):
        raise InvalidInputError(f"kept columns {plan.kept} and the prediction columns clash: {columns}")
    return plan


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _check_column_types(inputs: Sequence[ParquetInput], columns: Sequence[str]) -> None:
    """Columns must have types Ray Data can put in one block (ints widen, int and string do not mix)."""
    unified: pa.Schema | None = None
    first = inputs[0].uri
    for item in inputs:
        schema = pa.schema([item.schema.field(name) for name in columns if name in item.schema.names])
        try:
            unified = schema if unified is None else pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            raise InvalidInputError(f"input file {item.uri} has column types that differ from {first}: {exc}") from exc


def _is_text_type(data_type: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_string_view(data_type)
        or pa.types.is_null(data_type)
    )


def checkpoint_labels(config: ModelConfig) -> list[str]:
    """The model's label names, from its config.json alone (no weights), so a bad ``--model`` fails early."""
    model_config = load_model_config(config)
    return resolve_labels(model_config.id2label, model_config.num_labels, config.labels)


# -- the Ray Data pipeline -------------------------------------------------------------------------


def map_batches_options(args: PipelineArgs, num_gpus: float, actor_log: Any = None) -> dict[str, Any]:
    """The ``map_batches`` arguments of the model stage: `ModelStage`'s constructor kwargs and its actor pool.

    ``num_gpus`` is each actor's GPU share, resolved (`PipelineArgs.actor_gpus`); ``actor_log`` an
    `ActorLog` actor handle that each actor reports to.
    """
    from ray.data import ActorPoolStrategy

    options: dict[str, Any] = {
        "fn_constructor_kwargs": {"config": args.model.for_gpu_share(num_gpus), "actor_log": actor_log},
        "compute": ActorPoolStrategy(min_size=args.min_actors, max_size=args.max_actors),
        "batch_size": args.batch_size,
        "batch_format": "pyarrow",
        "num_cpus": args.num_cpus,
        # One output row per input row: lets Ray Data push limits through the stage.
        "udf_modifying_row_count": False,
    }
    if num_gpus > 0:
        options["num_gpus"] = num_gpus
    if args.cpu_threads is not None:
        # torch takes its thread count from OMP_NUM_THREADS at import; Ray would set it to num_cpus.
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(args.cpu_threads)}}
    return options


def tokenize_options(args: PipelineArgs, tokenize_actors: int) -> dict[str, Any]:
    """The ``map_batches`` arguments of the tokenize stage: CPU actors, each holding a tokenizer."""
    from ray.data import ActorPoolStrategy

    return {
        "fn_constructor_kwargs": {"config": args.model},
        "compute": ActorPoolStrategy(min_size=1, max_size=tokenize_actors),
        "batch_size": args.batch_size,
        "batch_format": "pyarrow",
        "num_cpus": 1,
        "udf_modifying_row_count": False,
    }


def build_pipeline(
    ds: Dataset, args: PipelineArgs, num_gpus: float = 0.0, actor_log: Any = None, tokenize_actors: int = 1
) -> Dataset:
    """The two stages on ``ds`` (which holds ``args.model.text_column``): ``ds`` plus the prediction columns.

    `TokenizeStage` actors turn texts into token windows on CPUs; `ModelStage` actors, each holding the
    shared classifier on the device Ray reserved for it, run the forward passes.
    """
    from pipelines.stage import ModelStage, TokenizeStage

    tokenized = ds.map_batches(TokenizeStage, **tokenize_options(args, tokenize_actors))
    return tokenized.map_batches(ModelStage, **map_batches_options(args, num_gpus, actor_log))


def _tag_rows(
    batch: pa.Table, sources: Mapping[str, str], text_column: str, text_error: str | None, mark_texts: bool
) -> pa.Table:
    """Replace read_parquet's ``path`` by the input file's index; set aside texts that are not strings.

    A text column of another type (int, binary, ...) cannot share a block with string columns, so
    its values are written as strings and its rows get an error instead of predictions.
    """
    paths = batch.column(_PATH_COLUMN)
    known = pa.array(list(sources), pa.string())
    positions = pc.index_in(paths, value_set=known)
    if positions.null_count:
        unknown = paths.filter(pc.is_null(positions))[0].as_py()
        raise RuntimeError(f"Ray Data read a file that is not among the inputs: {unknown}")
    indices = pa.array(list(sources.values()), pa.string()).take(positions)
    batch = batch.drop_columns([_PATH_COLUMN]).append_column(SOURCE_COLUMN, indices)

    position = batch.schema.get_field_index(text_column)
    texts = batch.column(position)
    if text_error is not None:
        raw = _as_strings(texts)
        batch = batch.set_column(position, text_column, pa.nulls(batch.num_rows, pa.string()))
        batch = batch.append_column(_TEXT_ERROR, pa.array([text_error] * batch.num_rows, pa.string()))
        batch = batch.append_column(_TEXT_RAW, raw)
    else:
        if pa.types.is_null(texts.type):
            batch = batch.set_column(position, text_column, texts.cast(pa.string()))
        if mark_texts:
            batch = batch.append_column(_TEXT_ERROR, pa.nulls(batch.num_rows, pa.string()))
            batch = batch.append_column(_TEXT_RAW, pa.nulls(batch.num_rows, pa.string()))
    return batch


def _as_strings(values: pa.ChunkedArray) -> pa.Array:
    try:
        return pc.cast(values, pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if value is None else str(value) for value in values.to_pylist()], pa.string())


def _restore_texts(batch: pa.Table, text_column: str) -> pa.Table:
    """Put back the set-aside texts and their error, in rows `_tag_rows` set aside."""
    set_aside = pc.is_valid(batch.column(_TEXT_ERROR))
    for name, replacement in ((text_column, _TEXT_RAW), ("error", _TEXT_ERROR)):
        position = batch.schema.get_field_index(name)
        merged = pc.if_else(set_aside, batch.column(replacement), batch.column(position))
        batch = batch.set_column(position, name, merged)
    return batch.drop_columns([_TEXT_ERROR, _TEXT_RAW])


def _scored_dataset(
    args: PipelineArgs, plan: InputPlan, pending: Sequence[ParquetInput], num_gpus: float, actor_log: Any
) -> Dataset:
    """read -> tag -> model -> select, over the pending input files."""
    import ray

    text = args.text_column
    groups: dict[str, list[ParquetInput]] = {}
    for item in pending:
        data_type = item.schema.field(text).type
        groups.setdefault("string" if _is_text_type(data_type) else str(data_type), []).append(item)
    mark_texts = any(key != "string" for key in groups)

    parts = []
    filesystem = files.locate(plan.inputs[0].uri).filesystem
    for key, members in groups.items():
        part = ray.data.read_parquet(
            [item.path for item in members],
            filesystem=filesystem,
            include_paths=True,
            # Columns come from the files only; hive-style directory names are not parsed into columns.
            partitioning=None,
            file_extensions=None,
        ).select_columns([*plan.read_columns, _PATH_COLUMN])
        # One model call per block. A whole small file is one block, and a big block would keep one
        # actor busy while others idle, and hold back all its output rows until it is done. Placed
        # before any map so Ray Data does not fuse it into the model stage's actor tasks.
        part = part.repartition(target_num_rows_per_block=args.batch_size)
        tag = partial(
            _tag_rows,
            sources={item.path: f"{item.index:05d}" for item in members},
            text_column=text,
            text_error=None if key == "string" else f"text must be a string, got {key}",
            mark_texts=mark_texts,
        )
        part = part.map_batches(
            tag,
            batch_format="pyarrow",
            batch_size=None,
            udf_modifying_row_count=False,
        )
        parts.append(part)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    ds = build_pipeline(ds, args, num_gpus, actor_log)
    if mark_texts:
        ds = ds.map_batches(
            partial(_restore_texts, text_column=output_name(text, plan.labels)),
            batch_format="pyarrow",
            batch_size=None,
            udf_modifying_row_count=False,
        )
    return ds.select_columns([*plan.output_columns, SOURCE_COLUMN])


# -- output, staging and resume --------------------------------------------------------------------


def _manifest(args: PipelineArgs, plan: InputPlan) -> dict[str, Any]:
    model = args.model.model_dump()
    return {
        "format": 1,
        "model": {name: model[name] for name in _PREDICTION_FIELDS},
        "text_column": args.text_column,
        "columns": plan.output_columns,
        "inputs": [
            {"index": item.index, "uri": item.uri, "rows": item.rows, "bytes": item.size} for item in plan.inputs
        ],
    }


def _part_prefix(item: ParquetInput) -> str:
    stem = Path(item.path).name.split(".")[0]
    return f"part-{item.index:05d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)[:48] or 'input'}"


def _partition(staging: Location, index: int) -> Location:
    return staging.child(f"{SOURCE_COLUMN}={index:05d}")


_STAGED = re.compile(rf"^(?:{SOURCE_COLUMN}=(\d+)/[^/]+|part-(\d+)-[^/]*\.parquet)$")


def _staged_outputs(staging: Location) -> dict[int, list[Location]]:
    """Files in staging per input index: in Ray's partition directories, or already renamed to parts."""
    outputs: dict[int, list[Location]] = {}
    for entry in files.list_files(staging):
        match = _STAGED.match(entry.path[len(staging.path) :].lstrip("/"))
        if match:
            outputs.setdefault(int(match.group(1) or match.group(2)), []).append(entry)
    return outputs


def _complete_rows(outputs: Sequence[Location]) -> int | None:
    """Rows in these files, or None if one of them is unreadable (cut short by a crash)."""
    total = 0
    for output in outputs:
        rows = files.parquet_rows(output)
        if rows is None:
            return None
        total += rows
    return total


def _check_output_location(args: PipelineArgs, output: Location, staging: Location) -> bool:
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


def _check_manifest(location: Location, expected: dict[str, Any], what: str) -> None:
    try:
        found = json.loads(files.read_text(location))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot resume: {location.uri} is unreadable ({exc}); pass --overwrite") from exc
    for key in expected:
        if found.get(key) != expected[key]:
            raise InvalidInputError(
                f"cannot resume {what}: its {key!r} differs from this run's (it was {found.get(key)!r}); "
                "pass --overwrite to start over"
            )


def _commit(staging: Location, output: Location, plan: InputPlan, report: dict[str, Any] | None = None) -> None:
    """Rename partitions to flat part files, check every input's row count, then move staging to output.

    ``report``, with the output's counted rows, goes into staging as `REPORT` after the check, so
    it moves into place with the results it describes.
    """
    staged = _staged_outputs(staging)
    for item in plan.inputs:
        partition = _partition(staging, item.index)
        entries = staged.get(item.index, [])
        fresh = [entry for entry in entries if _is_within(entry.path, partition.path)]
        if not fresh:
            continue
        # Parts renamed by an earlier, interrupted commit keep their numbers.
        done = len(entries) - len(fresh)
        for number, entry in enumerate(fresh, start=done):
            files.move(entry, staging.child(f"{_part_prefix(item)}-{number:04d}.parquet"))
        files.delete(partition)

    staged = _staged_outputs(staging)
    mismatches = []
    output_rows = 0
    for item in plan.inputs:
        rows = _complete_rows(staged.get(item.index, []))
        output_rows += rows or 0
        if rows != item.rows:
            mismatches.append(f"{item.uri}: {item.rows} rows in, {'unreadable' if rows is None else rows} out")
    if mismatches:
        raise BatchJobError(
            f"output rows differ from input rows for {len(mismatches)} input file(s); nothing was moved to "
            f"{output.uri}, the results stay in {staging.uri}:\n" + "\n".join(mismatches[:20])
        )
    parts = sum(len(entries) for entries in staged.values())
    if report is not None:
        files.write_text(staging.child(REPORT), json.dumps({**report, "output_rows": output_rows}, indent=2) + "\n")
    files.write_text(staging.child(SUCCESS), json.dumps({"rows": plan.rows, "files": parts}) + "\n")
    if files.exists(output):
        files.delete(output)
    files.move(staging, output)


def _run_stats(outputs: Sequence[Location]) -> tuple[int, int, int]:
    """Tokens, truncated rows and rows with errors in these output files."""
    tokens = truncated = errors = 0
    for output in outputs:
        with output.filesystem.open_input_file(output.path) as handle:
            table = pq.read_table(handle, columns=["num_tokens", "truncated", "error"])
        tokens += int(pc.sum(table.column("num_tokens")).as_py() or 0)
        truncated += int(pc.sum(table.column("truncated").cast(pa.int64())).as_py() or 0)
        errors += len(table) - table.column("error").null_count
    return tokens, truncated, errors


def run(args: PipelineArgs) -> BatchResult:
    """Run the batch job: check inputs and output, score pending input files on Ray, commit the output.

    Uses the Ray this process is connected to, else ``ray.init()`` (a local Ray, or the cluster
    named by ``RAY_ADDRESS``).
    """
    output = files.locate(args.output)
    if output.path.strip("/") == "" or (output.scheme and "/" not in output.path.strip("/")):
        raise InvalidInputError(f"output {args.output} must be a directory below a bucket or filesystem root")
    staging = output.sibling(STAGING_SUFFIX)

    # Inputs and output first, then the model's config (no weights): bad input fails before anything loads.
    started_at = _now()
    plan = plan_inputs(args)
    resuming = _check_output_location(args, output, staging)
    plan = with_labels(plan, checkpoint_labels(args.model))
    manifest = _manifest(args, plan)

    if args.resume and not resuming and files.exists(output.child(SUCCESS)):
        _check_manifest(output.child(MANIFEST), manifest, f"into {output.uri}")
        rows = _complete_rows([entry for entry in files.list_files(output) if entry.path.endswith(".parquet")])
        if rows != plan.rows:
            raise BatchJobError(f"output {output.uri} holds {rows} rows but the inputs hold {plan.rows}")
        logger.info("output %s is already complete; nothing to do", output.uri)
        done = BatchResult(args.output, plan.rows, 0, 0.0, 0, 0, 0, len(plan.inputs), len(plan.inputs), plan.labels)
        # The output keeps the report of the run that wrote it.
        return replace(done, report=run_report(done, args, started_at, _now()))

    if resuming and not files.exists(staging.child(MANIFEST)):
        # Interrupted before its manifest was written, so before anything else was: start afresh.
        resuming = False
    if resuming:
        _check_manifest(staging.child(MANIFEST), manifest, f"the interrupted run in {staging.uri}")
        staged = _staged_outputs(staging)
        pending = []
        for item in plan.inputs:
            if _complete_rows(staged.get(item.index, [])) != item.rows:
                for entry in staged.get(item.index, []):
                    files.delete(entry)
                pending.append(item)
    else:
        files.delete(staging)
        staging.filesystem.create_dir(staging.path, recursive=True)
        files.write_text(staging.child(MANIFEST), json.dumps(manifest, indent=2) + "\n")
        pending = list(plan.inputs)
    pending = [item for item in pending if item.rows > 0]

    seconds = 0.0
    resolved: dict[str, Any] = {}
    if pending:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pipelines.stage import ActorLog

        if not ray.is_initialized():
            ray.init()
        num_gpus = args.actor_gpus(ray.cluster_resources().get("GPU", 0.0))
        # On the driver's node: a worker node lost mid-job must not take the log with it (the
        # actors that replace its model actors report to it too).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor_log: Any = ray.remote(ActorLog).options(num_cpus=0, scheduling_strategy=here).remote()
        logger.info("model actors: %s GPU each (num_gpus %s)", num_gpus, args.num_gpus)
        started = time.perf_counter()
        try:
            _scored_dataset(args, plan, pending, num_gpus, actor_log).write_parquet(
                staging.path,
                filesystem=staging.filesystem,
                partition_cols=[SOURCE_COLUMN],
                min_bytes_per_file=args.output_file_bytes,
            )
            seconds = time.perf_counter() - started
            resolved = {"num_gpus_per_actor": num_gpus, "actors": ray.get(actor_log.entries.remote())}
        finally:
            ray.kill(actor_log)
    staged = _staged_outputs(staging)
    tokens, truncated, errors = _run_stats([entry for item in pending for entry in staged.get(item.index, [])])
    result = BatchResult(
        output=args.output,
        rows=plan.rows,
        processed_rows=sum(item.rows for item in pending),
        seconds=seconds,
        tokens=tokens,
        truncated=truncated,
        errors=errors,
        input_files=len(plan.inputs),
        skipped_files=len(plan.inputs) - len(pending) if resuming else 0,
        labels=plan.labels,
    )
    report = run_report(result, args, started_at, _now(), resolved)
    _commit(staging, output, plan, report)
    return replace(result, report=report)
