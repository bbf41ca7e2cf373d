"""Loading checkpoints: safe formats only, clear failures."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from sentiment.config import ModelConfig
from sentiment.errors import ModelLoadError
from sentiment.model import SentimentClassifier
from sentiment.testing import make_checkpoint


def test_bin_only_checkpoint_loads_through_weights_only(checkpoints: Path, classifier: SentimentClassifier) -> None:
    path = make_checkpoint(checkpoints / "bin-only", safe_serialization=False)
    assert not list(path.glob("*.safetensors"))
    old = SentimentClassifier(ModelConfig(model_id=str(path)))
    # Same seed as the safetensors fixture: same weights, same answers.
    assert old.predict(["a good film"])[0].scores == pytest.approx(classifier.predict(["a good film"])[0].scores)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("touch EXPLOITED",))


def test_pickle_with_code_is_refused_and_never_run(
    checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_checkpoint(checkpoints / "malicious", safe_serialization=False)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["exploit"] = _Exploit()
    with open(path / "pytorch_model.bin", "wb") as handle:
        pickle.dump(state, handle)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load model"):
        SentimentClassifier(ModelConfig(model_id=str(path)))
    assert not (tmp_path / "EXPLOITED").exists()


def test_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model directory .*nowhere does not exist"):
        SentimentClassifier(ModelConfig(model_id=str(tmp_path / "nowhere")))


def test_unreachable_hub_model_explains_how_to_run_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        SentimentClassifier(ModelConfig(model_id="no-such-org/no-such-model", local_files_only=True))
    # The last line names the model, the cause and the fix.
    last = str(info.value).splitlines()[-1]
    assert last.startswith("could not load model 'no-such-org/no-such-model': ")
    assert "--local-dir <dir>" in last
    assert "HF_HUB_OFFLINE=1" in last


def test_checkpoint_code_is_never_trusted(checkpoints: Path) -> None:
    path = make_checkpoint(checkpoints / "remote-code", seed=4)
    config = (path / "config.json").read_text()
    (path / "config.json").write_text(
        config.replace('"model_type"', '"auto_map": {"AutoModelForSequenceClassification": "evil.Model"}, "model_type"')
    )
    (path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    # auto_map is ignored without trust_remote_code: the stock BERT class loads.
    classifier = SentimentClassifier(ModelConfig(model_id=str(path)))
    assert type(classifier.model).__name__ == "BertForSequenceClassification"


def test_cuda_device_without_a_gpu_is_a_clear_error(tiny_checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="sees no CUDA GPU"):
        SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cuda"))


def test_fetch_checks_a_local_directory_without_loading_its_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from sentiment.loading import fetch_checkpoint

    assert fetch_checkpoint(ModelConfig(model_id=str(tiny_checkpoint))) == tiny_checkpoint.resolve()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"no weights \(model.safetensors or pytorch_model.bin\)"):
        fetch_checkpoint(ModelConfig(model_id=str(no_weights)))


def test_fetch_finds_a_hub_checkpoint_in_the_cache_offline_and_names_model_and_fix_when_absent(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With HF_HUB_OFFLINE=1 (conftest), a hub id resolves from the cache, laid out as the hub writes it."""
    from huggingface_hub import constants

    from sentiment.loading import fetch_checkpoint

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-imdb"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    assert fetch_checkpoint(ModelConfig(model_id="someone/tiny-imdb")) == snapshot
    with pytest.raises(ModelLoadError) as missing:
        fetch_checkpoint(ModelConfig(model_id="someone/not-downloaded"))
    last = str(missing.value).splitlines()[-1]
    assert last.startswith("could not load model 'someone/not-downloaded': LocalEntryNotFoundError")
    assert "--local-dir" in last
    assert "HF_HUB_OFFLINE=1" in last


def test_parameter_count_from_the_config_alone_is_close_to_the_model(tiny_checkpoint: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipelines.plan import PROCESS_BYTES, actor_bytes
    from sentiment.loading import parameter_count

    large = AutoConfig.for_model(
        "bert", hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16
    )
    for config in (AutoConfig.from_pretrained(tiny_checkpoint), large):
        exact = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
        estimate = parameter_count(config)
        assert estimate is not None
        assert abs(estimate - exact) / exact < 0.02, (estimate, exact)
    # BERT-large: 335 M parameters, 1.25 GiB in fp32.
    estimate = parameter_count(large)
    assert estimate is not None
    assert 1.2 * 2**30 < estimate * 4 < 1.3 * 2**30
    tiny = ModelConfig(model_id=str(tiny_checkpoint))
    tiny_parameters = parameter_count(AutoConfig.from_pretrained(tiny_checkpoint))
    assert tiny_parameters is not None
    assert actor_bytes(tiny) == tiny_parameters * 4 + PROCESS_BYTES
    assert actor_bytes(tiny.model_copy(update={"dtype": "bf16"})) == tiny_parameters * 2 + PROCESS_BYTES
    assert parameter_count(object()) is None  # not BERT-shaped: the pool is not capped by memory
