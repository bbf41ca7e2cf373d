"""The forward-pass seam: the classifier over any engine, and the two engines behind it.

One code path above the seam (tokenizing, long-review windows, token-budget batches, the OOM split,
labels); below it, `TorchEngine` and `OnnxRuntimeEngine` must give the same probabilities (fp32,
within 1e-4) and ONNX Runtime must never need torch.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sentiment.config import ModelConfig
from sentiment.devices import available_cpus
from sentiment.encoding import EncodedText
from sentiment.engines import OnnxRuntimeEngine, TorchEngine, backend_of
from sentiment.errors import DeviceMemoryError, ModelLoadError
from sentiment.model import SentimentClassifier, softmax
from sentiment.packing import TokenWindows
from sentiment.testing import WORDS


def reviews(count: int, seed: int = 3) -> list[str]:
    """Texts of 1 to 900 words: short, mid and over the 512-token limit (cut, or split into chunks)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice((1, 12, 60, 300, 900)))) for _ in range(count)]


TEXTS = reviews(40)


def scores(predictions: list[Any]) -> np.ndarray:
    return np.array([[p.scores["neg"], p.scores["pos"]] for p in predictions])


@pytest.fixture(scope="module")
def onnx_classifier(tiny_onnx: Path) -> SentimentClassifier:
    return SentimentClassifier(ModelConfig(model_id=str(tiny_onnx)))


# -- the two engines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("long_text", ["head_tail", "chunks"])
def test_onnx_runtime_fp32_gives_torchs_probabilities_within_1e4(
    classifier: SentimentClassifier, onnx_classifier: SentimentClassifier, long_text: str
) -> None:
    want = classifier.predict(TEXTS, long_text=long_text)  # type: ignore[arg-type]
    got = onnx_classifier.predict(TEXTS, long_text=long_text)  # type: ignore[arg-type]
    assert isinstance(classifier.engine, TorchEngine)
    assert isinstance(onnx_classifier.engine, OnnxRuntimeEngine)
    assert np.abs(scores(got) - scores(want)).max() <= 1e-4
    assert [p.label for p in got] == [p.label for p in want]
    assert [(p.num_tokens, p.truncated) for p in got] == [(p.num_tokens, p.truncated) for p in want]


def test_an_export_tokenizes_as_its_checkpoint_without_transformers(
    classifier: SentimentClassifier, onnx_classifier: SentimentClassifier
) -> None:
    assert onnx_classifier.encode(TEXTS, "chunks") == classifier.encode(TEXTS, "chunks")
    assert (onnx_classifier.labels, onnx_classifier.max_length, onnx_classifier._pad_id) == (
        classifier.labels,
        classifier.max_length,
        classifier._pad_id,
    )


def test_int8_runs_through_the_same_code_path(tiny_onnx_int8: Path, classifier: SentimentClassifier) -> None:
    int8 = SentimentClassifier(ModelConfig(model_id=str(tiny_onnx_int8)))
    assert (int8.backend, int8.dtype, int8.device) == ("onnxruntime", "int8", "cpu")
    got, want = int8.predict(TEXTS), classifier.predict(TEXTS)
    assert [(p.num_tokens, p.truncated) for p in got] == [(p.num_tokens, p.truncated) for p in want]
    assert scores(got).sum(axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-6)
    # Random weights: only that int8 stays near fp32. Fidelity on a trained model is benchmarks.engines.
    assert np.abs(scores(got) - scores(want)).max() < 0.2


def test_describe_says_which_backend_runs(onnx_classifier: SentimentClassifier) -> None:
    info = onnx_classifier.describe()
    assert (info["backend"], info["dtype"], info["device"]) == ("onnxruntime", "fp32", "cpu")
    assert info["gpu_memory_cap_bytes"] is None
    assert onnx_classifier.peak_gpu_memory_bytes() is None
    with pytest.raises(AttributeError, match="backend onnxruntime has no torch model"):
        _ = onnx_classifier.model


