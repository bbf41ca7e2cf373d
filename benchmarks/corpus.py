"""Write the synthetic IMDB-length corpus (`sentiment.testing.write_corpus`) as Parquet.

    python -m benchmarks.corpus OUT --rows 2000 [--files 4] [--seed 0]

writes ``OUT/part-00000.parquet`` ... with columns ``id`` (int64), ``text`` (string) and ``label``
(string, ``neg``/``pos``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sentiment.testing import describe_lengths, review_lengths, write_corpus


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--rows", type=int, required=True, help="number of reviews")
    parser.add_argument("--files", type=int, default=1, help="number of Parquet files (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    paths = write_corpus(args.out, args.rows, args.files, args.seed)
    stats = describe_lengths(review_lengths(args.rows, args.seed))
    print(
        f"wrote {args.rows} reviews in {len(paths)} file(s) under {args.out}: tokens mean {stats['mean']:.0f}, "
        f"median {stats['median']:.0f}, {stats['over_512']:.1%} over 512, longest {stats['max']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
