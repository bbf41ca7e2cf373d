from __future__ import annotations

import re
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


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"dtype": "int8", "device": "cuda"}, "dtype int8 runs on the CPU (ONNX Runtime), not on device 'cuda'; use"),
        ({"dtype": "int8", "device": "cuda:1"}, "or dtype auto (bf16 or fp16) on a GPU"),
        ({"dtype": "int8", "backend": "torch"}, "dtype int8 runs on ONNX Runtime only; use backend 'onnxruntime'"),
        ({"backend": "onnxruntime", "dtype": "bf16"}, "backend onnxruntime runs fp32 or int8, not bf16; use"),
        ({"backend": "onnxruntime", "device": "cuda"}, "backend onnxruntime runs on the CPU, not on device 'cuda'"),
    ],
)
def test_an_engine_that_cannot_run_what_is_asked_is_refused_saying_what_to_use(
    fields: dict[str, str], says: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        ModelConfig(**fields)  # type: ignore[arg-type]


def test_int8_and_onnx_runtime_take_the_cpu() -> None:
    assert ModelConfig(dtype="int8").backend == "auto"
    assert ModelConfig(dtype="int8", device="cpu", backend="onnxruntime").dtype == "int8"
    assert ModelConfig(backend="onnxruntime", dtype="fp32", device="auto").device == "auto"


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


def test_unreleased_batching_names_are_unknown_fields() -> None:
    from deployments.args import parse_serve_args
    from pipelines.args import parse_pipeline_args

    with pytest.raises(InvalidInputError, match=r"model\.max_batch_tokens: Extra inputs are not permitted"):
        parse_serve_args({"model": {"max_batch_tokens": 2048}})
    with pytest.raises(InvalidInputError, match=r"batch_max_texts: Extra inputs are not permitted"):
        parse_serve_args({"batch_max_texts": 8})
    with pytest.raises(InvalidInputError, match=r"batch\.batch_size: Extra inputs are not permitted"):
        parse_pipeline_args({"input": "in.parquet", "output": "out", "batch_size": 256})
