"""``python -m benchmarks``: one command in front of every benchmark."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from benchmarks.__main__ import MODES, main
from sentiment.testing import make_reviews


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_reaches_its_benchmarks_options(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([mode, "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_no_mode_or_an_unknown_one_lists_the_modes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["nope"]) == 2
    err = capsys.readouterr()
    assert "overload" in err.out
    assert "unknown mode 'nope'" in err.err


def test_corpus_command_writes_the_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["corpus", str(tmp_path / "corpus"), "--rows", "20", "--files", "2", "--seed", "4"]) == 0
    table = pq.read_table(tmp_path / "corpus")
    assert table.num_rows == 20
    assert table.sort_by("id").column("text").to_pylist() == make_reviews(20, seed=4)
    assert "wrote 20 reviews in 2 file(s)" in capsys.readouterr().out
