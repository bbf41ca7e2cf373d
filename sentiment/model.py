"""`SentimentClassifier`: the one model class behind the HTTP endpoint, the batch pipeline and the CLI.

It loads a Hugging Face sequence-classification checkpoint (or its ONNX export), cuts long texts by
a configured strategy, packs inputs into batches under a token budget (sorted by length, each batch
padded only to its own longest member) and returns one `Prediction` per text in input order. What
runs the forward pass is an engine (`sentiment.engines`: torch, or ONNX Runtime on the CPU) behind
one seam, ids and mask in, logits out; everything else here is one code path for both.

Ray and Arrow are never imported here: a Serve replica awaits `apredict_encoded`, the batch job's
model stage (`pipelines.stage`) calls `predict_encoded` on texts its tokenize stage encoded, and
both convert to and from their transports themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sentiment.config import LongTextStrategy, ModelConfig, auto_max_batch_tokens
from sentiment.encoding import EncodedText, TextEncoder
from sentiment.engines import Engine, load_engine
from sentiment.errors import DeviceMemoryError
from sentiment.packing import Padder, TokenWindows, WindowBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer for one text."""

    label: str
    """The most probable label."""
    score: float
    """Probability of `label`."""
    scores: dict[str, float]
    """Probability of every label, in the model's class order."""
    num_tokens: int
    """Tokens of the whole text, special tokens included, before any cut."""
    truncated: bool
    """Whether the text was longer than the model's limit and was cut (or split into chunks)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TextScores:
    """Class probabilities of a call's texts, as arrays (the batch job builds its columns from these)."""

    probabilities: np.ndarray
    """float32, texts x labels: the mean over each text's windows; zeros for a failed text."""
    failed: np.ndarray
    """bool per text: a window of it did not fit in device memory even alone."""
    longest: np.ndarray
    """int64 per text: tokens of its longest window (what a failure message names)."""


