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
- `pipelines.report`: the run report (``_report.json``), the summary line and the progress line.

The output directory holds ``part-<input index>-<slice>-<input name>.parquet`` files with the
input columns (or the ``keep`` subset; a column named like a prediction column is kept as
``input_<name>``) followed by the prediction columns (`pipelines.schema`), plus ``_manifest.json``
(what was read, with which model), ``_report.json`` (what this run did) and ``_SUCCESS``. Readers
of the directory skip the ``_`` files, as Arrow's dataset readers do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from pipelines.args import PipelineArgs
from pipelines.columns import SLICE
from pipelines.dataset import build, stages
from pipelines.plan import InputPlan, actor_bytes, checkpoint_labels, plan_inputs, with_labels
from pipelines.pool import cluster_pool, model_calls
from pipelines.read import slice_source
from pipelines.report import BatchResult, Progress, now, run_report
from pipelines.staging import RunState, commit, manifest, open_output, prepare, run_stats, staged_outputs
from sentiment.engines import prepare_onnx

logger = logging.getLogger(__name__)


def run(args: PipelineArgs, progress_interval_s: float = 10.0) -> BatchResult:
    """Run the batch job: check inputs and output, score pending slices on Ray, commit the output.

    Uses the Ray this process is connected to, else ``ray.init()`` (a local Ray, or the cluster
    named by ``RAY_ADDRESS``). Prints a progress line to stderr every ``progress_interval_s``.
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

    seconds, resolved = _score(args, plan, state, progress_interval_s) if state.pending else (0.0, {})
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
    commit(state, plan, report)
    return replace(result, report=report)


def _score(
    args: PipelineArgs, plan: InputPlan, state: RunState, progress_interval_s: float
) -> tuple[float, dict[str, Any]]:
    """Score the pending slices into staging on Ray: the seconds it took, and what the pool resolved to."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.stage import ActorLog

    # ONNX Runtime on a torch checkpoint: exported once into the local cache here, not by every actor.
    prepare_onnx(args.model)
    if not ray.is_initialized():
        ray.init()
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
        with Progress(total, lambda: ray.get(actor_log.totals.remote())["rows"], progress_interval_s):
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
