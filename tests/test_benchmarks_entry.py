"""``python -m benchmarks``: one command in front of every benchmark."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import MODES, main


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
