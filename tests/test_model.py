"""Behaviour of the shared classifier on tiny real checkpoints."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sentiment.config import ModelConfig
from sentiment.errors import DeviceMemoryError, InvalidInputError
from sentiment.model import Prediction, SentimentClassifier, plan_batches
from sentiment.testing import WORDS, make_checkpoint

STRATEGIES = ("head", "tail", "head_tail", "chunks")
BATCHINGS = [
    {"forward_max_tokens": 16384, "forward_max_inputs": 64},
    {"forward_max_tokens": 3000, "forward_max_inputs": 200},
    {"forward_max_tokens": 1024, "forward_max_inputs": 8},
    {"forward_max_tokens": 512, "forward_max_inputs": 1},
    {"forward_max_tokens": 1, "forward_max_inputs": 1},
]


def make_texts(count_short: int, count_mid: int, count_long: int, seed: int = 0) -> list[str]:
    """Reviews of known token counts: every word of WORDS is one token of the test vocab."""
    rng = random.Random(seed)
    lengths = (
        [rng.randint(1, 40) for _ in range(count_short)]
        + [rng.randint(280, 320) for _ in range(count_mid)]
        + [rng.randint(520, 1200) for _ in range(count_long)]
    )
    rng.shuffle(lengths)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


TEXTS = make_texts(80, 70, 60)


class Reference:
    """A plain transformers forward pass, one text at a time, no padding, fp32."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def ids(self, text: str, strategy: str, max_length: int = 512, head: int = 128) -> list[list[int]]:
        tok = self.tokenizer
        if strategy == "head":
            return [tok(text, truncation=True, max_length=max_length)["input_ids"]]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        content = max_length - 2
        if len(ids) <= content:
            windows = [ids]
        elif strategy == "tail":
            windows = [ids[-content:]]
        elif strategy == "head_tail":
            windows = [ids[:head] + ids[len(ids) - (content - head) :]]
        else:  # chunks, stride 256, last window aligned to the end
            starts = list(range(0, len(ids) - content + 1, 256))
            if starts[-1] != len(ids) - content:
                starts.append(len(ids) - content)
            windows = [ids[s : s + content] for s in starts]
        return [[tok.cls_token_id, *window, tok.sep_token_id] for window in windows]

    @torch.inference_mode()
    def probabilities(self, text: str, strategy: str) -> np.ndarray:
        rows = [
            self.model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0].numpy() for ids in self.ids(text, strategy)
        ]
        return np.mean(rows, axis=0)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Reference:
    return Reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def expected(reference: Reference) -> dict[str, np.ndarray]:
    return {s: np.stack([reference.probabilities(t, s) for t in TEXTS]) for s in STRATEGIES}


@pytest.mark.parametrize(
    "batching", BATCHINGS, ids=lambda b: f"{b['forward_max_tokens']}tok-{b['forward_max_inputs']}seq"
)
def test_predictions_match_unpadded_reference_for_every_batching(
    tiny_checkpoint: Path, expected: dict[str, np.ndarray], batching: dict[str, int]
) -> None:
    classifier = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cpu", **batching))
    assert classifier.dtype == "fp32"
    for strategy in STRATEGIES:
        predictions = classifier.predict(TEXTS, long_text=strategy)  # type: ignore[arg-type]
        got = np.array([[p.scores["neg"], p.scores["pos"]] for p in predictions])
        np.testing.assert_allclose(got, expected[strategy], atol=1e-5, rtol=0, err_msg=strategy)
        want_labels = [["neg", "pos"][i] for i in expected[strategy].argmax(axis=1)]
        assert [p.label for p in predictions] == want_labels
        assert [p.score for p in predictions] == [max(p.scores.values()) for p in predictions]


def test_the_corpus_mixes_short_mid_and_over_limit_texts(classifier: SentimentClassifier) -> None:
    tokens = [p.num_tokens for p in classifier.predict(TEXTS)]
    assert len(TEXTS) >= 200
    assert sum(t <= 42 for t in tokens) == 80
    assert sum(282 <= t <= 322 for t in tokens) == 70
    assert sum(t > 512 for t in tokens) == 60


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_feeds_exactly_the_promised_ids(
    classifier: SentimentClassifier, reference: Reference, strategy: str
) -> None:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(900))
    vocab = reference.tokenizer.get_vocab()
    words = [vocab[WORDS[i % len(WORDS)]] for i in range(900)]
    cls, sep = reference.tokenizer.cls_token_id, reference.tokenizer.sep_token_id
    promised = {
        "head": [words[:510]],
        "tail": [words[-510:]],
        "head_tail": [words[:128] + words[-382:]],
        "chunks": [words[0:510], words[256:766], words[390:900]],
    }[strategy]
    (encoded,) = classifier.encode([text], long_text=strategy)  # type: ignore[arg-type]
    assert encoded.windows == [[cls, *window, sep] for window in promised]
    assert (encoded.num_tokens, encoded.truncated) == (902, True)