def test_an_export_runs_without_importing_torch(tiny_onnx: Path) -> None:
    code = f"""
import sys
from ray_sentiment.cli import main
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
classifier = SentimentClassifier(ModelConfig(model_id={str(tiny_onnx)!r}))
assert classifier.predict(["a wonderful film", {" ".join(WORDS)!r}])[0].label in ("neg", "pos")
assert main(["predict", "--model", {str(tiny_onnx)!r}, "the worst movie"]) == 0
print(sorted(m for m in ("torch", "transformers") if m in sys.modules), file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"
    assert '"label"' in result.stdout


# -- which engine, and what it may run on ------------------------------------------------------------


def test_backend_auto_runs_an_export_on_onnx_runtime_and_a_checkpoint_on_torch(
    tiny_onnx: Path, tiny_checkpoint: Path
) -> None:
    assert backend_of(ModelConfig(model_id=str(tiny_onnx))) == "onnxruntime"
    assert backend_of(ModelConfig(model_id=str(tiny_checkpoint))) == "torch"
    assert backend_of(ModelConfig(model_id=str(tiny_checkpoint), dtype="int8")) == "onnxruntime"
    with pytest.raises(ModelLoadError, match=r"is an ONNX export .* use backend 'onnxruntime' or 'auto'"):
        SentimentClassifier(ModelConfig(model_id=str(tiny_onnx), backend="torch"))


def test_an_export_keeps_its_precision(tiny_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"fp32 ONNX export; use dtype 'auto' or 'fp32'.*--dtype int8"):
        SentimentClassifier(ModelConfig(model_id=str(tiny_onnx), dtype="int8"))


def test_onnx_runtime_refuses_a_process_that_ray_gave_a_gpu(tiny_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"Ray reserved GPU ids \['0'\] .* num_gpus 0"):
        SentimentClassifier(ModelConfig(model_id=str(tiny_onnx)), reserved_gpus=["0"])


def test_a_corrupt_model_onnx_fails_at_load_naming_the_file(tiny_onnx: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    (broken / "model.onnx").write_bytes(b"not a protobuf" * 100)
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load the ONNX model {broken / 'model.onnx'}: ")):
        SentimentClassifier(ModelConfig(model_id=str(broken)))


def test_a_session_uses_the_threads_it_is_given_and_never_more_than_the_cpus(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ModelConfig(model_id=str(tiny_onnx))
    one = SentimentClassifier(config, threads=1)
    assert isinstance(one.engine, OnnxRuntimeEngine)
    assert one.engine.session.get_session_options().intra_op_num_threads == 1
    assert one.describe()["threads"] == 1
    assert SentimentClassifier(config, threads=10_000).describe()["threads"] == available_cpus()
    # In a Ray actor, threads default to what Ray set from its num_cpus, as torch's do.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert SentimentClassifier(config).describe()["threads"] == 1


# -- the seam itself ---------------------------------------------------------------------------------


class OutOfScriptedMemory(Exception):
    pass


class ScriptedEngine:
    """An engine whose logits are known: [longest real length, number of the row's first token]."""

    backend = "scripted"
    device = "cpu"
    dtype = "fp32"
    threads = 1
    memory_errors: tuple[type[BaseException], ...] = (OutOfScriptedMemory,)

    def __init__(self, fits: int = 10_000) -> None:
        self.fits = fits
        self.calls: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.read_backs: list[int] = []
        self.released = 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        # The classifier reuses its arrays for the next pass: keep copies.
        self.calls.append((input_ids.copy(), None if attention_mask is None else attention_mask.copy()))
        if len(input_ids) > self.fits:
            raise OutOfScriptedMemory
        lengths = np.full(len(input_ids), input_ids.shape[1]) if attention_mask is None else attention_mask.sum(axis=1)
        return np.stack([lengths / 100, input_ids[:, 1] / 100], axis=1).astype(np.float32)

    def to_numpy(self, logits: list[np.ndarray]) -> np.ndarray:
        self.read_backs.append(len(logits))
        return np.concatenate(logits)

    def release_memory(self) -> None:
        self.released += 1

    def peak_memory_bytes(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"threads": 1, "gpu_memory_fraction": None, "gpu_memory_cap_bytes": None}


def test_the_classifier_pads_batches_and_takes_probabilities_whatever_engine_runs(tiny_checkpoint: Path) -> None:
    engine = ScriptedEngine()
    config = ModelConfig(model_id=str(tiny_checkpoint), forward_max_tokens=64, forward_max_inputs=4)
    classifier = SentimentClassifier(config, engine=engine)
    assert (classifier.backend, classifier.describe()["backend"]) == ("scripted", "scripted")
    texts = ["good", "a bad film", "the film was good and the acting was great", "dull"]
    encoded = classifier.encode(texts)
    predictions = classifier.predict(texts)
    assert any(mask is not None for _, mask in engine.calls)
    for ids, mask in engine.calls:
        assert ids.shape[0] * ids.shape[1] <= 64
        if mask is None:
            continue
        assert ids.dtype == mask.dtype == np.int64
        assert ids.shape == mask.shape
        assert (ids[mask == 0] == classifier._pad_id).all()
    for text, prediction in zip(encoded, predictions, strict=True):
        (window,) = text.windows
        want = softmax(np.array([[len(window) / 100, window[1] / 100]]))[0]
        assert [prediction.scores["neg"], prediction.scores["pos"]] == pytest.approx(want.tolist(), abs=1e-6)


def test_an_engines_memory_error_halves_the_batch_down_to_what_fits(tiny_checkpoint: Path) -> None:
    config = ModelConfig(model_id=str(tiny_checkpoint), forward_max_tokens=4096, forward_max_inputs=8)
    whole = SentimentClassifier(config, engine=ScriptedEngine()).predict(TEXTS[:8])
    engine = ScriptedEngine(fits=2)
    split = SentimentClassifier(config, engine=engine)
    assert scores(split.predict(TEXTS[:8])) == pytest.approx(scores(whole), abs=1e-6)
    assert split.oom_splits > 0
    assert engine.released > 0
    assert max(len(ids) for ids, _ in engine.calls if len(ids) <= 2) == 2

    nothing_fits = SentimentClassifier(config, engine=ScriptedEngine(fits=0))
    assert all(isinstance(result, DeviceMemoryError) for result in nothing_fits.predict_encoded(split.encode(["x"])))


def test_a_batch_without_padding_goes_without_a_mask_and_a_call_reads_its_logits_back_once(
    tiny_checkpoint: Path,
) -> None:
    engine = ScriptedEngine()
    config = ModelConfig(model_id=str(tiny_checkpoint), forward_max_tokens=64, forward_max_inputs=2)
    classifier = SentimentClassifier(config, engine=engine)
    # Two of 6 tokens, then one of 5 beside one of 3: one pass without padding, one with.
    windows = [[101, 7, 8, 9, 10, 102], [101, 5, 5, 5, 5, 102], [101, 4, 4, 102], [101, 3, 3, 3, 102]]
    probabilities = classifier.forward(windows)
    assert [(ids.tolist(), None if mask is None else mask.tolist()) for ids, mask in engine.calls] == [
        ([[101, 7, 8, 9, 10, 102], [101, 5, 5, 5, 5, 102]], None),
        ([[101, 3, 3, 3, 102], [101, 4, 4, 102, classifier._pad_id]], [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    ]
    # Every pass of the call, read back together.
    assert engine.read_backs == [2]
    want = softmax(np.array([[len(w) / 100, w[1] / 100] for w in windows]))
    np.testing.assert_allclose(probabilities, want, atol=1e-6)


def test_texts_average_their_windows_and_a_text_that_does_not_fit_fails_alone(tiny_checkpoint: Path) -> None:
    config = ModelConfig(model_id=str(tiny_checkpoint), forward_max_tokens=4096, forward_max_inputs=8)
    classifier = SentimentClassifier(config, engine=ScriptedEngine())
    windows = [[101, 2, 102], [101, 4, 4, 102], [101, 9, 102], [101, 6, 6, 6, 6, 102], [101, 1, 102]]
    rows = softmax(np.array([[len(w) / 100, w[1] / 100] for w in windows]))
    scores = classifier.score_windows(TokenWindows.from_lists(windows), np.array([2, 1, 2]))
    np.testing.assert_allclose(scores.probabilities, [rows[:2].mean(0), rows[2], rows[3:].mean(0)], atol=1e-7)
    assert scores.failed.tolist() == [False, False, False]
    assert scores.longest.tolist() == [4, 3, 6]

    # Passes of more than one window run out of memory, as does any window over 5 tokens: only text 2 fails.
    class Small(ScriptedEngine):
        def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
            if input_ids.shape[1] > 5:
                raise OutOfScriptedMemory
            return super().forward(input_ids, attention_mask)

    small = SentimentClassifier(config, engine=Small(fits=1))
    scores = small.score_windows(TokenWindows.from_lists(windows), np.array([2, 1, 2]))
    assert scores.failed.tolist() == [False, False, True]
    np.testing.assert_allclose(scores.probabilities[:2], [rows[:2].mean(0), rows[2]], atol=1e-7)
    assert scores.probabilities[2].tolist() == [0.0, 0.0]
    (_, _, failed) = small.predict_encoded(
        [EncodedText(windows[:2], 7, False), EncodedText(windows[2:3], 3, False), EncodedText(windows[3:], 9, True)]
    )
    assert isinstance(failed, DeviceMemoryError)
    assert str(failed).startswith("an input of 6 tokens does not fit in cpu memory even alone")


# -- the torch engine --------------------------------------------------------------------------------


def test_a_process_that_reserved_a_gpu_torch_cannot_use_fails_at_start_unless_told_to_run_on_the_cpu(
    tiny_checkpoint: Path,
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the reserved GPU is usable")
    config = ModelConfig(model_id=str(tiny_checkpoint))
    with pytest.raises(ModelLoadError, match=r"reserved GPU ids \['0'\] from Ray but torch sees no CUDA device: "):
        SentimentClassifier(config, reserved_gpus=["0"])
    fallback = SentimentClassifier(config.model_copy(update={"gpu_fallback": "cpu"}), reserved_gpus=["0"])
    assert (fallback.device, fallback.dtype) == ("cpu", "fp32")


def test_the_prepared_attention_mask_gives_what_transformers_own_mask_gives(classifier: SentimentClassifier) -> None:
    import torch

    engine = classifier.engine
    assert isinstance(engine, TorchEngine)
    ids = np.array([[101, 7, 8, 9, 102], [101, 4, 102, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    got = engine.to_numpy([engine.forward(ids, mask)])
    with torch.inference_mode():
        want = engine.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    # And no mask at all where nothing is padded.
    got = engine.to_numpy([engine.forward(ids[:1].copy(), None)])
    with torch.inference_mode():
        want = engine.model(input_ids=torch.from_numpy(ids[:1])).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


# Inductor's CPU path imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.timeout(900)
def test_torch_compile_runs_and_matches_eager(tiny_checkpoint: Path, classifier: SentimentClassifier) -> None:
    compiled = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cpu", compile=True))
    assert compiled.describe()["compile"] is True
    try:
        got = compiled.predict(TEXTS[:12])
    except Exception as exc:  # no C++ compiler, an unsupported platform: what compile needs is missing here
        if "torch._dynamo" in type(exc).__module__ or "torch._inductor" in type(exc).__module__:
            pytest.skip(f"torch.compile cannot run here: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    want = classifier.predict(TEXTS[:12])
    assert np.abs(scores(got) - scores(want)).max() <= 1e-4


# -- on a real card (skipped where torch sees no CUDA device) ----------------------------------------


@pytest.mark.gpu
@pytest.mark.usefixtures("uncapped_cuda")
def test_a_memory_fraction_caps_this_process_to_that_share_of_the_card(tiny_checkpoint: Path) -> None:
    import torch

    engine = TorchEngine(ModelConfig(model_id=str(tiny_checkpoint), device="cuda", gpu_memory_fraction=0.25))
    total = torch.cuda.get_device_properties(engine.torch_device).total_memory
    assert engine.device == "cuda:0"
    assert engine.gpu_memory_cap_bytes == int(0.25 * total)
    assert torch.cuda.get_per_process_memory_fraction(engine.torch_device) == pytest.approx(0.25)


@pytest.mark.gpu
def test_on_the_card_logits_stay_on_the_device_until_the_one_read_back(tiny_checkpoint: Path) -> None:
    engine = TorchEngine(ModelConfig(model_id=str(tiny_checkpoint), device="cuda", dtype="fp32"))
    ids = np.array([[101, 7, 8, 102], [101, 4, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    first = engine.forward(ids, mask)
    ids[:] = 0  # the classifier refills its array at once: the engine must have taken a copy
    second = engine.forward(ids[:1, :3].copy(), None)
    assert (first.device.type, second.device.type) == ("cuda", "cuda")
    logits = engine.to_numpy([first, second])
    assert logits.shape == (3, 2)
    cpu = TorchEngine(ModelConfig(model_id=str(tiny_checkpoint), device="cpu"))
    want = cpu.to_numpy([cpu.forward(np.array([[101, 7, 8, 102], [101, 4, 102, 0]]), mask)])
    np.testing.assert_allclose(logits[:2], want, atol=1e-4)
