"""The batch job's Ray Data graph, decided in one place and returned as data: a list of `Stage`.

As ``ray.data.llm``'s processors list their stages, `stages` lists the job's, and `build` applies
them in order with one loop:

- **read** (`pipelines.read.read_slices`): one task per row group holding pending slices; it yields
  each slice as one block, with the slice id (`pipelines.columns.SLICE`), the columns cast to the
  plan's unified types and the text column as strings (`pipelines.texts`); then blocks are cut to
  a slice's size;
- **tokenize** (GPU model actors only): `pipelines.stage.tokenize` in CPU tasks, a slice at a time,
  on the CPUs the GPUs leave idle;
- **model**: `pipelines.stage.ModelStage` actors (one per GPU, or one single-threaded actor per CPU
  core, which tokenizes its own slices), a slice per call: the classifier sorts the slice's windows
  by length and packs them under its token budget, so a bigger slice pads less;
- **select**: the output columns and the slice id, which the write partitions by (`pipelines.staging`).

`scoring_stages` (tokenize, model) take any Dataset with a text column, read by this job or not.
How many model actors run, and with what, is `pipelines.pool`'s decision.

Every stage's callable runs inside one guard (`Stage.apply`, `guard`): what it raises becomes a
`pipelines.errors.StageError` naming the stage, the slices of the batch where it carries their ids
(`SLICE`; the read stage names the slices it was asked for) and the cause, so a failed job says
which stage failed on which rows, for the job and for any other Dataset alike.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.columns import SLICE
from pipelines.errors import StageError
from pipelines.plan import InputPlan
from pipelines.pool import PoolSizes
from pipelines.read import item_slices, read_slices
from pipelines.stage import ModelStage, tokenize
from sentiment.config import ModelConfig

if TYPE_CHECKING:
    from ray.data import Dataset

# Logical CPUs a tokenize task reserves (GPU pools).
TOKENIZE_CPUS = 1.0

Where = Callable[[pa.Table], tuple[Sequence[str], int | None]]
"""What a stage's input batch holds: its slice ids (empty when it carries none) and its rows (None: unknown)."""


def batch_slices(batch: pa.Table) -> tuple[list[str], int | None]:
    """The slice ids in the batch's `SLICE` column (none when it has no such column), and its rows."""
    if SLICE not in batch.column_names:
        return [], batch.num_rows
    return sorted(pc.unique(batch.column(SLICE)).to_pylist()), batch.num_rows


@dataclass(frozen=True)
class Stage:
    """One ``map_batches`` step of the graph: what runs, what it is given, and how Ray Data runs it.

    ``fn`` is a callable class, run by an actor pool and built with ``kwargs`` (its constructor's
    arguments: the model loads once per actor), or a function, run in tasks and called with
    ``kwargs`` beside each batch.
    """

    name: str
    fn: Callable[..., Any]
    kwargs: Mapping[str, Any]
    map_batches_kwargs: Mapping[str, Any]
    rows_per_block: int | None = field(default=None)
    """Cut the stage's output into blocks of this many rows (``Dataset.repartition``); None: as it comes."""
    where: Where = field(default=batch_slices)
    """What a failure names of the batch it failed on (`batch_slices`; the read stage: `read.item_slices`)."""

    def map_batches_args(self) -> dict[str, Any]:
        """Everything ``Dataset.map_batches`` gets besides ``fn``."""
        key = "fn_constructor_kwargs" if isinstance(self.fn, type) else "fn_kwargs"
        return {key: dict(self.kwargs), **self.map_batches_kwargs}

    def apply(self, ds: Dataset) -> Dataset:
        ds = ds.map_batches(guard(self.name, self.fn, self.where), **self.map_batches_args())
        if self.rows_per_block is not None:
            ds = ds.repartition(target_num_rows_per_block=self.rows_per_block)
        return ds


def guard(name: str, fn: Callable[..., Any], where: Where = batch_slices) -> Callable[..., Any]:
    """``fn`` (a callable class or a function) with its exceptions raised as `StageError`s of stage ``name``.

    A class comes back as a subclass of the same name (Ray Data names the operator after it, and
    runs it on actors); a constructor that raises fails the stage "to start". A function comes back
    as a function of the same name, a generator function where it is one.
    """
    if isinstance(fn, type):
        base: Any = fn

        class Guarded(base):
            __doc__ = base.__doc__
            __call__ = _guarded_call(name, base.__call__, where)

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                try:
                    super().__init__(*args, **kwargs)
                except Exception as exc:
                    raise StageError.of(name, exc, starting=True) from exc

        Guarded.__name__ = Guarded.__qualname__ = base.__name__
        return Guarded
    return functools.wraps(fn)(_guarded_call(name, fn, where))


