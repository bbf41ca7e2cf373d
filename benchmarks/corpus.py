"""A synthetic Parquet corpus of movie reviews whose lengths follow the IMDB test set.

The texts are synthetic: random sentences over `sentiment.testing.WORDS`, with a gold ``neg``/``pos``
label each (balanced), and no meaning a real model could read. Only their *lengths* are realistic.
The length statistics come from the IMDB test set (25,000 reviews, BERT WordPiece tokens, special
tokens included): mean about 289, median about 217, 12.3% over 512, longest about 2,900.

Lengths are drawn from a lognormal with median 217 and sigma 0.74 (which puts 12.3% over 512),
with the part above 512 stretched by a power of 1.08 so that the mean reaches 289 as in IMDB
(a plain lognormal with that median and tail share has a mean of 285), rounded and clipped to
[10, 2900]. Every word of `WORDS` and every punctuation mark is exactly one token in the vocab of
`sentiment.testing.vocab()`, so in checkpoints made by `sentiment.testing.make_checkpoint` a review
drawn with length n has exactly n tokens, [CLS] and [SEP] included (``num_tokens`` == n).

    python -m benchmarks.corpus OUT --rows 2000 [--files 4] [--seed 0]

writes ``OUT/part-00000.parquet`` ... with columns ``id`` (int64), ``text`` (string) and ``label``
(string, ``neg``/``pos``).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sentiment.testing import WORDS

MEDIAN_TOKENS = 217
SIGMA = 0.74
TAIL_START = 512
TAIL_POWER = 1.08
MIN_TOKENS = 10
MAX_TOKENS = 2900
SPECIAL_TOKENS = 2  # [CLS] and [SEP]
LABELS = ("neg", "pos")

_POSITIVE = ("good", "great", "wonderful", "brilliant", "beautiful", "best", "love", "loved", "enjoyed", "amazing")
_NEGATIVE = ("bad", "terrible", "awful", "boring", "dull", "worst", "hate", "hated", "waste", "horrible")
_ENDINGS = (".", ".", ".", "!", "?")


def review_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts (special tokens included) of ``n`` reviews, distributed like the IMDB test set."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(math.log(MEDIAN_TOKENS), SIGMA, n))
    tail = lengths > TAIL_START
    lengths[tail] = TAIL_START * (lengths[tail] / TAIL_START) ** TAIL_POWER
    return np.clip(np.rint(lengths), MIN_TOKENS, MAX_TOKENS).astype(np.int64)


def make_review(num_tokens: int, label: str, rng: random.Random) -> str:
    """One review of exactly ``num_tokens`` tokens (special tokens included) in the test vocab.

    Sentences of 6 to 24 tokens, each ending in punctuation; about one word in ten is a sentiment
    word matching ``label``, so the texts read a little like reviews.
    """
    content = num_tokens - SPECIAL_TOKENS
    flavour = _POSITIVE if label == "pos" else _NEGATIVE
    sentences: list[str] = []
    while content > 0:
        size = min(content, rng.randint(6, 24))
        words = [rng.choice(flavour) if rng.random() < 0.1 else rng.choice(WORDS) for _ in range(size - 1)]
        if words:
            words[0] = words[0].capitalize()
        # The closing mark is its own token, like every word.
        sentences.append(" ".join(words) + rng.choice(_ENDINGS))
        content -= size
    return " ".join(sentences)


def make_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` synthetic review texts with IMDB-like lengths (labels as in `make_corpus`)."""
    return make_corpus(n, seed).column("text").to_pylist()


def gold_labels(n: int, seed: int = 0) -> list[str]:
    """Balanced gold labels (``neg``/``pos``) in a seeded random order."""
    labels = [LABELS[i % 2] for i in range(n)]
    random.Random(seed).shuffle(labels)
    return labels


def make_corpus(n: int, seed: int = 0) -> pa.Table:
    """A table of ``n`` reviews: ``id`` 0..n-1, ``text`` and the gold ``label``."""
    lengths = review_lengths(n, seed)
    labels = gold_labels(n, seed)
    rng = random.Random(seed + 1)
    texts = [make_review(int(length), label, rng) for length, label in zip(lengths, labels, strict=True)]
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.string()),
        }
    )


def write_corpus(out: str | Path, rows: int, files: int = 1, seed: int = 0) -> list[Path]:
    """Write `make_corpus` as ``files`` Parquet files of near-equal size under ``out``; return their paths."""
    if rows < 1 or files < 1:
        raise ValueError(f"rows and files must be at least 1, got rows={rows}, files={files}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = make_corpus(rows, seed)
    paths = []
    for index, bounds in enumerate(np.array_split(np.arange(rows), min(files, rows))):
        path = out / f"part-{index:05d}.parquet"
        pq.write_table(table.slice(int(bounds[0]), len(bounds)), path)
        paths.append(path)
    return paths


def describe_lengths(lengths: Sequence[int]) -> dict[str, float]:
    """The statistics the docstring promises, for checking a corpus against IMDB's."""
    array = np.asarray(lengths)
    return {
        "rows": float(len(array)),
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "over_512": float((array > TAIL_START).mean()),
        "max": float(array.max()),
    }


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
