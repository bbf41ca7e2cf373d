"""The offline batch job: Parquet in, the shared classifier on Ray Data actors, Parquet out, every row once.

`run` ties the job's parts together, each in its own module:

- `pipelines.plan`: input files checked from their footers (missing file or text column, a file
  that is not Parquet, columns that disagree, a column named like one of the job's working columns
  (`pipelines.columns`), no rows: errors naming the file and column, before Ray starts or any model
  loads), the model's labels from its config alone, and the **slices**;
- `pipelines.staging`: the run's state (`RunState`: output, staging, fresh start, resume or nothing
  to do, the slices to score); results staged per slice under ``OUTPUT.staging``, every input's row
  count checked, then each file moved once into ``OUTPUT``; ``--resume`` re-does only the slices a
  crash cut short;
- `pipelines.pool`: how many model actors run on this cluster, with what;
- `pipelines.dataset`: the Ray Data graph, decided in one function as a list of stages (read the
  slices (`pipelines.read`) -> tokenize -> model (`pipelines.stage`) -> output columns) and built
  by one loop; texts that are not strings are handled in `pipelines.texts`;
- `pipelines.report`: the run report (``_report.json``), the summary line and the progress line;
- `pipelines.errors`: what failed, when a run fails. Bad rows do not fail it (they get their
  ``error``); anything else does, and ends as one `RunFailedError` line: the stage, the input file
  and rows where known, the cause, what staging kept and the command that continues (``--resume``),
  the traceback in ``OUTPUT.staging/_error.log`` (or a temporary file, when that disk is full).

The output directory holds ``part-<input index>-<slice>-<input name>.parquet`` files with the
input columns (or the ``keep`` subset; a column named like a prediction column is kept as
``input_<name>``) followed by the prediction columns (`pipelines.schema`), plus ``_manifest.json``
(what was read, with which model), ``_report.json`` (what this run did) and ``_SUCCESS``. Readers
of the directory skip the ``_`` files, as Arrow's dataset readers do.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.columns import SLICE
from pipelines.dataset import build, stages
from pipelines.errors import RunFailedError, describe_failure
from pipelines.files import Location
from pipelines.plan import InputPlan, actor_bytes, checkpoint_labels, plan_inputs, with_labels
from pipelines.pool import cluster_pool, model_calls
from pipelines.read import slice_source
from pipelines.report import BatchResult, Progress, now, run_report
from pipelines.staging import (
    ERROR_LOG,
    RunState,
    commit,
    complete_slices,
    manifest,
    open_output,
    prepare,
    run_stats,
    staged_outputs,
)
from sentiment.engines import prepare_onnx

logger = logging.getLogger(__name__)


def run(args: PipelineArgs, progress_interval_s: float = 10.0, resume_command: str | None = None) -> BatchResult:
    """Run the batch job: check inputs and output, score pending slices on Ray, commit the output.

    Uses the Ray this process is connected to, else ``ray.init()`` (a local Ray, or the cluster
    named by ``RAY_ADDRESS``). Prints a progress line to stderr every ``progress_interval_s``.

    Raises `InvalidInputError` for input it refuses before scoring, and `RunFailedError` (one line,
    naming ``resume_command`` as what continues the run) when scoring or the commit fails.
    """
    # Inputs and output first, then the model's config (no weights): bad input fails before anything loads.
    started_at = now()
    plan = plan_inputs(args)
    state = open_output(args)
    plan = with_labels(plan, checkpoint_labels(args.model))
    state = prepare(state, manifest(args, plan), plan)

    if state.complete:
        logger.info("output %s is already complete; nothing to do", state.output.uri)
        slices = len(plan.slices)
        done = BatchResult(
            args.output, plan.rows, 0, 0.0, 0, 0, 0, len(plan.inputs), slices, slices, len(plan.inputs), plan.labels
        )
        # The output keeps the report of the run that wrote it.
        return replace(done, report=run_report(done, args, started_at, now()))

    try:
        seconds, resolved = _score(args, plan, state, progress_interval_s) if state.pending else (0.0, {})
    except Exception as exc:
        failed = run_failed(exc, plan, state, resume_command)
        _release(exc)
        raise failed from exc
    staged = staged_outputs(state.staging)
    tokens, truncated, errors = run_stats([entry for piece in state.pending for entry in staged.get(piece.id, [])])
    pending_files = {piece.file for piece in state.pending}
    result = BatchResult(
        output=args.output,
        rows=plan.rows,
        processed_rows=sum(piece.rows for piece in state.pending),
        seconds=seconds,
        tokens=tokens,
        truncated=truncated,
        errors=errors,
        input_files=len(plan.inputs),
        slices=len(plan.slices),
        skipped_slices=len(plan.slices) - len(state.pending) if state.resumed else 0,
        skipped_files=len(plan.inputs) - len(pending_files) if state.resumed else 0,
        labels=plan.labels,
    )
    report = run_report(result, args, started_at, now(), resolved)
    try:
        commit(state, plan, report)
    except OSError as exc:
        raise run_failed(exc, plan, state, resume_command, stage="commit") from exc
    return replace(result, report=report)


def run_failed(
    exc: BaseException, plan: InputPlan, state: RunState, resume_command: str | None = None, stage: str | None = None
) -> RunFailedError:
    """The one line a failed run ends with; the traceback goes to the staging directory's `ERROR_LOG`.

    ``stage 'model' failed on in/a.parquet rows 64-95: ValueError: ...; 5 of 8 slices are complete and
    kept in out.staging; fix the cause, then continue with: sentiment batch in out --resume; traceback
    in out.staging/_error.log``.
    """
    failure = describe_failure(exc)
    staging = state.staging.uri
    where = f" on {describe_slices(plan, failure.slices)}" if failure.slices else ""
    if stage == "commit":
        what = f"moving the results from {staging} to {state.output.uri} failed"
    elif failure.stage == "write":
        what = f"writing the results to {staging} failed{where}"
    elif failure.stage is not None:
        what = f"stage {failure.stage!r} failed{where}"
    elif failure.lost_worker:
        what = "Ray lost a worker past its retries"
    else:
        what = "the Ray Data run failed"
    try:
        done = len(complete_slices(state.staging, plan))
        kept = f"{done} of {len(plan.slices)} slices are complete and kept in {staging}"
    except Exception:  # the count is a courtesy; the staging directory is kept either way
        kept = f"what was written is kept in {staging}"
    fix = f"free space on the disk of {staging}" if failure.no_space else "fix the cause"
    again = resume_command or "the same arguments and --resume"
    line = f"{what}: {failure.reason}; {kept}; {fix}, then continue with: {again}"
    log = _write_log(state.staging, line + "\n\n" + "".join(traceback.format_exception(exc)))
    return RunFailedError(f"{line}; traceback in {log}")


# Where Ray Data logs a failed execution's traceback on the console (for a write error, with a request to
# report it as a Ray bug). The job says what failed in one line and keeps the traceback in its log file.
_RAY_DATA_ERROR_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")


@contextlib.contextmanager
def _quiet_ray_data_errors() -> Iterator[None]:
    quieted = [logging.getLogger(name) for name in _RAY_DATA_ERROR_LOGGERS]
    levels = [each.level for each in quieted]
    for each in quieted:
        each.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for each, level in zip(quieted, levels, strict=True):
            each.setLevel(level)


def _release(exc: BaseException) -> None:
    """Let go of a failed execution's Ray Data actors now: a ``--resume`` in this process needs their CPUs and GPUs.

    Ray Data releases an actor pool by dropping its handles, not by killing the actors, and the
    frames of the traceback still hold them (and the failed Dataset), in reference cycles a full
    collection frees. The traceback is already in the log.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if link.__traceback__ is not None:
            traceback.clear_frames(link.__traceback__)
        link = link.__cause__ or link.__context__
    gc.collect()


