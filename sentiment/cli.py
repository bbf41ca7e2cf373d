"""The core's part of the ``sentiment`` command: the model flags, the config file, ``predict`` and ``export``.

The command itself (`ray_sentiment.cli`) lives above the core and the Ray adapters and puts
together their subcommands; the adapters' CLIs (`deployments.cli`, `pipelines.cli`) use the
helpers here. Heavy imports (torch) happen inside handlers, so ``sentiment --help`` is instant and
a typo in a flag fails before anything loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from sentiment.config import ModelConfig, format_validation_error, read_yaml
from sentiment.errors import SentimentError
from sentiment.flags import add_flags, flag_values

# The one place a model flag's spelling differs from its ModelConfig field; every other field is
# --field-name, generated from the field (sentiment.flags), so a new field gets its flag.
MODEL_FLAG_NAMES = {"model_id": "model"}


class UsageError(SentimentError):
    """Bad flags or config file; printed without a traceback, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every `ModelConfig` field; unset flags leave the config file's (or default) value."""
    group = parser.add_argument_group("model (ModelConfig fields; the config file's 'model' section)")
    dests = add_flags(group, ModelConfig, names=MODEL_FLAG_NAMES)
    parser.set_defaults(_model_flags=dests)
    group.add_argument("--config", metavar="FILE", help="YAML file; its 'model' section holds ModelConfig fields")


def load_config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file named by ``--config`` (empty when none), checked for unknown sections."""
    return read_yaml(args.config) if getattr(args, "config", None) else {}


def model_config_from_args(args: argparse.Namespace, file_data: dict[str, Any] | None = None) -> ModelConfig:
    """Merge the config file's ``model`` section with flags (flags win) into a `ModelConfig`."""
    section = dict((file_data or {}).get("model") or {})
    section.update(flag_values(args, getattr(args, "_model_flags", {})))
    try:
        return ModelConfig(**section)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, prefix="model.")) from exc


def _run_predict(args: argparse.Namespace) -> int:
    from sentiment.model import SentimentClassifier

    config = model_config_from_args(args, load_config_file(args))
    texts = list(args.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin]
    classifier = SentimentClassifier(config)
    for text, prediction in zip(texts, classifier.predict(texts), strict=True):
        record = {"text": text, **prediction.to_dict()} if args.echo else prediction.to_dict()
        print(json.dumps(record, ensure_ascii=False))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sentiment.export import describe_export, export_checkpoint

    try:
        config = ModelConfig(model_id=args.model, revision=args.revision, local_files_only=args.local_files_only)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from exc
    manifest = export_checkpoint(config, args.out_dir, args.dtype, overwrite=args.overwrite)
    print(describe_export(manifest, Path(args.out_dir)))
    return 0


def register(commands: Any) -> None:
    """Add the ``predict`` and ``export`` subcommands to the ``sentiment`` command's subparsers."""
    predict = commands.add_parser("predict", help="classify texts given on the command line (one JSON line each)")
    predict.add_argument(
        "texts", nargs="+", metavar="TEXT", help="texts to classify; '-' reads one per line from stdin"
    )
    predict.add_argument("--echo", action="store_true", help="include the text in each JSON line")
    add_model_arguments(predict)
    predict.set_defaults(handler=_run_predict)

    export = commands.add_parser(
        "export",
        help="write an ONNX Runtime directory (fp32 or int8) from a torch checkpoint",
        description=(
            "Export a sequence-classification checkpoint to OUT_DIR: model.onnx with ONNX Runtime's BERT "
            "fusions (int8: weights quantized), its tokenizer, config.json and manifest.json. Run it with "
            "--model OUT_DIR (backend onnxruntime, no torch needed). Needs the onnx extra: "
            "pip install 'ray-sentiment[onnx]'."
        ),
    )
    export.add_argument("model", metavar="MODEL", help="hub id or local directory of a torch checkpoint")
    export.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (new, or empty)")
    export.add_argument(
        "--dtype",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32: the same scores as torch (within 1e-4); int8: weights quantized, faster, scores move slightly",
    )
    export.add_argument("--revision", help="hub revision (branch, tag or commit) of MODEL")
    export.add_argument(
        "--local-files-only", action="store_true", help="never contact the hub: MODEL must be local or cached"
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds files")
    export.set_defaults(handler=_run_export)
