"""Token windows packed flat, and padded into forward-pass batches by indexing: no per-row Python.

A call's windows are one array of token ids and one of offsets (window ``i`` is
``values[offsets[i]:offsets[i + 1]]``), the layout of an Arrow ``list<int32>`` column, so the batch
job's model stage reads its windows from Arrow buffers as they are (`TokenWindows`), and the
classifier pads a batch of them with a few numpy operations into one reused array (`Padder`).
Per 1,024-row call this is about a millisecond, against 15 to 25 ms for ``to_pylist`` and a Python
loop over rows (``python -m benchmarks host-overhead``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenWindows:
    """Windows of token ids packed flat: window ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    """Every window's ids, one after the other (any integer type; int32 straight from Arrow)."""
    offsets: np.ndarray
    """int64, one more than there are windows; need not start at 0 (a slice of a bigger buffer)."""

    @classmethod
    def from_lists(cls, windows: Sequence[Sequence[int]] | TokenWindows) -> TokenWindows:
        """Pack lists of ids (or arrays): the API's way in, where texts arrive as `EncodedText`."""
        if isinstance(windows, TokenWindows):
            return windows
        lengths = np.fromiter((len(window) for window in windows), dtype=np.int64, count=len(windows))
        offsets = np.zeros(len(windows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not len(windows):
            return cls(np.zeros(0, dtype=np.int64), offsets)
        values = np.fromiter((token for window in windows for token in window), dtype=np.int64, count=int(offsets[-1]))
        return cls(values, offsets)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each window (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[index] for index in range(len(self)))

    def tolist(self) -> list[list[int]]:
        return [window.tolist() for window in self]


@dataclass(frozen=True)
class WindowBatch(Sequence[np.ndarray]):
    """The windows of one forward pass: a view of some of a call's `TokenWindows`, by index.

    A sequence of id arrays, so code that wraps a pass (tests injecting faults) can look at its
    members; the padding reads ``windows`` and ``indices`` directly.
    """

    windows: TokenWindows
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> np.ndarray:  # type: ignore[override]
        return self.windows[int(self.indices[position])]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.windows[int(index)] for index in self.indices)

    @property
    def lengths(self) -> np.ndarray:
        offsets = self.windows.offsets
        return offsets[self.indices + 1] - offsets[self.indices]


class Padder:
    """Pads `WindowBatch` es into one array it keeps and reuses: ids, and a mask only where there is padding.

    The arrays returned are valid until the next `pad`: an engine copies what it keeps (the torch
    engine copies them to pinned memory or the GPU; on a CPU a pass is done before it returns).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self._ids = np.empty(0, dtype=np.int64)
        self._mask = np.empty(0, dtype=np.int64)

    def pad(self, batch: WindowBatch) -> tuple[np.ndarray, np.ndarray | None]:
        """int64 ids of shape members x longest, and the attention mask (1 = token), or None when every
        member has the longest length (nothing to mask: no mask built, sent or checked)."""
        lengths = batch.lengths
        rows = len(lengths)
        longest = int(lengths.max())
        if rows * longest > len(self._ids):
            self._ids = np.empty(rows * longest, dtype=np.int64)
            self._mask = np.empty(rows * longest, dtype=np.int64)
        ids = self._ids[: rows * longest].reshape(rows, longest)
        starts = batch.windows.offsets[batch.indices]
        if int(lengths.min()) == longest:
            # Rectangular: each row is a contiguous run of the flat ids.
            ids[...] = batch.windows.values[starts[:, None] + np.arange(longest)]
            return ids, None
        real = np.arange(longest) < lengths[:, None]
        # Where each real token comes from: its row's start, plus its place in the row. Boolean
        # assignment fills row by row, the order of the flat ids.
        before = np.cumsum(lengths) - lengths
        source = np.arange(int(lengths.sum())) + np.repeat(starts - before, lengths)
        ids.fill(self.pad_id)
        ids[real] = batch.windows.values[source]
        mask = self._mask[: rows * longest].reshape(rows, longest)
        np.copyto(mask, real, casting="unsafe")
        return ids, mask
