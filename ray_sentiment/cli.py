"""The ``sentiment`` command: one entry point above the core and the Ray adapters.

Each layer defines its own subcommands next to the code they drive (``predict`` and ``export`` in
`sentiment.cli`, ``serve`` in `deployments.cli`, ``batch`` and ``eval`` in `pipelines.cli`); this
module only puts them together and runs one. Nothing here imports ray, torch or transformers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from deployments.cli import register as register_serve
from pipelines.cli import register as register_batch
from sentiment.cli import UsageError
from sentiment.cli import register as register_predict
from sentiment.errors import SentimentError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment",
        description="Review sentiment with a BERT classifier: predict, serve over HTTP, score Parquet, evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (register_predict, register_serve, register_batch):
        register(commands)
    return parser


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
