"""`sentiment.testing`: the synthetic corpus (IMDB-like lengths, exact token counts in the test vocab,
balanced labels) and the interruptible server process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from sentiment.testing import (
    describe_lengths,
    make_corpus,
    make_reviews,
    popen_interruptible,
    review_lengths,
    write_corpus,
)


def test_lengths_follow_the_imdb_test_set() -> None:
    stats = describe_lengths(review_lengths(25_000, seed=0))
    assert 284 <= stats["mean"] <= 294  # IMDB: 289
    assert 212 <= stats["median"] <= 222  # IMDB: 217
    assert 0.115 <= stats["over_512"] <= 0.131  # IMDB: 12.3%
    assert 2_500 <= stats["max"] <= 2_900  # IMDB: about 2,900


def test_every_review_has_exactly_its_drawn_token_count(tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    texts = make_reviews(400, seed=3)
    counts = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    assert counts == review_lengths(400, seed=3).tolist()
    assert sum(count > 512 for count in counts) > 0


def test_corpus_has_unique_ids_and_balanced_labels() -> None:
    table = make_corpus(101, seed=5)
    assert table.column_names == ["id", "text", "label"]
    assert table.column("id").to_pylist() == list(range(101))
    assert table.column("text").to_pylist() == make_reviews(101, seed=5)
    labels = table.column("label").to_pylist()
    assert (labels.count("neg"), labels.count("pos")) == (51, 50)
    assert make_corpus(101, seed=5).equals(table)
    assert not make_corpus(101, seed=6).equals(table)


def test_written_files_hold_every_row_once(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path, rows=103, files=4, seed=1)
    assert [path.name for path in paths] == [f"part-{i:05d}.parquet" for i in range(4)]
    ids = [i for path in paths for i in pq.read_table(path).column("id").to_pylist()]
    assert ids == list(range(103))


def test_a_server_started_while_sigint_is_ignored_still_gets_ctrl_c() -> None:
    # The child reports whether Python installed its KeyboardInterrupt handler, which it does only
    # when SIGINT was not ignored at its start.
    argv = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a run started with `cmd &`
    try:
        plain = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
        process = popen_interruptible(argv, stdout=subprocess.PIPE, text=True)
        interruptible = process.communicate(timeout=60)[0].strip()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # this process's handler is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (plain, interruptible) == ("False", "True")
