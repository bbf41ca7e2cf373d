from __future__ import annotations

import pytest

from sentiment.errors import ModelLoadError
from sentiment.labels import resolve_labels

CONFIGURED = ["neg", "pos"]


@pytest.mark.parametrize(
    "id2label",
    [
        {0: "LABEL_0", 1: "LABEL_1"},
        {0: "0", 1: "1"},
        {0: "NEGATIVE", 1: "POSITIVE"},
        {0: "negative", 1: "positive"},
        {0: "neg", 1: "pos"},
        None,
    ],
)
def test_generic_names_map_to_configured_labels(id2label: dict[int, str] | None) -> None:
    assert resolve_labels(id2label, 2, CONFIGURED) == ["neg", "pos"]


def test_polarity_names_follow_the_checkpoint_order() -> None:
    assert resolve_labels({0: "POSITIVE", 1: "NEGATIVE"}, 2, CONFIGURED) == ["pos", "neg"]


def test_index_names_follow_their_numbers() -> None:
    assert resolve_labels({0: "LABEL_1", 1: "LABEL_0"}, 2, CONFIGURED) == ["pos", "neg"]


def test_specific_names_are_kept() -> None:
    assert resolve_labels({0: "joy", 1: "anger", 2: "fear"}, 3, CONFIGURED) == ["joy", "anger", "fear"]


def test_generic_names_with_a_different_class_count_fail_naming_labels() -> None:
    with pytest.raises(ModelLoadError, match=r"3 classes .* labels has 2 names"):
        resolve_labels({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, 3, CONFIGURED)
