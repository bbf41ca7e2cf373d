"""`sentiment.packing`: windows packed flat and padded by indexing give what per-row padding gives."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sentiment.packing import Padder, TokenWindows, WindowBatch

PAD = 0


def padded_row_by_row(windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The per-row loop the padding replaced: the reference."""
    longest = max(len(window) for window in windows)
    ids = np.full((len(windows), longest), PAD, dtype=np.int64)
    mask = np.zeros((len(windows), longest), dtype=np.int64)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = window
        mask[row, : len(window)] = 1
    return ids, mask


def test_packing_keeps_every_window_and_its_length() -> None:
    windows = [[101, 5, 102], [101, 102], [101, 7, 8, 9, 102]]
    packed = TokenWindows.from_lists(windows)
    assert (len(packed), packed.lengths.tolist(), packed.tolist()) == (3, [3, 2, 5], windows)
    assert packed.offsets.tolist() == [0, 3, 5, 10]
    assert TokenWindows.from_lists(packed) is packed
    empty = TokenWindows.from_lists([])
    assert (len(empty), empty.tolist()) == (0, [])


def test_a_batch_is_a_sequence_of_its_members_in_batch_order() -> None:
    packed = TokenWindows.from_lists([[1, 2], [3], [4, 5, 6]])
    batch = WindowBatch(packed, np.array([2, 0]))
    assert len(batch) == 2
    assert [member.tolist() for member in batch] == [[4, 5, 6], [1, 2]]
    assert batch[1].tolist() == [1, 2]
    assert max(len(member) for member in batch) == 3


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_padding_by_indexing_equals_padding_row_by_row(dtype: type) -> None:
    rng = random.Random(0)
    windows = [[rng.randint(1, 30_000) for _ in range(rng.randint(2, 512))] for _ in range(300)]
    packed = TokenWindows.from_lists(windows)
    # As read from an Arrow column: int32 values, offsets that start inside a bigger buffer.
    packed = TokenWindows(np.concatenate([[7, 7, 7], packed.values]).astype(dtype), packed.offsets + 3)
    padder = Padder(PAD)
    for _ in range(20):
        indices = np.array(rng.sample(range(len(windows)), rng.randint(1, 64)))
        ids, mask = padder.pad(WindowBatch(packed, indices))
        want_ids, want_mask = padded_row_by_row([windows[i] for i in indices])
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, want_ids)
        if mask is None:
            assert want_mask.all()
        else:
            assert mask.dtype == np.int64
            np.testing.assert_array_equal(mask, want_mask)


def test_a_batch_of_equal_lengths_has_no_mask_and_the_arrays_are_reused() -> None:
    packed = TokenWindows.from_lists([[101, 1, 102], [101, 2, 102], [101, 3, 3, 102]])
    padder = Padder(PAD)
    ids, mask = padder.pad(WindowBatch(packed, np.array([2, 0])))
    assert (ids.tolist(), mask.tolist() if mask is not None else None) == (
        [[101, 3, 3, 102], [101, 1, 102, PAD]],
        [[1, 1, 1, 1], [1, 1, 1, 0]],
    )
    again, mask = padder.pad(WindowBatch(packed, np.array([1, 0])))
    assert (again.tolist(), mask) == ([[101, 2, 102], [101, 1, 102]], None)
    assert np.shares_memory(ids, again)  # no new array per pass once one is big enough
