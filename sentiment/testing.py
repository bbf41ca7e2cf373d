"""Test data for tests and benchmarks, built locally with no network.

- **Random-weight checkpoints** (`make_checkpoint`) load through the same ``from_pretrained`` path
  as a real model: a WordPiece vocab written here, a ``BertForSequenceClassification`` with random
  weights, both saved with ``save_pretrained``. Their predictions mean nothing; their shapes and
  speed are real.
- **A synthetic corpus** (`make_reviews`, `make_corpus`, `write_corpus`) of reviews whose *lengths*
  follow the IMDB test set (25,000 reviews, BERT WordPiece tokens, special tokens included: mean
  about 289, median about 217, 12.3% over 512, longest about 2,900). The texts are random sentences
  over `WORDS` with a balanced gold ``neg``/``pos`` label each, and no meaning a model could read.
  Lengths are drawn from a lognormal with median 217 and sigma 0.74 (which puts 12.3% over 512),
  the part above 512 stretched by a power of 1.08 so that the mean reaches 289 as in IMDB (a plain
  lognormal with that median and tail share has a mean of 285), rounded and clipped to [10, 2900].
  Every word of `WORDS` and every punctuation mark is one token of `vocab()`, so in checkpoints made
  by `make_checkpoint` a review drawn with length n has exactly n tokens, [CLS] and [SEP] included.
- **A server process Ctrl-C stops** (`popen_interruptible`).

Nothing here imports Ray; torch, transformers and Arrow are imported by the functions that use them.
"""

from __future__ import annotations

import math
import random
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

# Common English words; the synthetic corpus writes reviews from them, so in the vocab below each
# is exactly one WordPiece token.
WORDS: tuple[str, ...] = tuple(
    """
    the a an and or but if of to in on at by for with from as is was are were be been being this that
    these those it its he she they we you I his her their our your film movie story plot acting actor
    actress director scene scenes script music score camera character characters ending beginning
    good great bad terrible awful wonderful brilliant boring dull funny sad beautiful ugly best worst
    love loved hate hated like liked enjoyed watch watched watching see saw seen time times year years
    first last long short really very quite too much many more most some any all no not never ever
    again still just only also even well so then than when while after before because although though
    performance performances role cast screen series episode season drama comedy horror action thriller
    romance classic original remake sequel budget effects dialogue writing cinematography editing pace
    minutes hours end start people man woman men women family friend friends life world way thing things
    make made makes making give gave think thought feel felt know knew say said look looked find found
    recommend waste money worth fun amazing perfect poor weak strong excellent fantastic horrible
    """.split()
)

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PUNCTUATION = list(".,!?;:'\"()-/&%$#@*+=<>[]{}_~`|\\^")
_CJK = list("电影很好看不喜欢映画素晴らしい")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


def vocab() -> list[str]:
    """A cased WordPiece vocab: specials, punctuation, characters (whole and ``##``), the words."""
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    characters += [c.upper() for c in characters] + [str(d) for d in range(10)]
    tokens = _SPECIALS + _PUNCTUATION + characters + [f"##{c}" for c in characters] + _CJK
    seen = set(tokens)
    for word in WORDS:
        for form in (word, word.capitalize()):
            if form not in seen:
                seen.add(form)
                tokens.append(form)
    return tokens


def make_checkpoint(
    path: str | Path,
    *,
    size: str = "tiny",
    num_labels: int = 2,
    id2label: dict[int, str] | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    safe_serialization: bool = True,
) -> Path:
    """Write a random-weight BERT sequence classifier and its tokenizer to ``path``.

    ``initializer_range`` is wider than BERT's 0.02 so that random logits are far apart and labels
    are not decided by rounding noise in tests that compare labels.
    """
    import torch

    # transformers 5: BertTokenizer is the fast (tokenizers-backed) one.
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokens = vocab()
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        do_lower_case=False,
        model_max_length=max_position_embeddings,
    )
    tokenizer.save_pretrained(path)

    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    options: dict[str, Any] = {
        "vocab_size": len(tokens),
        "max_position_embeddings": max_position_embeddings,
        "num_labels": num_labels,
        "id2label": id2label,
        "label2id": {name: index for index, name in id2label.items()},
        "initializer_range": 0.2 if size == "tiny" else 0.02,
        **SIZES[size],
    }
    config = BertConfig(**options)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    if safe_serialization:
        model.save_pretrained(path)
    else:
        # Old-style checkpoint with only pytorch_model.bin, as some hub models still ship.
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


