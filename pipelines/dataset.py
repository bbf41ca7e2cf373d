"""The Ray Data graph of the batch job: read slices -> tokenize -> model -> output columns.

- **read**: one task per row group holding pending slices; it yields each slice as one block, with
  the slice id (`SLICE_COLUMN`), the columns cast to the plan's unified types, and texts that are
  not strings set aside (a text column of another type cannot share a block with string columns:
  its values are written as strings, and its rows get an error instead of predictions);
- **tokenize**: with GPU model actors, `TokenizeStage` in CPU tasks, a slice at a time, on the CPUs
  the GPUs leave idle; with CPU model actors, inside each actor (see `build_pipeline`);
- **model**: `ModelStage` actors (one per GPU, or one single-threaded actor per CPU core), a slice
  per call: the classifier sorts the slice's windows by length and packs them under its token
  budget, so a bigger slice pads less;
- the set-aside texts are put back, and the write partitions by slice (`pipelines.staging`).

`pool_sizes` decides how many model actors run, with what GPU share and how many threads, from the cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.plan import SLICE_COLUMN, TEXT_ERROR, TEXT_RAW, InputPlan, Slice, is_text_type
from pipelines.schema import output_name

if TYPE_CHECKING:
    from ray.data import Dataset


# Logical CPUs a tokenize task reserves (GPU pools).
TOKENIZE_CPUS = 1.0
# What CPU model actors leave unreserved on their node: the CPU that Ray Data's own tasks (read,
# repartition, restore, write: light beside the model) reserve, so they always find one.
TASK_CPUS = 1.0
# Share of a node's Ray memory that CPU model actors may fill with their model copies.
ACTOR_MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class NodeShape:
    """What one alive node offers Ray: CPUs and memory (bytes; None where unknown)."""

    cpus: float
    memory: float | None = None


@dataclass(frozen=True)
class PoolSizes:
    """How many model actors may run, and with what, as resolved for this cluster."""

    num_gpus: float
    """GPUs per model actor."""
    min_actors: int
    max_actors: int
    cpu_threads: int | None
    """torch threads per model actor; None: Ray's default (its num_cpus, at most the cores)."""
    num_cpus: float
    """Logical CPUs each model actor reserves."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_gpus_per_actor": self.num_gpus,
            "min_actors": self.min_actors,
            "max_actors": self.max_actors,
            "cpu_threads": self.cpu_threads,
            "num_cpus_per_actor": self.num_cpus,
            "reason": self.reason,
        }


def pool_sizes(
    args: PipelineArgs,
    cluster_gpus: float,
    nodes: Sequence[NodeShape],
    launchable_gpus: float = 0,
    calls: int | None = None,
    actor_bytes: float | None = None,
) -> PoolSizes:
    """The model actor pool for ``args`` on a cluster with these GPUs and these nodes.

    Flags (``--actors``, ``--num-gpus``, ``--cpu-threads``, ``--num-cpus``) win; otherwise:

    - with GPUs (now, or ``launchable_gpus`` an autoscaler can add), one model actor per GPU, from 1
      up to every GPU, each reserving one CPU;
    - on CPU-only nodes, one single-threaded model actor per core, each tokenizing its own slices:
      separate processes beat one process's threads on a CPU (measured on 2 cores: BERT-base 1.18x,
      the tiny test model 1.4x). Fewer where the node's memory cannot hold a model copy per core
      (``actor_bytes`` each) or the job makes fewer model ``calls`` (`model_calls`); an actor then
      gets the node's spare cores as threads. Together they reserve what the node has beyond one CPU
      (`TASK_CPUS`), where the reads and writes run.
    """
    gpus = max(cluster_gpus, launchable_gpus)
    num_gpus = args.actor_gpus(gpus)
    if num_gpus > 0:
        fits = max(1, int(gpus / num_gpus))
        min_actors = args.min_actors or 1
        max_actors = args.max_actors or fits
        reason = f"{gpus:g} GPUs in the cluster, {num_gpus:g} per model actor"
        num_cpus = 1.0 if args.num_cpus is None else args.num_cpus
        return PoolSizes(num_gpus, min_actors, max(min_actors, max_actors), args.cpu_threads, num_cpus, reason)

    nodes = list(nodes) or [NodeShape(1)]
    cores = max(1, int(min(node.cpus for node in nodes)))
    if args.max_actors or args.min_actors:
        min_actors = args.min_actors or 1
        max_actors = max(min_actors, args.max_actors or min_actors)
        per_node = math.ceil(max_actors / len(nodes))
        reason = f"--actors {min_actors}-{max_actors}"
    else:
        per_node = max(1, cores // (args.cpu_threads or 1))
        reason = f"no GPU; {len(nodes)} node(s) with {cores} CPUs or more, one model actor per core"
        memories = [node.memory for node in nodes if node.memory]
        if actor_bytes and memories:
            fit = max(1, int(ACTOR_MEMORY_SHARE * min(memories) / actor_bytes))
            if fit < per_node:
                per_node = fit
                reason += f", {fit} per node by memory ({actor_bytes / 2**30:.1f} GiB each)"
        max_actors = per_node * len(nodes)
        if calls is not None and calls < max_actors:
            # More actors than calls would only load the model and wait.
            max_actors = max(1, calls)
            per_node = math.ceil(max_actors / len(nodes))
            reason += f", {max_actors} for {calls} model call(s)"
        min_actors = max_actors
    threads = args.cpu_threads or max(1, cores // per_node)
    # Logical CPUs keep a node's tasks and actors from waiting on each other; threads use its cores.
    shared = round(max(0.0, cores - TASK_CPUS) / per_node, 3)
    num_cpus = shared if args.num_cpus is None else args.num_cpus
    return PoolSizes(0.0, min_actors, max_actors, threads, num_cpus, f"{reason}, {threads} torch thread(s) each")


def model_calls(slice_rows: Sequence[int], rows_per_call: int) -> int:
    """How many calls the model stage gets for slices of these sizes, in order.

    Ray Data gathers blocks for a ``map_batches`` call until they hold ``rows_per_call`` rows, so
    small slices (small files, row groups) share a call.
    """
    calls, gathered = 0, 0
    for rows in slice_rows:
        gathered += rows
        if gathered >= rows_per_call:
            calls, gathered = calls + 1, 0
    return calls + (gathered > 0)


def map_batches_options(args: PipelineArgs, pool: PoolSizes, actor_log: Any = None) -> dict[str, Any]:
    """The ``map_batches`` arguments of the model stage: `ModelStage`'s constructor kwargs and its actor pool."""
    from ray.data import ActorPoolStrategy

    options: dict[str, Any] = {
        "fn_constructor_kwargs": {
            "config": args.model.for_gpu_share(pool.num_gpus),
            "actor_log": actor_log,
            # Set in the actor, not through OMP_NUM_THREADS in a runtime_env: a runtime_env needs
            # worker processes of its own, where Ray's already started workers could take the actors.
            "threads": pool.cpu_threads,
            "tokenize": pool.num_gpus == 0,
            "text_column": args.text_column,
        },
        "compute": ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        # Blocks hold a slice (see scored_dataset): a call is one slice, or small slices gathered.
        "batch_size": args.rows_per_call,
        "batch_format": "pyarrow",
        "num_cpus": pool.num_cpus,
        # One output row per input row: lets Ray Data push limits through the stage.
        "udf_modifying_row_count": False,
    }
    if pool.num_gpus > 0:
        options["num_gpus"] = pool.num_gpus
    return options


