from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sentiment.config import ModelConfig, format_validation_error, read_yaml
from sentiment.errors import InvalidInputError


def test_defaults_are_the_imdb_model_with_head_tail() -> None:
    config = ModelConfig()
    assert config.model_id == "lvwerra/bert-imdb"
    assert config.labels == ["neg", "pos"]
    assert (config.long_text, config.head_tokens, config.max_length) == ("head_tail", 128, 512)
    assert (config.device, config.dtype) == ("auto", "auto")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"dtype": "fp8"}, "dtype"),
        ({"long_text": "middle"}, "long_text"),
        ({"device": "tpu"}, "device"),
        ({"max_batch_tokens": 0}, "max_batch_tokens"),
        ({"labels": ["neg", "neg"]}, "labels"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ({"modle_id": "x"}, "modle_id"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError) as info:
        ModelConfig(**fields)  # type: ignore[arg-type]
    message = format_validation_error(info.value, prefix="model.")
    assert message.startswith(f"model.{named}:")


def test_read_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(InvalidInputError, match=str(bad)):
        read_yaml(bad)
    with pytest.raises(InvalidInputError, match="cannot read config file"):
        read_yaml(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(InvalidInputError, match="mapping"):
        read_yaml(listing)
