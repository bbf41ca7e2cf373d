"""The synthetic corpus: IMDB-like lengths, exact token counts in the test vocab, balanced labels."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from benchmarks.corpus import describe_lengths, main, make_corpus, make_reviews, review_lengths, write_corpus


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
    labels = table.column("label").to_pylist()
    assert (labels.count("neg"), labels.count("pos")) == (51, 50)
    assert make_corpus(101, seed=5).equals(table)
    assert not make_corpus(101, seed=6).equals(table)


def test_written_files_hold_every_row_once(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path, rows=103, files=4, seed=1)
    assert [path.name for path in paths] == [f"part-{i:05d}.parquet" for i in range(4)]
    ids = [i for path in paths for i in pq.read_table(path).column("id").to_pylist()]
    assert ids == list(range(103))


def test_command_line_writes_the_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "corpus"), "--rows", "20", "--files", "2", "--seed", "4"]) == 0
    assert pq.read_table(tmp_path / "corpus").num_rows == 20
    assert "wrote 20 reviews in 2 file(s)" in capsys.readouterr().out
