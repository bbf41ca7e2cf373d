"""Planning a batch job before anything runs: which files, which columns, which labels, which slices.

Every input file's footer is read first: a missing file or text column, a file that is not Parquet,
files whose columns disagree, a column named like one the job adds while it runs
(`pipelines.columns`), or an input without rows fail the job with the file's and column's names,
before Ray starts or any model loads (so before the job chooses GPU or CPU model actors). The rows
are then cut into **slices**: at most ``rows_per_call`` rows of one row group each. A slice is read
together, scored in one model call, written as one output file, and is what a resumed run re-does
when a crash cut it short.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.columns import check_input_columns
from pipelines.files import Location, ParquetInput
from pipelines.schema import output_name, prediction_columns
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from sentiment.labels import resolve_labels
from sentiment.loading import load_model_config, parameter_count

STAGING_SUFFIX = ".staging"
# A CPU model actor's process before its weights: Python, torch, transformers, Ray's worker (measured 0.4 GiB).
PROCESS_BYTES = 2**29


@dataclass(frozen=True)
class Slice:
    """At most ``rows_per_call`` consecutive rows of one row group of one input file."""

    file: int
    number: int
    row_group: int
    offset: int
    """First row, within the row group."""
    rows: int

    @property
    def id(self) -> str:
        return slice_id(self.file, self.number)


def slice_id(file: int, number: int) -> str:
    """``<file index>-<slice number>``, both zero-padded: a slice's name in staging and in the `SLICE` column."""
    return f"{file:05d}-{number:05d}"


def plan_slices(inputs: Sequence[ParquetInput], rows_per_slice: int) -> list[Slice]:
    """Every input row in exactly one slice, in file and row order."""
    slices = []
    for item in inputs:
        number = 0
        for row_group, rows in enumerate(item.row_groups):
            for offset in range(0, rows, rows_per_slice):
                slices.append(Slice(item.index, number, row_group, offset, min(rows_per_slice, rows - offset)))
                number += 1
    return slices


@dataclass(frozen=True)
class InputPlan:
    """The checked inputs: files, the columns to read and write, and the model's labels."""

    inputs: list[ParquetInput]
    kept: list[str]
    """Input columns written to the output, in order."""
    read_columns: list[str]
    """Input columns read: the kept ones and the text column."""
    read_schema: pa.Schema
    """Their types, unified over every file (ints widen); the text column as string."""
    slices: list[Slice]
    labels: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.inputs)

    @property
    def output_columns(self) -> list[str]:
        """Columns of every output file, in order."""
        return [*(output_name(name, self.labels) for name in self.kept), *prediction_columns(self.labels)]


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
        if not is_within(item.path, output.path) and not is_within(item.path, output.path + STAGING_SUFFIX)
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
    # Every file holds every read column (checked above); the first file names the clash.
    check_input_columns(read_columns, inputs[0].uri)
    unified = _unified_types(inputs, [name for name in read_columns if name != text])
    read_schema = pa.schema(
        [unified.field(name) if name != text else pa.field(text, pa.string()) for name in read_columns]
    )

    if sum(item.rows for item in inputs) == 0:
        raise InvalidInputError(f"input {', '.join(args.inputs)} has no rows ({len(inputs)} file(s), all empty)")
    return InputPlan(inputs, kept, read_columns, read_schema, plan_slices(inputs, args.rows_per_call))


def with_labels(plan: InputPlan, labels: Sequence[str]) -> InputPlan:
    """The plan with the model's labels, which name the output's score columns."""
    plan = replace(plan, labels=list(labels))
    columns = plan.output_columns
    if len(set(columns)) != len(columns):
        raise InvalidInputError(f"kept columns {plan.kept} and the prediction columns clash: {columns}")
    return plan


def is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _unified_types(inputs: Sequence[ParquetInput], columns: Sequence[str]) -> pa.Schema:
    """The columns' types over every file; they must fit one block (ints widen, int and string do not mix)."""
    unified = pa.schema([])
    first = inputs[0].uri
    for item in inputs:
        schema = pa.schema([item.schema.field(name) for name in columns if name in item.schema.names])
        try:
            unified = pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
            raise InvalidInputError(f"input file {item.uri} has column types that differ from {first}: {exc}") from exc
    return unified


def checkpoint_labels(config: ModelConfig) -> list[str]:
    """The model's label names, from its config.json alone (no weights), so a bad ``--model`` fails early."""
    model_config = load_model_config(config)
    return resolve_labels(model_config.id2label, model_config.num_labels, config.labels)


def actor_bytes(config: ModelConfig) -> float | None:
    """Memory one CPU model actor needs: its model copy, from the checkpoint's config.json, and its process.

    None where the config does not say (not a BERT-shaped encoder): the pool is then not capped by memory.
    """
    parameters = parameter_count(load_model_config(config))
    if parameters is None:
        return None
    return parameters * {"bf16": 2, "fp16": 2, "int8": 1}.get(config.dtype, 4) + PROCESS_BYTES