def describe_slices(plan: InputPlan, ids: Sequence[str]) -> str:
    """``in/a.parquet rows 64-127`` (0-based, inclusive; adjacent slices of a file merged), at most three ranges."""
    by_id = {piece.id: piece for piece in plan.slices}
    inputs = {item.index: item for item in plan.inputs}
    ranges: list[list[Any]] = []
    unknown = [piece_id for piece_id in ids if piece_id not in by_id]
    for piece in sorted((by_id[i] for i in ids if i in by_id), key=lambda p: (p.file, p.number)):
        item = inputs[piece.file]
        first = sum(item.row_groups[: piece.row_group]) + piece.offset
        if ranges and ranges[-1][0] == item.uri and ranges[-1][2] == first - 1:
            ranges[-1][2] = first + piece.rows - 1
        else:
            ranges.append([item.uri, first, first + piece.rows - 1])
    parts = [f"{uri} rows {first}-{last}" for uri, first, last in ranges] + [f"slice {i}" for i in unknown]
    more = f" and {len(parts) - 3} more" if len(parts) > 3 else ""
    return ", ".join(parts[:3]) + more


def _write_log(staging: Location, text: str) -> str:
    """Write ``text`` to the staging directory's `ERROR_LOG`, else to a local temporary file: where it went."""
    log = staging.child(ERROR_LOG)
    try:
        files.write_text(log, text)
        return log.uri
    except Exception:  # a full disk takes the log too; a half-written one would only mislead
        with contextlib.suppress(Exception):
            files.delete(log)
    try:
        with tempfile.NamedTemporaryFile("w", prefix="sentiment-batch-error-", suffix=".log", delete=False) as file:
            file.write(text)
            return file.name
    except OSError as exc:
        logger.error("%s", text)
        return f"the log above (it could not be written: {exc})"


