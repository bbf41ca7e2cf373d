from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipelines.cli import resume_command
from pipelines.errors import RunFailedError
from ray_sentiment.cli import main
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier


def test_predict_prints_one_json_object_per_text(
    tiny_checkpoint: Path, classifier: SentimentClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a wonderful film", "the worst movie"]
    assert main(["predict", *texts, "--model", str(tiny_checkpoint)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == [p.label for p in classifier.predict(texts)]
    assert set(lines[0]) == {"label", "score", "scores", "num_tokens", "truncated"}


def test_predict_refuses_an_empty_text_as_http_and_batch_do(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "a wonderful film", " ", "--model", str(tiny_checkpoint)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "texts[1] is empty" in captured.err


def test_flags_override_the_config_file(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  model_id: {tiny_checkpoint}\n  long_text: head\n  max_length: 64\n")
    long_text = " ".join(["film"] * 100)
    assert main(["predict", long_text, "--config", str(config), "--long-text", "tail", "--echo"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), long_text="tail", max_length=64))
    assert line["text"] == long_text
    assert line["score"] == pytest.approx(expected.predict([long_text])[0].score, abs=1e-6)
    assert line["truncated"] is True


def test_bad_config_value_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  forward_max_tokens: -1\n")
    assert main(["predict", "x", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model.forward_max_tokens: Value error, forward_max_tokens must be a positive number of tokens" in err


def test_missing_model_directory_exits_1_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "x", "--model", str(tmp_path / "absent")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_max_batch_tokens_flag_takes_a_count_or_auto(tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("auto", "700"):
        assert main(["predict", "a good film", "--model", str(tiny_checkpoint), "--forward-max-tokens", value]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["predict", "a good film", "--model", str(tiny_checkpoint), "--forward-max-tokens", "lots"])
    assert info.value.code == 2
    assert "expected an integer or 'auto', got 'lots'" in capsys.readouterr().err


def test_every_model_config_field_has_a_flag_with_its_type_and_choices() -> None:
    from ray_sentiment.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["predict", "x", "--model", "m", "--head-tokens", "64", "--labels", "bad,good", "--no-local-files-only"]
    )
    for field in ModelConfig.model_fields:
        assert field in args._model_flags.values()
    assert (args.model, args.head_tokens, args.labels, args.local_files_only) == ("m", 64, ["bad", "good"], False)
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "x", "--dtype", "fp8"])


def test_a_new_field_makes_its_flag_appear_with_no_cli_change() -> None:
    import argparse
    from typing import Literal

    from pydantic import Field

    from sentiment.flags import add_flags, flag_values

    class Extended(ModelConfig):
        pool: Literal["mean", "cls"] = Field("cls", description="How to pool.")
        warmup_tokens: int | Literal["auto"] = Field("auto", description="Warm-up length.")
        scale: float | None = Field(None, description="A factor.")

    parser = argparse.ArgumentParser()
    dests = add_flags(parser, Extended, names={"model_id": "model"})
    args = parser.parse_args(["--pool", "mean", "--warmup-tokens", "128", "--scale", "0.5", "--model", "m"])
    assert flag_values(args, dests) == {"pool": "mean", "warmup_tokens": 128, "scale": 0.5, "model_id": "m"}
    assert flag_values(parser.parse_args(["--warmup-tokens", "auto"]), dests) == {"warmup_tokens": "auto"}


def test_predict_on_an_onnx_export_gives_torchs_scores(
    tiny_onnx: Path, classifier: SentimentClassifier, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a wonderful film", "the worst movie", " ".join(["boring"] * 700)]
    assert main(["predict", *texts, "--model", str(tiny_onnx)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line, want in zip(lines, classifier.predict(texts), strict=True):
        assert line["label"] == want.label
        assert line["scores"]["pos"] == pytest.approx(want.scores["pos"], abs=1e-4)


def test_predict_with_dtype_int8_runs_onnx_runtime_on_a_torch_checkpoint(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "a wonderful film", "--model", str(tiny_checkpoint), "--dtype", "int8"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sum(line["scores"].values()) == pytest.approx(1.0, abs=1e-6)


def test_int8_on_a_gpu_is_refused_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "x", "--model", "./absent", "--dtype", "int8", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "model: Value error, dtype int8 runs on the CPU (ONNX Runtime), not on device 'cuda'; use device" in err


def test_a_failed_batch_run_exits_3_with_one_line_naming_the_command_that_continues(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pipelines.batch

    given: dict[str, Any] = {}

    def failing_run(args: Any, progress_interval_s: float, resume_command: str | None) -> Any:
        given["resume_command"] = resume_command
        raise RunFailedError(f"stage 'model' failed: ValueError: boom; then continue with: {resume_command}")

    monkeypatch.setattr(pipelines.batch, "run", failing_run)
    argv = ["batch", "in dir", "out", "--model", "m", "--overwrite", "--rows-per-call", "16"]
    assert main(argv) == 3
    # The same words, but --resume for --overwrite (which would start over); quoted for a shell.
    assert given["resume_command"] == "sentiment batch 'in dir' out --model m --rows-per-call 16 --resume"
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        "sentiment batch: error: stage 'model' failed: ValueError: boom; then continue with: "
        "sentiment batch 'in dir' out --model m --rows-per-call 16 --resume"
    )
    assert resume_command(["batch", "in", "out", "--resume"]) == "sentiment batch in out --resume"