# The synthetic corpus's length distribution (see the module docstring).
MEDIAN_TOKENS = 217
SIGMA = 0.74
TAIL_START = 512
TAIL_POWER = 1.08
MIN_TOKENS = 10
MAX_TOKENS = 2900
SPECIAL_TOKENS = 2  # [CLS] and [SEP]
CORPUS_LABELS = ("neg", "pos")

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


def gold_labels(n: int, seed: int = 0) -> list[str]:
    """Balanced gold labels (``neg``/``pos``) in a seeded random order."""
    labels = [CORPUS_LABELS[i % 2] for i in range(n)]
    random.Random(seed).shuffle(labels)
    return labels


def make_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` synthetic review texts with IMDB-like lengths: the ``text`` column of `make_corpus`."""
    rng = random.Random(seed + 1)
    pairs = zip(review_lengths(n, seed), gold_labels(n, seed), strict=True)
    return [make_review(int(length), label, rng) for length, label in pairs]


def make_corpus(n: int, seed: int = 0) -> pa.Table:
    """A table of ``n`` reviews: ``id`` 0..n-1, ``text`` and the gold ``label``."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": pa.array(make_reviews(n, seed), pa.string()),
            "label": pa.array(gold_labels(n, seed), pa.string()),
        }
    )


def write_corpus(out: str | Path, rows: int, files: int = 1, seed: int = 0) -> list[Path]:
    """Write `make_corpus` as ``files`` Parquet files of near-equal size under ``out``; return their paths."""
    import pyarrow.parquet as pq

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
    """The statistics the module docstring promises, for checking a corpus against IMDB's."""
    array = np.asarray(lengths)
    return {
        "rows": float(len(array)),
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "over_512": float((array > TAIL_START).mean()),
        "max": float(array.max()),
    }


def popen_interruptible(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **kwargs)`` for a server that Ctrl-C (SIGINT) must stop; main thread only.

    A process started in the background of a script (``cmd &``) inherits SIGINT ignored, and its
    children would too: exec keeps an ignored signal ignored but resets a handled one. The child
    is started while this process handles SIGINT, so it gets SIGINT as from a terminal.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


# -- Waiting and ports, for tests that start servers or clusters (no Ray needed here) ----------
# A self-contained block: its imports stay with it.

from collections.abc import Callable  # noqa: E402


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5) -> None:
    """Poll ``condition`` until it holds; after ``timeout_s``, fail naming ``what`` was awaited."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# -- a labelled synthetic corpus ---------------------------------------------------------------------
# Random weights make label agreement between engines meaningless (their classes sit a rounding apart),
# so fidelity is measured on a small BERT trained on reviews whose label follows from the text: which
# of the positive or the negative words are more frequent. Every word is one token in `vocab`.

POSITIVE_WORDS: tuple[str, ...] = tuple(
    "good great wonderful brilliant funny beautiful best love loved liked enjoyed recommend fun amazing perfect "
    "excellent fantastic strong worth".split()
)
NEGATIVE_WORDS: tuple[str, ...] = tuple(
    "bad terrible awful boring dull ugly worst hate hated waste poor weak horrible sad".split()
)
NEUTRAL_WORDS: tuple[str, ...] = tuple(
    word for word in WORDS if word not in POSITIVE_WORDS and word not in NEGATIVE_WORDS and word != "like"
)


def labelled_reviews(
    count: int, *, seed: int, min_words: int = 20, max_words: int = 100, most_sentiment_words: int = 6
) -> tuple[list[str], list[int]]:
    """``count`` reviews and their labels (1: positive words outnumber negative ones, 0: the reverse; never a tie).

    Each review is neutral filler with 0 to ``most_sentiment_words`` words of each polarity mixed in.
    """
    import random

    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for _ in range(count):
        positive = rng.randint(0, most_sentiment_words)
        negative = rng.choice([n for n in range(most_sentiment_words + 1) if n != positive])
        length = max(rng.randint(min_words, max_words), positive + negative)
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(length - positive - negative)]
        words += [rng.choice(POSITIVE_WORDS) for _ in range(positive)]
        words += [rng.choice(NEGATIVE_WORDS) for _ in range(negative)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(positive > negative))
    return texts, labels