def plan_batches(
    lengths: Sequence[int] | np.ndarray, forward_max_tokens: int, forward_max_inputs: int
) -> list[list[int]]:
    """Group input indices into batches, longest first, each under the token budget.

    A batch costs ``len(batch) * longest member`` (it is padded to its longest member). Sorting by
    length first keeps members of a batch alike, so little of that cost is padding; an input
    longer than the whole budget runs alone. Equal lengths keep their input order.
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    batches: list[list[int]] = []
    start = longest = 0
    for position, length in enumerate(sizes[order].tolist()):
        # Sorted descending, so the first member is the longest and sets the padded width.
        members = position - start
        if members and ((members + 1) * longest > forward_max_tokens or members >= forward_max_inputs):
            batches.append(order[start:position].tolist())
            start = position
        if position == start:
            longest = length
    if start < len(order):
        batches.append(order[start:].tolist())
    return batches


class SentimentClassifier:
    """A sequence classifier that batches by tokens and handles reviews of any length.

    >>> classifier = SentimentClassifier(ModelConfig(model_id="path/to/checkpoint"))
    >>> classifier.predict(["A wonderful film."])[0].label
    'pos'
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        *,
        reserved_gpus: Sequence[int | str] | None = None,
        threads: int | None = None,
        engine: Engine | None = None,
    ) -> None:
        """Load the tokenizer and the engine ``config`` asks for (`sentiment.engines.load_engine`).

        ``reserved_gpus`` is ``ray.get_gpu_ids()`` when this runs in a Ray worker (an empty list: the
        worker reserved no GPU and runs on the CPU), None outside Ray; see `sentiment.devices`.
        ``threads``: CPU threads of a forward pass; None: the CPUs this process owns. ``engine``: one
        already loaded (tests), used instead.
        """
        self.config = config or ModelConfig()
        self.reserved_gpus = None if reserved_gpus is None else list(reserved_gpus)
        self.encoder = TextEncoder(self.config)
        self.engine: Engine = engine or load_engine(self.config, reserved_gpus=self.reserved_gpus, threads=threads)
        self.backend = self.engine.backend
        self.device = self.engine.device
        """'cpu' or 'cuda:N'."""
        self.dtype = self.engine.dtype
        """'fp32', 'bf16', 'fp16' or 'int8'."""
        self.oom_splits = 0
        """Forward passes split in two after running out of GPU memory, since this classifier loaded."""
        self.tokenizer = self.encoder.tokenizer
        self.labels = self.encoder.labels
        self.max_length = self.encoder.max_length
        self.head_tokens = self.encoder.head_tokens
        self.tokens_run = 0
        """Tokens of the sequences run through the model (padding not counted), since this classifier loaded."""
        self.tokens_padded = 0
        """The same, padding included: ``1 - tokens_run / tokens_padded`` is the share spent on padding."""
        self.forward_max_tokens: int = (
            auto_max_batch_tokens(self.device.split(":")[0], self.dtype)
            if self.config.forward_max_tokens == "auto"
            else int(self.config.forward_max_tokens)
        )
        self._pad_id = self.encoder.pad_id
        self._padder = Padder(self._pad_id)
        # One worker each: forward passes are serialized anyway (they share the cores or the GPU),
        # and fast tokenizers raise "Already borrowed" when one instance is used from two threads,
        # so the async API tokenizes only on its tokenizer thread and never on the model thread.
        self._executor: ThreadPoolExecutor | None = None
        self._encode_executor: ThreadPoolExecutor | None = None

    @property
    def model(self) -> Any:
        """The torch module (backend torch only): for FLOP counts and benchmarks that time it bare."""
        model = getattr(self.engine, "model", None)
        if model is None:
            raise AttributeError(f"backend {self.backend} has no torch model")
        return model

    @property
    def gpu_memory_cap_bytes(self) -> int | None:
        """The CUDA memory cap this process set itself (gpu_memory_fraction); None without one or on a CPU."""
        cap: int | None = self.engine.describe()["gpu_memory_cap_bytes"]
        return cap

    # -- description -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What runs, for `/info` endpoints and run reports."""
        engine = self.engine.describe()
        return {
            "model": self.config.model_id,
            "revision": self.config.revision,
            "labels": list(self.labels),
            "max_length": self.max_length,
            "long_text": self.config.long_text,
            "head_tokens": self.head_tokens,
            "backend": self.backend,
            "dtype": self.dtype,
            "device": self.device,
            "threads": engine["threads"],
            "reserved_gpus": None if self.reserved_gpus is None else [str(gpu) for gpu in self.reserved_gpus],
            "compile": engine.get("compile", False),
            "gpu_memory_fraction": engine["gpu_memory_fraction"],
            "gpu_memory_cap_bytes": engine["gpu_memory_cap_bytes"],
            "forward_max_tokens": self.forward_max_tokens,
            "forward_max_inputs": self.config.forward_max_inputs,
        }

    def peak_gpu_memory_bytes(self) -> int | None:
        """Most CUDA memory this process has held at once (``torch.cuda.max_memory_allocated``); None on a CPU."""
        return self.engine.peak_memory_bytes()

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], long_text: LongTextStrategy | None = None) -> list[EncodedText]:
        """Tokenize texts and cut each into the windows the model will see (see `TextEncoder.encode`)."""
        return self.encoder.encode(texts, long_text)

    # -- inference ---------------------------------------------------------------------------

    def forward(self, sequences: Sequence[Sequence[int]] | TokenWindows) -> np.ndarray:
        """Class probabilities (float32, one row per sequence, input order) for model-ready id lists.

        Raises `DeviceMemoryError` if a sequence does not fit in GPU memory even alone (see `forward_each`).
        """
        windows = TokenWindows.from_lists(sequences)
        probabilities, failed = self.forward_each(windows)
        if failed:
            raise DeviceMemoryError(self.memory_message(max(len(windows[i]) for i in failed)))
        return probabilities

    def forward_each(self, sequences: Sequence[Sequence[int]] | TokenWindows) -> tuple[np.ndarray, list[int]]:
        """Class probabilities for every sequence that fits, and the indices of those that do not.

        Sequences are grouped by `plan_batches`; each batch is padded to its own longest member. A
        forward pass that runs out of GPU memory is split in halves and retried, down to single
        sequences; a sequence that does not fit even alone keeps a row of zeros and is listed.
        The passes' logits stay with the engine (on the GPU) until every pass has been launched, then
        come back in one copy: one wait for the device per call, not one per pass.
        """
        windows = TokenWindows.from_lists(sequences)
        probabilities = np.zeros((len(windows), len(self.labels)), dtype=np.float32)
        lengths = windows.lengths
        failed: list[int] = []
        done: list[np.ndarray] = []
        logits: list[Any] = []
        for batch in plan_batches(lengths, self.forward_max_tokens, self.config.forward_max_inputs):
            members = np.asarray(batch, dtype=np.int64)
            self.tokens_run += int(lengths[members].sum())
            self.tokens_padded += len(batch) * int(lengths[members[0]])  # longest first
            failed += self._forward_splitting(WindowBatch(windows, members), done, logits)
        if logits:
            probabilities[np.concatenate(done)] = softmax(self.engine.to_numpy(logits))
        return probabilities, sorted(failed)

    def _forward_splitting(self, batch: WindowBatch, done: list[np.ndarray], logits: list[Any]) -> list[int]:
        """Run ``batch``, halving on OOM; each pass's members go to ``done`` and its logits to ``logits``.
        Returns the indices that never fit."""
        pending = [batch.indices]
        failed: list[int] = []
        while pending:
            part = pending.pop()
            try:
                logits.append(self._forward_batch(WindowBatch(batch.windows, part)))
                done.append(part)
                continue
            except self.engine.memory_errors:
                # Handled after the except block: until it ends, the traceback keeps the failed
                # pass's activations alive, and emptying the cache could free nothing.
                pass
            self.engine.release_memory()
            if len(part) == 1:
                failed.append(int(part[0]))
                continue
            self.oom_splits += 1
            half = len(part) // 2
            # Popped from the end: the first half runs first.
            pending += [part[half:], part[:half]]
        if failed:
            logger.warning("%d inputs did not fit in %s memory even alone", len(failed), self.device)
        return failed

    def memory_message(self, tokens: int) -> str:
        """What a text whose window of ``tokens`` tokens does not fit even alone is told."""
        cap = (
            f", capped at {self.gpu_memory_cap_bytes / 2**30:.1f} GiB (gpu_memory_fraction "
            f"{self.config.gpu_memory_fraction})"
            if self.gpu_memory_cap_bytes is not None
            else ""
        )
        return (
            f"an input of {tokens} tokens does not fit in {self.device} memory{cap} even alone; lower "
            "max_length, give this process a larger GPU share (num_gpus) or memory cap, or run on a larger card"
        )

    def _forward_batch(self, batch: WindowBatch | Sequence[Sequence[int]]) -> Any:
        """One forward pass over ``batch``, padded to its longest member: the seam tests inject faults at.

        Returns the engine's logits, left where it computed them; `forward_each` reads a call's back
        at once and takes probabilities in float32 on the host, the same for every engine.
        """
        if not isinstance(batch, WindowBatch):
            packed = TokenWindows.from_lists(batch)
            batch = WindowBatch(packed, np.arange(len(packed)))
        input_ids, attention_mask = self._padder.pad(batch)
        return self.engine.forward(input_ids, attention_mask)

    def score_windows(self, windows: TokenWindows, windows_per_text: np.ndarray) -> TextScores:
        """Each text's probabilities, averaged over its windows (``windows_per_text``, in order, each >= 1).

        Averaging window probabilities is how Spark NLP's coalesceSentences combines sentences.
        """
        counts = np.asarray(windows_per_text, dtype=np.int64)
        labels = len(self.labels)
        if not len(counts):
            return TextScores(np.zeros((0, labels), np.float32), np.zeros(0, bool), np.zeros(0, np.int64))
        probabilities, failed_windows = self.forward_each(windows)
        starts = np.cumsum(counts) - counts
        means = np.add.reduceat(probabilities, starts, axis=0) / counts[:, None].astype(np.float32)
        failed = np.zeros(len(counts), dtype=bool)
        if failed_windows:
            owner = np.repeat(np.arange(len(counts)), counts)
            failed[owner[failed_windows]] = True
            means[failed] = 0
        longest = np.maximum.reduceat(windows.lengths, starts) if len(windows) else np.zeros(0, np.int64)
        return TextScores(means, failed, longest)

    def predict_encoded(self, encoded: Sequence[EncodedText]) -> list[Prediction | DeviceMemoryError]:
        """One result per encoded text, in order: its `Prediction`, or the error that text alone met.

        A text with several windows averages their probabilities. The only per-text failure is a
        window that does not fit in GPU memory even alone (`DeviceMemoryError`); every other text of
        the call still gets its prediction, so a caller answers or writes everything else.
        """
        windows = TokenWindows.from_lists([window for text in encoded for window in text.windows])
        scores = self.score_windows(windows, np.array([len(text.windows) for text in encoded], dtype=np.int64))
        best = scores.probabilities.argmax(axis=1).tolist()
        rows = scores.probabilities.tolist()
        results: list[Prediction | DeviceMemoryError] = []
        for index, text in enumerate(encoded):
            if scores.failed[index]:
                results.append(DeviceMemoryError(self.memory_message(int(scores.longest[index]))))
                continue
            row = rows[index]
            results.append(
                Prediction(
                    label=self.labels[best[index]],
                    score=row[best[index]],
                    scores=dict(zip(self.labels, row, strict=True)),
                    num_tokens=text.num_tokens,
                    truncated=text.truncated,
                )
            )
        return results

    def predict(self, texts: Sequence[str], long_text: LongTextStrategy | None = None) -> list[Prediction]:
        """One `Prediction` per text, in input order.

        Raises `InvalidInputError` for a non-string and `DeviceMemoryError` for a text that does not
        fit in GPU memory (`predict_encoded` answers the other texts too).
        """
        return [_raise_error(result) for result in self.predict_encoded(self.encode(texts, long_text))]

    async def apredict(self, texts: Sequence[str], long_text: LongTextStrategy | None = None) -> list[Prediction]:
        """`predict` off the event loop, so an asyncio server keeps serving meanwhile."""
        return [_raise_error(result) for result in await self.apredict_encoded(await self.aencode(texts, long_text))]

    async def aencode(self, texts: Sequence[str], long_text: LongTextStrategy | None = None) -> list[EncodedText]:
        """`encode` on the tokenizer thread: a long request does not stall the event loop.

        Tokenizing has its own thread so it overlaps the forward pass of the batch before.
        """
        if self._encode_executor is None:
            self._encode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sentiment-tokenizer")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encode_executor, self.encode, texts, long_text)

    async def apredict_encoded(self, encoded: Sequence[EncodedText]) -> list[Prediction | DeviceMemoryError]:
        """`predict_encoded` on the model thread, so an asyncio server's event loop keeps serving meanwhile."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sentiment-model")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.predict_encoded, encoded)

    def warmup(self) -> None:
        """Run one forward pass at the maximum length, so the first real request is not the slow one."""
        self.forward([[self._pad_id] * self.max_length])


def _raise_error(result: Prediction | DeviceMemoryError) -> Prediction:
    if isinstance(result, DeviceMemoryError):
        raise result
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by each row's maximum so no exponent overflows."""
    logits = np.asarray(logits, dtype=np.float32)
    exponents = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponents / exponents.sum(axis=-1, keepdims=True)
