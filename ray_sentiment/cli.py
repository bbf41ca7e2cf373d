"""The ``sentiment`` command: one entry point above the core and the Ray adapters.

Each layer defines its own subcommands next to the code they drive (``predict`` and ``export`` in
`sentiment.cli`, ``serve`` in `deployments.cli`, ``batch`` and ``eval`` in `pipelines.cli`); this
module only puts them together and runs one. Nothing here imports ray, torch or transformers.

Exit statuses, one table (`main`): 0 done; 1 input or settings refused before any work (the error
names the file, column or field); 2 bad flags or config file; 3 a batch run that started and failed
(its staging directory is kept, and ``--resume`` continues it); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from deployments.cli import register as register_serve
from pipelines.cli import register as register_batch
from pipelines.errors import RunFailedError
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
    words = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    # What the command was given, for errors that say which command to run next (``--resume``).
    args.argv = words
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"sentiment {args.command}: error:\n{exc}", file=sys.stderr)
        return 2
    except RunFailedError as exc:
        print(f"sentiment {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except SentimentError as exc:
        print(f"sentiment {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
