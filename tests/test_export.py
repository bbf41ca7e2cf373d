"""`sentiment export` and the local cache of exports: the directory, its manifest, and when it is remade."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import onnxruntime
import pytest

from ray_sentiment.cli import main
from sentiment import export
from sentiment.config import ModelConfig
from sentiment.errors import ModelLoadError
from sentiment.export import cache_key, cached_export, content_sha256, export_checkpoint
from sentiment.exported import FORMAT, Manifest, read_manifest, write_manifest
from sentiment.loading import checkpoint_files
from sentiment.model import SentimentClassifier


def test_an_export_is_a_self_contained_directory_with_a_manifest(tiny_onnx: Path, tiny_checkpoint: Path) -> None:
    assert {path.name for path in tiny_onnx.iterdir()} == {
        "model.onnx",
        "manifest.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert (tiny_onnx / "config.json").read_bytes() == (tiny_checkpoint / "config.json").read_bytes()
    manifest = read_manifest(tiny_onnx)
    assert manifest.source == str(tiny_checkpoint)
    assert manifest.source_revision is None
    assert manifest.source_sha256 == content_sha256(checkpoint_files(tiny_checkpoint))
    assert (manifest.dtype, manifest.opset, manifest.onnxruntime_version) == ("fp32", 17, onnxruntime.__version__)
    assert manifest.quantization is None
    # ONNX Runtime's BERT fusions: each of the two layers is one Attention, two SkipLayerNormalization, a BiasGelu.
    assert manifest.fused_operators == {
        "EmbedLayerNormalization": 1,
        "Attention": 2,
        "SkipLayerNormalization": 4,
        "BiasGelu": 2,
    }
    assert manifest.max_abs_logit_diff is not None
    assert manifest.max_abs_logit_diff < 1e-4


def test_the_manifest_round_trips(tiny_onnx_int8: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny_onnx_int8)
    assert manifest.dtype == "int8"
    assert manifest.quantization == {"method": "quantize_dynamic", **export.QUANTIZATION}
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


def test_a_manifest_of_another_format_or_without_a_field_is_named(tiny_onnx: Path, tmp_path: Path) -> None:
    data = read_manifest(tiny_onnx).to_dict()
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format": "other/9"}))
    says = f"{tmp_path / 'manifest.json'} has format 'other/9'; this version reads {FORMAT!r}"
    with pytest.raises(ModelLoadError, match=re.escape(says)):
        read_manifest(tmp_path)
    del data["opset"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match=re.escape("manifest.json lacks opset")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match=re.escape("manifest.json is missing")):
        read_manifest(tmp_path)


def test_int8_on_a_torch_checkpoint_exports_once_into_the_cache_and_reuses_it(
    tiny_checkpoint: Path, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ModelConfig(model_id=str(tiny_checkpoint), dtype="int8")
    first = SentimentClassifier(config)
    assert (first.backend, first.dtype) == ("onnxruntime", "int8")
    (entry,) = [path for path in onnx_cache.iterdir() if path.name.startswith("tiny-int8-")]
    assert read_manifest(entry).source == str(tiny_checkpoint)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_checkpoint", refuse)
    assert cached_export(config, "int8") == entry
    assert SentimentClassifier(config).predict(["a good film"])[0].scores == first.predict(["a good film"])[0].scores


def test_the_cache_key_follows_content_precision_and_onnx_runtime(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sha = content_sha256(checkpoint_files(tiny_checkpoint))
    keys = {cache_key(sha, "int8", "1.32.0"), cache_key(sha, "fp32", "1.32.0"), cache_key(sha, "int8", "1.33.0")}
    assert len(keys) == 3
    # The same files elsewhere are the same checkpoint; one changed byte is another.
    moved = Path(shutil.copytree(tiny_checkpoint, tmp_path / "elsewhere"))
    (moved / "training_log.md").write_text("not part of the model")
    assert content_sha256(checkpoint_files(moved)) == sha
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.2}))
    assert content_sha256(checkpoint_files(moved)) != sha


def test_a_checkpoint_that_cannot_be_exported_fails_naming_the_model_and_the_reason(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "broken"))
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    says = f"cannot export model '{broken}' to ONNX: could not load model"
    with pytest.raises(ModelLoadError, match=re.escape(says)):
        export_checkpoint(ModelConfig(model_id=str(broken)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["broken"]


def test_an_export_is_not_exported_again_and_a_full_directory_is_kept(tiny_onnx: Path, tiny_checkpoint: Path) -> None:
    before = read_manifest(tiny_onnx)
    with pytest.raises(ModelLoadError, match="is an ONNX export already"):
        export_checkpoint(ModelConfig(model_id=str(tiny_onnx)), tiny_onnx.parent / "again")
    with pytest.raises(ModelLoadError, match="exists and is not empty; choose a new directory or pass --overwrite"):
        export_checkpoint(ModelConfig(model_id=str(tiny_checkpoint)), tiny_onnx)
    assert read_manifest(tiny_onnx) == before


def test_export_command_writes_a_directory_predict_runs(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    assert main(["export", str(tiny_checkpoint), str(out), "--dtype", "int8"]) == 0
    printed = capsys.readouterr().out
    assert f"Exported {tiny_checkpoint} (int8) to {out}" in printed
    assert "Attention 2" in printed
    assert main(["predict", "--model", str(out), "a wonderful film"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("neg", "pos")
    assert main(["export", str(tiny_checkpoint), str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err


def test_exporting_without_the_onnx_package_says_how_to_install_it(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ModelLoadError, match=re.escape("needs the onnx package: pip install 'ray-sentiment[onnx]'")):
        export_checkpoint(ModelConfig(model_id=str(tiny_checkpoint)), tmp_path / "out")
