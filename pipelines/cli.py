"""``sentiment batch`` and ``sentiment eval``: flags and a YAML file's sections, read into `PipelineArgs`.

A config file holds `ModelConfig` fields under ``model:`` and `PipelineArgs` fields under ``batch:``.

Nothing here imports ray: the handlers import `pipelines.batch` and `pipelines.eval`, which import
it only when a job runs.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence
from typing import Any

from pipelines.args import PipelineArgs, parse_pipeline_args
from sentiment.cli import UsageError, add_model_arguments, load_config_file, model_config_from_args
from sentiment.errors import InvalidInputError
from sentiment.flags import add_flags, flag_values

_ACTORS = re.compile(r"^(\d+)(?:-(\d+))?$")


def register(commands: Any) -> None:
    """Add the ``batch`` and ``eval`` subcommands to ``sentiment``'s subparsers."""
    batch = commands.add_parser(
        "batch",
        help="score Parquet reviews with Ray Data and write Parquet",
        description=(
            "Score a Parquet corpus on a Ray Data actor pool; write every input row once, with the input "
            "columns and the predictions. Runs on a local Ray, or on the cluster named by RAY_ADDRESS."
        ),
    )
    batch.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="INPUT ... OUTPUT: input files, directories or globs (local or s3://, gs://, ...), then the output "
        "directory; both may come from the config file's batch section instead",
    )
    _add_pool_arguments(batch)
    output = batch.add_argument_group("output (PipelineArgs fields)")
    batch.set_defaults(_output_flags=add_flags(output, PipelineArgs, only=("keep", "overwrite", "resume")))
    batch.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines on stderr (default: 10)",
    )
    batch.set_defaults(handler=_run_batch)

    evaluate = commands.add_parser(
        "eval",
        help="classification report of scored (or to-be-scored) Parquet against gold labels",
        description=(
            "Precision, recall, F1 per class, accuracy, macro and weighted averages and the confusion "
            "matrix. PATH is the output of `sentiment batch`, or an input that is scored first."
        ),
    )
    evaluate.add_argument("path", metavar="PATH", help="Parquet file or directory with gold labels")
    evaluate.add_argument(
        "--label-column", default="label", help="gold label column: neg/pos names or 0/1 (default: label)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the numbers as JSON")
    evaluate.add_argument(
        "--plot",
        metavar="DIR",
        help="also write PNGs to DIR: confusion_matrix, score_distribution, calibration (needs matplotlib)",
    )
    _add_pool_arguments(evaluate)
    evaluate.set_defaults(handler=_run_eval)


# PipelineArgs fields that are flags of their own (the others have flags below, or come from the file).
_JOB_FIELDS = ("text_column", "num_gpus", "num_cpus", "cpu_threads", "rows_per_call")


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batch job (PipelineArgs fields; the config file's 'batch' section)")
    group.add_argument("--actors", metavar="MIN-MAX", help="model actors: a fixed N or an autoscaling MIN-MAX")
    parser.set_defaults(_pipeline_flags=add_flags(group, PipelineArgs, only=_JOB_FIELDS))
    add_model_arguments(parser)


def pipeline_args_from_args(args: argparse.Namespace, **overrides: Any) -> PipelineArgs:
    """Merge the config file's ``model`` and ``batch`` sections with flags (flags win)."""
    file_data = load_config_file(args)
    model = model_config_from_args(args, file_data)

    section = file_data.get("batch") or {}
    if not isinstance(section, dict):
        raise UsageError(f"batch: the config file's batch section must be a mapping, got {type(section).__name__}")
    section = dict(section)
    if "model" in section:
        raise UsageError("batch.model: put model settings in the top-level model section")
    for flags in ("_pipeline_flags", "_output_flags"):
        section.update(flag_values(args, getattr(args, flags, {})))
    if getattr(args, "actors", None):
        match = _ACTORS.match(args.actors.strip())
        if not match:
            raise UsageError(f"--actors: give N or MIN-MAX (e.g. 1-4), got {args.actors!r}")
        section["min_actors"] = int(match.group(1))
        section["max_actors"] = int(match.group(2) or match.group(1))
    section.update(overrides)
    try:
        return parse_pipeline_args({**section, "model": model}, source="batch")
    except InvalidInputError as exc:
        raise UsageError(str(exc)) from exc


def _run_batch(args: argparse.Namespace) -> int:
    from pipelines.batch import run

    overrides: dict[str, Any] = {}
    if len(args.paths) == 1:
        raise UsageError("give one or more inputs and then the output directory: sentiment batch INPUT ... OUTPUT")
    if args.paths:
        overrides = {"input": args.paths[:-1], "output": args.paths[-1]}
    argv = getattr(args, "argv", None)
    result = run(
        pipeline_args_from_args(args, **overrides),
        progress_interval_s=args.progress_interval,
        resume_command=resume_command(argv) if argv is not None else None,
    )
    print(result.summary_line())
    return 0


def resume_command(argv: Sequence[str]) -> str:
    """The ``sentiment`` command that continues the run ``argv`` started: the same words, ``--resume`` for
    ``--overwrite`` (which would start over)."""
    words = [word for word in argv if word != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(["sentiment", *words])


def _run_eval(args: argparse.Namespace) -> int:
    from pipelines.eval import EvalReport, evaluate, format_json

    on_scored = None
    if args.plot:
        from pipelines.plots import plot_evaluation, require_matplotlib

        require_matplotlib()  # before a long batch job, not after it

        def on_scored(scored: str, report: EvalReport) -> None:
            plot_evaluation(scored, report, args.plot, args.label_column)

    # The pipeline runs only when PATH has not been scored yet; input and output are set there.
    pipeline = pipeline_args_from_args(args, input=args.path, output=args.path + ".scored")
    report = evaluate(args.path, args.label_column, pipeline, on_scored=on_scored)
    print(format_json(report) if args.json else report.format_text())
    if args.plot and not args.json:
        print(f"\npictures written to {args.plot}/: confusion_matrix.png, score_distribution.png, calibration.png")
    return 0