def test_output_order_equals_input_order(classifier: SentimentClassifier) -> None:
    texts = TEXTS[:60]
    alone = [classifier.predict([text])[0] for text in texts]
    together = classifier.predict(texts)
    for a, b in zip(alone, together, strict=True):
        assert a.label == b.label
        assert a.num_tokens == b.num_tokens
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


@pytest.mark.parametrize("text", ["", "   ", "\n\t  \r"])
def test_an_empty_text_is_refused_naming_it(classifier: SentimentClassifier, text: str) -> None:
    # The same rule as HTTP (400 "texts[1] is empty") and the batch job (the row's error "text is empty").
    with pytest.raises(InvalidInputError, match=r"^texts\[1\] is empty$"):
        classifier.predict(["a fine film", text])


def test_empty_list_gives_no_predictions(classifier: SentimentClassifier) -> None:
    assert classifier.predict([]) == []


@pytest.mark.parametrize(
    "text",
    ["a film 😀🎬 loved it", "电影很好看", "שלום עולם סרט נהדר", "bad\x00\x07\x1b[31m film\u200b\u202e"],
)
def test_unicode_and_control_characters_get_predictions(
    classifier: SentimentClassifier, reference: Reference, text: str
) -> None:
    (prediction,) = classifier.predict([text])
    assert prediction.num_tokens == len(reference.tokenizer(text)["input_ids"])
    np.testing.assert_allclose(
        [prediction.scores["neg"], prediction.scores["pos"]], reference.probabilities(text, "head"), atol=1e-5
    )


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["ok", 3], r"texts\[1\] must be a string, got int"),
        (["ok", None], r"texts\[1\] is null"),
        ("just a string", "texts must be a list of strings"),
    ],
)
def test_non_strings_are_refused_naming_the_item(classifier: SentimentClassifier, texts: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        classifier.predict(texts)  # type: ignore[arg-type]


def test_generic_checkpoint_labels_become_neg_pos(checkpoints: Path) -> None:
    path = make_checkpoint(checkpoints / "polarity", id2label={0: "NEGATIVE", 1: "POSITIVE"}, seed=1)
    classifier = SentimentClassifier(ModelConfig(model_id=str(path)))
    assert classifier.labels == ["neg", "pos"]
    assert set(classifier.predict(["good"])[0].scores) == {"neg", "pos"}


def test_specific_checkpoint_labels_are_kept(checkpoints: Path) -> None:
    path = make_checkpoint(checkpoints / "emotions", num_labels=3, id2label={0: "joy", 1: "anger", 2: "fear"})
    classifier = SentimentClassifier(ModelConfig(model_id=str(path)))
    (prediction,) = classifier.predict(["the film"])
    assert list(prediction.scores) == ["joy", "anger", "fear"]


def test_model_with_fewer_positions_caps_the_length(checkpoints: Path) -> None:
    path = make_checkpoint(checkpoints / "short", max_position_embeddings=128, seed=2)
    classifier = SentimentClassifier(ModelConfig(model_id=str(path)))
    assert classifier.max_length == 128
    text = " ".join(WORDS[i % len(WORDS)] for i in range(300))
    (encoded,) = classifier.encode([text])
    (window,) = encoded.windows
    assert len(window) == 128
    # head_tail keeps its proportion: 128 of 510 content tokens becomes 32 of 126.
    ids = classifier.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert window[1:-1] == ids[:32] + ids[-94:]
    (prediction,) = classifier.predict([text])
    assert (prediction.num_tokens, prediction.truncated) == (302, True)


def test_plan_batches_respects_budget_and_places_every_input_once() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(2, 512) for _ in range(500)]
    batches = plan_batches(lengths, forward_max_tokens=4096, forward_max_inputs=16)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) * max(lengths[i] for i in batch) <= 4096


def test_plan_batches_runs_an_oversized_input_alone() -> None:
    assert plan_batches([10, 900, 10], forward_max_tokens=100, forward_max_inputs=8) == [[1], [0, 2]]


async def _apredict(classifier: SentimentClassifier, texts: list[str]) -> list[str]:
    return [p.label for p in await classifier.apredict(texts)]