def tokenize_options(args: PipelineArgs) -> dict[str, Any]:
    """The ``map_batches`` arguments of the tokenize stage (`pipelines.stage.tokenize`): CPU tasks."""
    return {
        "batch_size": args.rows_per_call,
        "batch_format": "pyarrow",
        "num_cpus": TOKENIZE_CPUS,
        "udf_modifying_row_count": False,
    }


def build_pipeline(ds: Dataset, args: PipelineArgs, pool: PoolSizes, actor_log: Any = None) -> Dataset:
    """The two stages on ``ds`` (which holds ``args.text_column``): ``ds`` plus the prediction columns.

    GPU model actors get token windows from tokenize tasks, which keep the host's CPUs tokenizing
    while the GPUs run. CPU model actors tokenize their own slices: there tokenizing and the
    forward passes share the same cores, so a separate stage overlaps nothing and costs a process,
    a task and an Arrow hand-off per slice (tiny model, 2 cores, 40,000 rows: 721 to 757 rows/s
    with the stage, 842 to 938 without).
    """
    from pipelines.stage import ModelStage, tokenize

    if pool.num_gpus == 0:
        return ds.map_batches(ModelStage, **map_batches_options(args, pool, actor_log))
    tokenized = ds.map_batches(
        partial(tokenize, config=args.model, text_column=args.text_column), **tokenize_options(args)
    )
    return tokenized.map_batches(ModelStage, **map_batches_options(args, pool, actor_log))


