from __future__ import annotations

import pytest

from sentiment.windows import content_windows

IDS = list(range(1000, 1700))  # 700 distinct ids, longer than one 510-token window


def test_short_text_is_one_window_of_all_ids_whatever_the_strategy() -> None:
    for strategy in ("head", "tail", "head_tail", "chunks"):
        assert content_windows(IDS[:510], 510, strategy) == [IDS[:510]]


def test_head_keeps_the_first_tokens() -> None:
    assert content_windows(IDS, 510, "head") == [IDS[:510]]


def test_tail_keeps_the_last_tokens() -> None:
    assert content_windows(IDS, 510, "tail") == [IDS[-510:]]


def test_long_review_keeps_head_and_tail_tokens() -> None:
    (window,) = content_windows(IDS, 510, "head_tail", head_tokens=128)
    assert window == IDS[:128] + IDS[-382:]
    assert len(window) == 510


def test_head_tail_with_no_head_is_the_tail() -> None:
    assert content_windows(IDS, 510, "head_tail", head_tokens=0) == [IDS[-510:]]


def test_chunks_cover_every_token_with_full_windows_ending_at_the_end() -> None:
    windows = content_windows(IDS, 510, "chunks", chunk_stride=128)
    assert windows == [IDS[0:510], IDS[128:638], IDS[190:700]]


def test_chunks_with_stride_dividing_the_length_add_no_extra_window() -> None:
    ids = list(range(20))
    assert content_windows(ids, 10, "chunks", chunk_stride=5) == [ids[0:10], ids[5:15], ids[10:20]]


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="long_text must be one of"):
        content_windows(IDS, 510, "middle")  # type: ignore[arg-type]