def _guarded_call(name: str, fn: Callable[..., Any], where: Where) -> Callable[..., Any]:
    """``fn(..., batch, ...)`` raising `StageError`; the batch is the first argument that is a table."""
    if inspect.isgeneratorfunction(fn):

        def generating(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _stage_error(name, exc, args, where) from exc

        return generating

    def calling(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _stage_error(name, exc, args, where) from exc

    return calling


def _stage_error(name: str, exc: Exception, args: Sequence[Any], where: Where) -> StageError:
    batch = next((arg for arg in args if isinstance(arg, pa.Table)), None)
    slices: Sequence[str] = ()
    rows: int | None = None
    # Naming the rows is worth less than the error it names them for.
    if batch is not None:
        with contextlib.suppress(Exception):
            slices, rows = where(batch)
    return StageError.of(name, exc, slices, rows)


def stages(args: PipelineArgs, pool: PoolSizes, plan: InputPlan, actor_log: Any = None) -> list[Stage]:
    """The batch job's graph over the Dataset of `pipelines.read.slice_source`: read, (tokenize), model, select.

    With GPU model actors: read, tokenize, model, select; with CPU model actors: read, model, select.
    """
    return [
        read_stage(args, plan),
        *scoring_stages(args.model, args.text_column, pool, args.rows_per_call, actor_log),
        select_stage([*plan.output_columns, SLICE]),
    ]


def build(ds: Dataset, graph: Sequence[Stage]) -> Dataset:
    """``ds`` with the stages of ``graph`` applied, in order."""
    for stage in graph:
        ds = stage.apply(ds)
    return ds


def read_stage(args: PipelineArgs, plan: InputPlan) -> Stage:
    """Read each pending slice of the plan's files as one block (`pipelines.read.read_slices`)."""
    return Stage(
        "read",
        read_slices,
        {
            "filesystem": files.locate(plan.inputs[0].uri).filesystem,
            "schema": plan.read_schema,
            "rows_per_slice": args.rows_per_call,
            "text_column": args.text_column,
        },
        {"batch_size": 1, "batch_format": "pyarrow"},
        # Blocks of one slice's size: Ray Data merges what a read task yields into big blocks, and a
        # big block would go through each stage whole, holding back every row's output until its end
        # (and all of it from a resume). Before any actor stage, so it is not fused into one.
        rows_per_block=args.rows_per_call,
        where=item_slices,
    )


def scoring_stages(
    config: ModelConfig, text_column: str, pool: PoolSizes, rows_per_call: int, actor_log: Any = None
) -> list[Stage]:
    """Tokenize and model stages over a Dataset whose ``text_column`` holds the texts: it comes out with
    the prediction columns after its own (renamed by `pipelines.schema.output_name`), its text column
    as strings (`pipelines.texts`).

    GPU model actors get token windows from tokenize tasks, which keep the host's CPUs tokenizing
    while the GPUs run. CPU model actors tokenize their own slices: there tokenizing and the
    forward passes share the same cores, so a separate stage overlaps nothing and costs a process,
    a task and an Arrow hand-off per slice (tiny model, 2 cores, 40,000 rows: 721 to 757 rows/s
    with the stage, 842 to 938 without).
    """
    model = model_stage(config, text_column, pool, rows_per_call, actor_log)
    if pool.num_gpus == 0:
        return [model]
    tokenizing = Stage(
        "tokenize",
        tokenize,
        {"config": config, "text_column": text_column},
        {
            "batch_size": rows_per_call,
            "batch_format": "pyarrow",
            "num_cpus": TOKENIZE_CPUS,
            "udf_modifying_row_count": False,
        },
    )
    return [tokenizing, model]


def model_stage(
    config: ModelConfig, text_column: str, pool: PoolSizes, rows_per_call: int, actor_log: Any = None
) -> Stage:
    """`ModelStage` on an actor pool of ``pool``'s size, ``rows_per_call`` rows a call."""
    from ray.data import ActorPoolStrategy

    options: dict[str, Any] = {
        "compute": ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        # Blocks hold a slice (see read_stage): a call is one slice, or small slices gathered.
        "batch_size": rows_per_call,
        "batch_format": "pyarrow",
        "num_cpus": pool.num_cpus,
        # One output row per input row: lets Ray Data push limits through the stage.
        "udf_modifying_row_count": False,
    }
    if pool.num_gpus > 0:
        options["num_gpus"] = pool.num_gpus
    return Stage(
        "model",
        ModelStage,
        {
            "config": config.for_gpu_share(pool.num_gpus),
            "actor_log": actor_log,
            # Set in the actor, not through OMP_NUM_THREADS in a runtime_env: a runtime_env needs
            # worker processes of its own, where Ray's already started workers could take the actors.
            "threads": pool.cpu_threads,
            "tokenize": pool.num_gpus == 0,
            "text_column": text_column,
        },
        options,
    )


def select_stage(columns: Sequence[str]) -> Stage:
    """Keep ``columns``, in this order (the text column goes when it is not kept)."""
    return Stage(
        "select",
        select_columns,
        {"columns": list(columns)},
        {"batch_size": None, "batch_format": "pyarrow", "udf_modifying_row_count": False},
    )


def select_columns(batch: pa.Table, *, columns: Sequence[str]) -> pa.Table:
    return batch.select(list(columns))