def test_apredict_equals_predict(classifier: SentimentClassifier) -> None:
    import asyncio

    assert asyncio.run(_apredict(classifier, TEXTS[:10])) == [p.label for p in classifier.predict(TEXTS[:10])]


def test_describe_reports_what_runs(classifier: SentimentClassifier, tiny_checkpoint: Path) -> None:
    info = classifier.describe()
    assert info["model"] == str(tiny_checkpoint)
    assert (info["labels"], info["max_length"], info["dtype"], info["device"]) == (["neg", "pos"], 512, "fp32", "cpu")
    assert info["backend"] == "torch"
    # The default budget, 'auto', resolved for the device and precision that run.
    assert info["forward_max_tokens"] == classifier.forward_max_tokens == 1024


def test_auto_budget_follows_the_precision_and_an_explicit_budget_is_kept(tiny_checkpoint: Path) -> None:
    bf16 = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), dtype="bf16", device="cpu"))
    assert bf16.forward_max_tokens == 2048
    fixed = SentimentClassifier(
        ModelConfig(model_id=str(tiny_checkpoint), forward_max_tokens=300, forward_max_inputs=64, device="cpu")
    )
    assert fixed.forward_max_tokens == 300
    # 300 tokens hold 3 windows of 100 tokens, so 7 texts of that length take 3 forward passes.
    text = " ".join(["good"] * 98)
    assert len(fixed.encode([text])[0].windows[0]) == 100
    calls: list[int] = []
    original = fixed._forward_batch

    def counting(batch: list[list[int]]) -> object:
        calls.append(len(batch))
        return original(batch)

    fixed._forward_batch = counting  # type: ignore[method-assign]
    fixed.predict([text] * 7)
    assert calls == [3, 3, 1]


def test_bf16_runs_and_stays_close_to_fp32(tiny_checkpoint: Path, classifier: SentimentClassifier) -> None:
    bf16 = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), dtype="bf16", device="cpu"))
    assert bf16.dtype == "bf16"
    got = [p.scores["pos"] for p in bf16.predict(TEXTS[:20])]
    want = [p.scores["pos"] for p in classifier.predict(TEXTS[:20])]
    assert got == pytest.approx(want, abs=0.05)


# -- running out of GPU memory -----------------------------------------------------------------------
# A CUDA OOM needs a GPU; the fault is injected at `_forward_batch`, the one forward pass, which raises
# the real `torch.cuda.OutOfMemoryError` (present in CPU builds too).


def score_rows(predictions: list[Prediction]) -> np.ndarray:
    return np.array([[p.scores["neg"], p.scores["pos"]] for p in predictions])


def inject_oom(monkeypatch: pytest.MonkeyPatch, classifier: SentimentClassifier, fits: object) -> list[int]:
    """Make every forward pass over a batch that ``fits`` refuses raise CUDA OOM; returns the sizes tried."""
    original = classifier._forward_batch
    tried: list[int] = []

    def forward(batch: list[list[int]]) -> np.ndarray:
        tried.append(len(batch))
        if not fits(batch):  # type: ignore[operator]
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(batch)

    monkeypatch.setattr(classifier, "_forward_batch", forward)
    return tried


