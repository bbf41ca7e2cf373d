from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sentiment.config import ModelConfig, auto_max_batch_tokens, format_validation_error, read_yaml
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
        ({"forward_max_tokens": 0}, "forward_max_tokens"),
        ({"forward_max_tokens": "lots"}, "forward_max_tokens"),
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


def test_max_batch_tokens_takes_a_count_or_auto() -> None:
    assert ModelConfig().forward_max_tokens == "auto"
    assert ModelConfig(forward_max_tokens=4096).forward_max_tokens == 4096
    assert ModelConfig.model_validate({"forward_max_tokens": "auto"}).forward_max_tokens == "auto"
    with pytest.raises(ValidationError, match="positive number of tokens or 'auto', got -5"):
        ModelConfig(forward_max_tokens=-5)


def test_auto_budget_is_small_on_a_cpu_and_large_on_a_gpu() -> None:
    # Measured on BERT-base (benchmarks/RESULTS.md): fp32 on a CPU is fastest with small batches,
    # bf16 on AMX a little larger, a GPU wants big ones.
    assert auto_max_batch_tokens("cpu", "fp32") == 1024
    assert auto_max_batch_tokens("cpu", "bf16") == 2048
    assert auto_max_batch_tokens("cuda", "bf16") == auto_max_batch_tokens("cuda", "fp16") == 16384
    assert auto_max_batch_tokens("cpu", "fp32") < auto_max_batch_tokens("cuda", "fp32")


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


def test_old_batching_names_are_read_with_a_warning_naming_the_new_ones() -> None:
    import warnings

    from deployments.args import parse_serve_args

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = {"model": {"max_batch_tokens": 2048, "max_batch_size": 8}, "batch_max_texts": 8}
        args = parse_serve_args({**old, "batch_wait_timeout_s": 0.1})
    assert (args.model.forward_max_tokens, args.model.forward_max_inputs) == (2048, 8)
    assert (args.gather_max_texts, args.gather_wait_s) == (8, 0.1)
    messages = sorted(str(warning.message) for warning in caught if warning.category is FutureWarning)
    assert messages[0].startswith("args.batch_max_texts is deprecated: it is now args.gather_max_texts")
    new_name = "model.max_batch_tokens is deprecated: it is now model.forward_max_tokens"
    assert any(message.startswith(new_name) for message in messages)
    with pytest.raises(ValueError, match=r"old name of model\.forward_max_tokens; give only forward_max_tokens"):
        ModelConfig(max_batch_tokens=1, forward_max_tokens=2)


def test_the_batch_jobs_old_batch_size_is_read_as_rows_per_call() -> None:
    import warnings

    from pipelines.args import PipelineArgs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = PipelineArgs(input="in.parquet", output="out", batch_size=256)
    assert args.rows_per_call == 256
    assert [str(w.message) for w in caught if w.category is FutureWarning] == [
        "batch.batch_size is deprecated: it is now batch.rows_per_call (the old name is read until the next release)"
    ]