def scored_dataset(
    args: PipelineArgs, plan: InputPlan, pending: Sequence[Slice], pool: PoolSizes, actor_log: Any
) -> Dataset:
    """read -> tokenize -> model -> restore -> select, over the pending slices."""
    import ray

    text = args.text_column
    inputs = {item.index: item for item in plan.inputs}
    text_errors = {
        item.index: None
        if is_text_type(item.schema.field(text).type)
        else f"text must be a string, got {item.schema.field(text).type}"
        for item in plan.inputs
    }
    mark_texts = any(error is not None for error in text_errors.values())
    # One read task per row group that holds pending slices.
    first_slice: dict[tuple[int, int], int] = {}
    for piece in plan.slices:
        first_slice.setdefault((piece.file, piece.row_group), piece.number)
    groups: dict[tuple[int, int], list[int]] = {}
    for piece in pending:
        groups.setdefault((piece.file, piece.row_group), []).append(piece.number)
    items = [
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
    read = partial(
        read_slices,
        filesystem=files.locate(plan.inputs[0].uri).filesystem,
        schema=plan.read_schema,
        rows_per_slice=args.rows_per_call,
        text_column=text,
        text_errors=text_errors,
        mark_texts=mark_texts,
    )
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="pyarrow"
    )
    # Blocks of one slice's size: Ray Data merges what a read task yields into big blocks, and a
    # big block would go through each stage whole, holding back every row's output until its end
    # (and all of it from a resume). Before any actor stage, so it is not fused into one.
    ds = ds.repartition(target_num_rows_per_block=args.rows_per_call)
    ds = build_pipeline(ds, args, pool, actor_log)
    if mark_texts:
        ds = ds.map_batches(
            partial(restore_texts, text_column=output_name(text, plan.labels)),
            batch_format="pyarrow",
            batch_size=None,
            udf_modifying_row_count=False,
        )
    return ds.select_columns([*plan.output_columns, SLICE_COLUMN])


def read_slices(
    items: pa.Table,
    *,
    filesystem: Any,
    schema: pa.Schema,
    rows_per_slice: int,
    text_column: str,
    text_errors: Mapping[int, str | None],
    mark_texts: bool,
) -> Iterator[pa.Table]:
    """The pending slices of the row groups in ``items``, each as one table: the read columns and the slice id.

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
                table = _set_aside_texts(table, schema, text_column, text_errors[item["file"]], mark_texts)
                piece = f"{item['file']:05d}-{number:05d}"
                yield table.append_column(SLICE_COLUMN, pa.array([piece] * table.num_rows, pa.string()))


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


def _set_aside_texts(
    table: pa.Table, schema: pa.Schema, text_column: str, text_error: str | None, mark_texts: bool
) -> pa.Table:
    """``table`` cast to ``schema``; texts of another type than string set aside with their error."""
    nulls = pa.nulls(table.num_rows, pa.string())
    raw, errors = nulls, nulls
    if text_error is not None:
        raw = _as_strings(table.column(text_column))
        errors = pa.array([text_error] * table.num_rows, pa.string())
        table = table.set_column(table.schema.get_field_index(text_column), text_column, nulls)
    result = pa.Table.from_arrays([table.column(field.name).cast(field.type) for field in schema], schema=schema)
    if not mark_texts:
        return result
    return result.append_column(TEXT_ERROR, errors).append_column(TEXT_RAW, raw)


def _as_strings(values: pa.ChunkedArray) -> pa.Array:
    try:
        return pc.cast(values, pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if value is None else str(value) for value in values.to_pylist()], pa.string())


def restore_texts(batch: pa.Table, text_column: str) -> pa.Table:
    """Put back the set-aside texts and their error, in rows `read_slices` set aside."""
    set_aside = pc.is_valid(batch.column(TEXT_ERROR))
    for name, replacement in ((text_column, TEXT_RAW), ("error", TEXT_ERROR)):
        position = batch.schema.get_field_index(name)
        merged = pc.if_else(set_aside, batch.column(replacement), batch.column(position))
        batch = batch.set_column(position, name, merged)
    return batch.drop_columns([TEXT_ERROR, TEXT_RAW])