def test_a_forward_pass_out_of_memory_is_split_and_gives_the_same_predictions(
    classifier: SentimentClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = classifier.predict(TEXTS[:20])
    splits_before = classifier.oom_splits
    tried = inject_oom(monkeypatch, classifier, lambda batch: len(batch) <= 3)
    got = classifier.predict(TEXTS[:20])
    np.testing.assert_allclose(score_rows(got), score_rows(want), atol=1e-5)
    assert [p.label for p in got] == [p.label for p in want]
    assert max(tried) > 3, "the planned batches were bigger than what fits"
    assert classifier.oom_splits > splits_before
    # A failed pass of n inputs is retried as n // 2 (first) and n - n // 2; every input ran once in a pass that fit.
    for size, following in itertools.pairwise(tried):
        if size > 3:
            assert following == size // 2
    assert sum(size for size in tried if size <= 3) == 20


def test_only_an_input_that_does_not_fit_alone_fails_and_the_others_are_answered(
    classifier: SentimentClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["a fine film", " ".join(["dull"] * 300), "awful acting", "great cast"]
    want = classifier.predict(texts)
    inject_oom(monkeypatch, classifier, lambda batch: max(len(sequence) for sequence in batch) < 100)
    with pytest.raises(DeviceMemoryError, match="an input of 302 tokens does not fit in cpu memory") as caught:
        classifier.predict(texts)
    assert "lower max_length" in str(caught.value)
    results = classifier.predict_encoded(classifier.encode(texts))
    assert isinstance(results[1], DeviceMemoryError)
    assert str(results[1]) == str(caught.value)
    answered = [results[0], results[2], results[3]]
    assert all(isinstance(p, Prediction) for p in answered)
    assert [p.label for p in answered] == [want[0].label, want[2].label, want[3].label]
    np.testing.assert_allclose(score_rows(answered), score_rows([want[0], want[2], want[3]]), atol=1e-5)


def test_the_encoder_reads_the_same_ids_as_the_tokenizer_call(classifier: SentimentClassifier) -> None:
    # The encoder calls the Rust tokenizer's encode_batch_fast directly; a user's tokenizer(texts) is the reference.
    texts = [
        "A good film.",
        "Ünïcödé ÀCCENTS, CAPITALS and punctuation!!! ... (really?)",
        "emoji 🎬🍿 and CJK 映画 and tabs\tand\nnewlines",
        "a literal [SEP] and [CLS] inside the text",
        " ".join(WORDS[i % len(WORDS)] for i in range(700)),
    ]
    tokenizer = classifier.tokenizer
    reference = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert classifier.encoder._token_ids(texts) == reference
    # A call with truncation and padding leaves them set on the Rust tokenizer; the encoder resets them.
    tokenizer(texts, truncation=True, max_length=8, padding="max_length")
    assert classifier.encoder._token_ids(texts) == reference
    assert [e.num_tokens for e in classifier.encode(texts)] == [len(ids) + 2 for ids in reference]


# -- on a real card (skipped where torch sees no CUDA device) ----------------------------------------


def probabilities_of(predictions: list[Prediction]) -> np.ndarray:
    return np.array([list(p.scores.values()) for p in predictions])


@pytest.mark.gpu
def test_on_the_card_auto_precision_is_native_and_stays_within_2e2_of_fp32(tiny_checkpoint: Path) -> None:
    # Measured on the CPU for this tiny model: bf16 0.004 from fp32 at most, fp16 0.0005.
    fp32 = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cuda", dtype="fp32"))
    auto = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cuda"))
    native = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
    assert (auto.device, auto.dtype) == ("cuda:0", native)
    want = probabilities_of(fp32.predict(TEXTS))
    assert np.abs(probabilities_of(auto.predict(TEXTS)) - want).max() <= 2e-2
    cpu = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cpu"))
    assert np.abs(probabilities_of(cpu.predict(TEXTS)) - want).max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.usefixtures("uncapped_cuda")
def test_on_the_card_a_pass_over_the_memory_cap_is_split_and_gives_the_uncapped_probabilities(
    tiny_checkpoint: Path,
) -> None:
    texts = make_texts(0, 0, 256, seed=5)  # 256 reviews over the limit: 256 windows of 512 tokens
    config = ModelConfig(
        model_id=str(tiny_checkpoint), device="cuda", dtype="fp32", forward_max_tokens=256 * 512, forward_max_inputs=256
    )
    uncapped = SentimentClassifier(config)
    loaded = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    want = probabilities_of(uncapped.predict(texts))
    one_pass = torch.cuda.max_memory_reserved() - loaded
    assert uncapped.oom_splits == 0
    del uncapped
    torch.cuda.empty_cache()
    # Room for the weights and a quarter of what the one 256-window pass took: it must split.
    total = torch.cuda.get_device_properties(0).total_memory
    capped = SentimentClassifier(config.model_copy(update={"gpu_memory_fraction": (loaded + one_pass / 4) / total}))
    got = probabilities_of(capped.predict(texts))
    assert capped.oom_splits > 0
    assert np.abs(got - want).max() <= 1e-4


def test_plan_batches_gives_what_the_sorted_loop_it_replaced_gave() -> None:
    def loop(lengths: list[int], budget: int, inputs: int) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = lengths[current[0]] if current else lengths[index]
            if current and ((len(current) + 1) * longest > budget or len(current) >= inputs):
                batches.append(current)
                current = []
            current.append(index)
        return [*batches, current] if current else batches

    rng = random.Random(8)
    for _ in range(50):
        lengths = [rng.choice([rng.randint(2, 40), rng.randint(2, 512), 512]) for _ in range(rng.randint(0, 300))]
        budget, inputs = rng.choice([1, 512, 1024, 16384]), rng.choice([1, 8, 64, 256])
        assert plan_batches(lengths, budget, inputs) == loop(lengths, budget, inputs)