def _score(
    args: PipelineArgs, plan: InputPlan, state: RunState, progress_interval_s: float
) -> tuple[float, dict[str, Any]]:
    """Score the pending slices into staging on Ray: the seconds it took, and what the pool resolved to."""
    import ray

    # ONNX Runtime on a torch checkpoint: exported once into the local cache here, not by every actor.
    prepare_onnx(args.model)
    connected_here = not ray.is_initialized()
    if connected_here:
        ray.init()
    try:
        return _score_on_ray(args, plan, state, progress_interval_s)
    except BaseException:
        if connected_here:
            # Let go of the Ray this run connected to (a local Ray it started ends, with its actors), so
            # that no actor's log line lands after the run's error line.
            ray.shutdown()
        raise


def _score_on_ray(
    args: PipelineArgs, plan: InputPlan, state: RunState, progress_interval_s: float
) -> tuple[float, dict[str, Any]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.stage import ActorLog

    calls = model_calls([piece.rows for piece in state.pending], args.rows_per_call)
    pool = cluster_pool(args, calls, actor_bytes(args.model))
    logger.info("model actors: %s", pool.to_dict())
    # On the driver's node: a worker node lost mid-job must not take the log with it (the
    # actors that replace its model actors report to it too).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor_log: Any = ray.remote(ActorLog).options(num_cpus=0, scheduling_strategy=here).remote()
    total = sum(piece.rows for piece in state.pending)
    started = time.perf_counter()
    try:
        with (
            _quiet_ray_data_errors(),
            Progress(total, lambda: ray.get(actor_log.totals.remote())["rows"], progress_interval_s),
        ):
            graph = stages(args, pool, plan, actor_log)
            build(slice_source(plan, state.pending), graph).write_parquet(
                state.staging.path, filesystem=state.staging.filesystem, partition_cols=[SLICE]
            )
        seconds = time.perf_counter() - started
        resolved = {"pool": pool.to_dict(), "num_gpus_per_actor": pool.num_gpus}
        resolved["actors"] = ray.get(actor_log.entries.remote())
    finally:
        ray.kill(actor_log)
    return seconds, resolved
