"""The offline batch job: Parquet in, the shared classifier on Ray Data actors, Parquet out, every row once.

`run` ties the job's parts together, each in its own module:

- `pipelines.plan`: input files checked from their footers (missing file or text column, a file
  that is not Parquet, columns that disagree, no rows: errors naming the file and column, before
  Ray starts or any model loads), the model's labels from its config alone, and the **slices**;
- `pipelines.dataset`: the Ray Data graph (read slices -> `TokenizeStage` -> `ModelStage` ->
  output columns) and how many model actors run on this cluster (`pool_sizes`);
- `pipelines.staging`: results staged per slice under ``OUTPUT.staging``, every input's row count
  checked, then one move into ``OUTPUT``; ``--resume`` re-does only the slices a crash cut short;
- `pipelines.report`: the run report (``_report.json``), the summary line and the progress line.

The output directory holds ``part-<input index>-<slice>-<input name>.parquet`` files with the
input columns (or the ``keep`` subset; a column named like a prediction column is kept as
``input_<name>``) followed by the prediction columns (`pipelines.schema`), plus ``_manifest.json``
(what was read, with which model), ``_report.json`` (what this run did) and ``_SUCCESS``. Readers
of the directory skip the ``_`` files, as Arrow's dataset readers do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.dataset import NodeShape, PoolSizes, map_batches_options, model_calls, pool_sizes, scored_dataset
from pipelines.plan import SLICE_COLUMN, STAGING_SUFFIX, actor_bytes, checkpoint_labels, plan_inputs, with_labels
from pipelines.report import BatchResult, Progress, format_summary, now, run_report
from pipelines.staging import (
    MANIFEST,
    SUCCESS,
    BatchJobError,
    check_manifest,
    check_output_location,
    commit,
    complete_rows,
    manifest,
    pending_slices,
    run_stats,
    staged_outputs,
)
from sentiment.engines import prepare_onnx
from sentiment.errors import InvalidInputError

__all__ = [
    "STAGING_SUFFIX",
    "BatchJobError",
    "BatchResult",
    "PoolSizes",
    "commit",
    "format_summary",
    "map_batches_options",
    "plan_inputs",
    "pool_sizes",
    "run",
    "with_labels",
]

logger = logging.getLogger(__name__)


def run(args: PipelineArgs, progress_interval_s: float = 10.0) -> BatchResult:
    """Run the batch job: check inputs and output, score pending slices on Ray, commit the output.

    Uses the Ray this process is connected to, else ``ray.init()`` (a local Ray, or the cluster
    named by ``RAY_ADDRESS``). Prints a progress line to stderr every ``progress_interval_s``.
    """
    output = files.locate(args.output)
    if output.path.strip("/") == "" or (output.scheme and "/" not in output.path.strip("/")):
        raise InvalidInputError(f"output {args.output} must be a directory below a bucket or filesystem root")
    staging = output.sibling(STAGING_SUFFIX)

    # Inputs and output first, then the model's config (no weights): bad input fails before anything loads.
    started_at = now()
    plan = plan_inputs(args)
    resuming = check_output_location(args, output, staging)
    plan = with_labels(plan, checkpoint_labels(args.model))
    expected = manifest(args, plan)

    if args.resume and not resuming and files.exists(output.child(SUCCESS)):
        # Complete: how it was sliced no longer matters.
        check_manifest(output.child(MANIFEST), expected, f"into {output.uri}", ignore=("rows_per_call",))
        rows = complete_rows([entry for entry in files.list_files(output) if entry.path.endswith(".parquet")])
        if rows != plan.rows:
            raise BatchJobError(f"output {output.uri} holds {rows} rows but the inputs hold {plan.rows}")
        logger.info("output %s is already complete; nothing to do", output.uri)
        slices = len(plan.slices)
        done = BatchResult(
            args.output, plan.rows, 0, 0.0, 0, 0, 0, len(plan.inputs), slices, slices, len(plan.inputs), plan.labels
        )
        # The output keeps the report of the run that wrote it.
        return replace(done, report=run_report(done, args, started_at, now()))

    if resuming and not files.exists(staging.child(MANIFEST)):
        # Interrupted before its manifest was written, so before anything else was: start afresh.
        resuming = False
    if resuming:
        check_manifest(staging.child(MANIFEST), expected, f"the interrupted run in {staging.uri}")
        pending = pending_slices(staging, plan)
    else:
        files.delete(staging)
        staging.filesystem.create_dir(staging.path, recursive=True)
        files.write_text(staging.child(MANIFEST), json.dumps(expected, indent=2) + "\n")
        pending = list(plan.slices)

    seconds = 0.0
    resolved: dict[str, Any] = {}
    if pending:
        # ONNX Runtime on a torch checkpoint: exported once into the local cache here, not by every actor.
        prepare_onnx(args.model)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pipelines.stage import ActorLog

        if not ray.is_initialized():
            ray.init()
        pool = pool_sizes(
            args,
            ray.cluster_resources().get("GPU", 0.0),
            _nodes(),
            _launchable_gpus(),
            calls=model_calls([piece.rows for piece in pending], args.rows_per_call),
            actor_bytes=actor_bytes(args.model),
        )
        logger.info("model actors: %s", pool.to_dict())
        # On the driver's node: a worker node lost mid-job must not take the log with it (the
        # actors that replace its model actors report to it too).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor_log: Any = ray.remote(ActorLog).options(num_cpus=0, scheduling_strategy=here).remote()
        total = sum(piece.rows for piece in pending)
        started = time.perf_counter()
        try:
            with Progress(total, lambda: ray.get(actor_log.totals.remote())["rows"], progress_interval_s):
                scored_dataset(args, plan, pending, pool, actor_log).write_parquet(
                    staging.path,
                    filesystem=staging.filesystem,
                    partition_cols=[SLICE_COLUMN],
                )
            seconds = time.perf_counter() - started
            resolved = {"pool": pool.to_dict(), "num_gpus_per_actor": pool.num_gpus}
            resolved["actors"] = ray.get(actor_log.entries.remote())
        finally:
            ray.kill(actor_log)
    staged = staged_outputs(staging)
    tokens, truncated, errors = run_stats([entry for piece in pending for entry in staged.get(piece.id, [])])
    pending_files = {piece.file for piece in pending}
    result = BatchResult(
        output=args.output,
        rows=plan.rows,
        processed_rows=sum(piece.rows for piece in pending),
        seconds=seconds,
        tokens=tokens,
        truncated=truncated,
        errors=errors,
        input_files=len(plan.inputs),
        slices=len(plan.slices),
        skipped_slices=len(plan.slices) - len(pending) if resuming else 0,
        skipped_files=len(plan.inputs) - len(pending_files) if resuming else 0,
        labels=plan.labels,
    )
    report = run_report(result, args, started_at, now(), resolved)
    commit(staging, output, plan, report)
    return replace(result, report=report)


def _nodes() -> list[NodeShape]:
    """CPUs and memory of each alive node that has CPUs."""
    import ray

    return [
        NodeShape(node["Resources"]["CPU"], node["Resources"].get("memory"))
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0
    ]


def _launchable_gpus() -> float:
    """GPUs the cluster's autoscaler could add, where it tells the GCS (autoscaler v2, KubeRay); else 0.

    Reads Ray's own state API (what Ray Data and Train use to size pools); a Ray without it counts 0.
    """
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private API: its absence or failure only means "unknown"
        return 0.0
    return float(limits.get("GPU", 0) or 0)
