"""Map a checkpoint's id2label onto the label names users see.

Many fine-tuned checkpoints ship generic names (``LABEL_0``/``LABEL_1``, ``0``/``1``,
``NEGATIVE``/``POSITIVE``). Clients should always see the configured names (``neg``/``pos``),
whatever the checkpoint calls them; a checkpoint with specific names of its own keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from sentiment.errors import ModelLoadError

_INDEX_NAME = re.compile(r"^(?:label[_ ]?)?(\d+)$", re.IGNORECASE)
# Sentiment synonyms, by polarity index for a two-class model: 0 negative, 1 positive.
_POLARITY = {
    "neg": 0,
    "negative": 0,
    "bad": 0,
    "pos": 1,
    "positive": 1,
    "good": 1,
}


def resolve_labels(id2label: Mapping[int, str] | None, num_labels: int, configured: Sequence[str]) -> list[str]:
    """Return label names in class-index order.

    - every checkpoint name is an index-like name (``LABEL_3``, ``3``): the configured names;
    - a two-class checkpoint named by polarity (``NEGATIVE``/``POSITIVE``, ``neg``/``pos``): the
      configured names in that polarity order;
    - otherwise the checkpoint's own names, which are specific (``joy``, ``anger``...).
    """
    names = [str((id2label or {}).get(i, f"LABEL_{i}")) for i in range(num_labels)]

    index_matches = [_INDEX_NAME.match(name) for name in names]
    if all(index_matches):
        indices = [int(m.group(1)) for m in index_matches if m]
        if sorted(indices) == list(range(num_labels)):
            _require_count(num_labels, configured, names)
            return [configured[i] for i in indices]

    polarity = [_POLARITY.get(name.strip().lower()) for name in names]
    if num_labels == 2 and sorted(p for p in polarity if p is not None) == [0, 1]:
        _require_count(num_labels, configured, names)
        return [configured[p] for p in polarity if p is not None]

    if len(set(names)) != num_labels:
        raise ModelLoadError(f"checkpoint id2label has duplicate names: {names}")
    return names


def _require_count(num_labels: int, configured: Sequence[str], names: list[str]) -> None:
    if len(configured) != num_labels:
        raise ModelLoadError(
            f"the checkpoint has {num_labels} classes with generic names {names}, but labels has "
            f"{len(configured)} names {list(configured)}; set labels to {num_labels} names in class order"
        )
