"""The ``sentiment`` command line: reads flags and YAML into the typed configs, then hands off.

Each subcommand's heavy imports (torch, ray) happen inside its handler, so ``sentiment --help``
is instant and a typo in a flag fails before anything loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from sentiment.config import ModelConfig, format_validation_error, read_yaml
from sentiment.errors import SentimentError

# Flag name -> ModelConfig field, for the flags every model-running subcommand shares.
_MODEL_FLAGS = {
    "model": "model_id",
    "revision": "revision",
    "long_text": "long_text",
    "dtype": "dtype",
    "device": "device",
    "max_length": "max_length",
    "max_batch_tokens": "max_batch_tokens",
    "max_batch_size": "max_batch_size",
}


class UsageError(SentimentError):
    """Bad flags or config file; printed without a traceback, exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that set `ModelConfig` fields; unset flags leave the config file's (or default) value."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="ID_OR_DIR", help="hub id or local checkpoint directory")
    group.add_argument("--revision", help="hub revision (branch, tag or commit)")
    group.add_argument("--long-text", choices=["head", "tail", "head_tail", "chunks"], help="cut for long texts")
    group.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="precision")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--max-length", type=int, help="most tokens per model input (capped by the model)")
    group.add_argument(
        "--max-batch-tokens", type=_tokens_or_auto, metavar="N|auto", help="token budget of one forward pass"
    )
    group.add_argument("--max-batch-size", type=int, help="most inputs in one forward pass")
    group.add_argument("--config", metavar="FILE", help="YAML file; its 'model' section holds ModelConfig fields")


def _tokens_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {value!r}") from None


def load_config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The YAML file named by ``--config`` (empty when none), checked for unknown sections."""
    return read_yaml(args.config) if getattr(args, "config", None) else {}


def model_config_from_args(args: argparse.Namespace, file_data: dict[str, Any] | None = None) -> ModelConfig:
    """Merge the config file's ``model`` section with flags (flags win) into a `ModelConfig`."""
    section = dict((file_data or {}).get("model") or {})
    for flag, field in _MODEL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            section[field] = value
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment",
        description="Review sentiment with a BERT classifier: predict, serve over HTTP, score Parquet, evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="classify texts given on the command line (one JSON line each)")
    predict.add_argument(
        "texts", nargs="+", metavar="TEXT", help="texts to classify; '-' reads one per line from stdin"
    )
    predict.add_argument("--echo", action="store_true", help="include the text in each JSON line")
    add_model_arguments(predict)
    predict.set_defaults(handler=_run_predict)

    for register in _extra_commands():
        register(commands)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands defined next to the code they drive (Serve, Ray Data); none imports ray here."""
    from deployments.cli import register as register_serve
    from pipelines.cli import register as register_batch

    return [register_serve, register_batch]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"sentiment {args.command}: error:\n{exc}", file=sys.stderr)
        return 2
    except SentimentError as exc:
        print(f"sentiment {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
