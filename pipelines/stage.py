"""The batch job's two Ray Data stages around the shared core, as ``ray.data.llm`` splits its processors.

- `TokenizeStage` (CPU tasks, `tokenize`): texts -> model-ready token windows (the long-text strategy applied)
  and each row's error, decided once by `pipelines.texts.text_errors`. Beside GPU model actors,
  many of them run in parallel across cores and nodes, overlapping the forward passes.
- `ModelStage` (one actor per GPU, or one per CPU core): the windows -> predictions with the shared
  `SentimentClassifier`, then the output columns (`pipelines.schema`). A GPU actor only runs
  forward passes; a CPU actor runs `TokenizeStage` on its own slice first (``tokenize=True``),
  since on a CPU both would share the same cores anyway.

Each actor learns in its constructor which GPUs Ray gave it (``ray.get_gpu_ids()``): with none it
runs on the CPU even where CUDA is visible, since Ray 2.60 no longer hides GPUs from workers that
reserved none. What each model actor resolved, and how many rows and tokens it has run, goes to an
`ActorLog`, which the job reads for its progress line and its run report.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.columns import NUM_TOKENS, ROW_ERROR, STAGE_COLUMNS, TRUNCATED, WINDOWS
from pipelines.schema import with_scores
from pipelines.texts import text_errors
from sentiment.config import ModelConfig
from sentiment.devices import cpu_threads
from sentiment.encoding import EncodedText, TextEncoder
from sentiment.model import SentimentClassifier
from sentiment.packing import TokenWindows


class ActorLog:
    """What each model actor resolved and has done so far; run as a tiny Ray actor on the driver's node."""

    def __init__(self) -> None:
        self._actors: dict[str, dict[str, Any]] = {}
        self._progress: dict[str, dict[str, float]] = {}

    def add(self, key: str, entry: dict[str, Any]) -> None:
        self._actors[key] = entry

    def progress(self, key: str, counts: dict[str, float]) -> None:
        self._progress[key] = counts

    def entries(self) -> list[dict[str, Any]]:
        return [{**entry, **self._progress.get(key, {})} for key, entry in self._actors.items()]

    def totals(self) -> dict[str, float]:
        """Rows, tokens run and tokens padded, summed over every model actor so far."""
        totals: dict[str, float] = {"rows": 0, "tokens_run": 0, "tokens_padded": 0}
        for counts in self._progress.values():
            for name in totals:
                totals[name] += counts.get(name, 0)
        return totals


def tokenize(batch: pa.Table, *, config: ModelConfig, text_column: str) -> pa.Table:
    """`TokenizeStage` as a plain function for Ray Data tasks: one tokenizer per worker process, reused.

    Tasks, not actors: they hold a CPU only while they run, so on a small machine the reads, the
    writes and the model actor always find one (actors holding every CPU would stall the job).
    """
    return _tokenize_stage(config.model_dump_json(), text_column)(batch)


@functools.cache
def _tokenize_stage(config_json: str, text_column: str) -> TokenizeStage:
    # A tokenize task reserves one CPU, so its Rust tokenizer uses one thread, not every core of
    # the node. Read by the tokenizers library when it first encodes (as in `ModelStage`).
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    return TokenizeStage(ModelConfig.model_validate_json(config_json), text_column)


class TokenizeStage:
    """Texts to token windows: appends `STAGE_COLUMNS` to a pyarrow column batch (its text column as strings)."""

    def __init__(self, config: ModelConfig, text_column: str = "text", encoder: TextEncoder | None = None) -> None:
        self.encoder = encoder or TextEncoder(config)
        self.column = text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch, encoded, errors = self.encode(batch)
        return (
            batch.append_column(
                WINDOWS,
                pa.array([e.windows if e else None for e in encoded], pa.list_(pa.list_(pa.int32()))),
            )
            .append_column(NUM_TOKENS, pa.array([e.num_tokens if e else None for e in encoded], pa.int64()))
            .append_column(TRUNCATED, pa.array([e.truncated if e else None for e in encoded], pa.bool_()))
            .append_column(ROW_ERROR, pa.array(errors, pa.string()))
        )

    def encode(self, batch: pa.Table) -> tuple[pa.Table, list[EncodedText | None], list[str | None]]:
        """The batch as it is written (`text_errors`), each row's windows (None for a row with an error) and
        error (None for a row the model can take)."""
        batch, texts, errors = text_errors(batch, self.column)
        valid = [index for index, error in enumerate(errors) if error is None]
        encoded: list[EncodedText | None] = [None] * len(texts)
        for index, text in zip(valid, self.encoder.encode([texts[i] for i in valid]), strict=True):
            encoded[index] = text
        return batch, encoded, errors


class ModelStage:
    """Token windows to predictions: one `SentimentClassifier` per actor, on the device Ray reserved for it."""

    def __init__(
        self,
        config: ModelConfig,
        actor_log: Any = None,
        threads: int | None = None,
        tokenize: bool = False,
        text_column: str = "text",
    ) -> None:
        """``threads``: forward-pass threads (CPU actors); None: as many as Ray's OMP_NUM_THREADS, at most the cores.
        ``tokenize``: take text batches (texts in ``text_column``) and encode them as `TokenizeStage` does, with
        the classifier's own tokenizer."""
        import ray
        from transformers.utils import logging as transformers_logging

        # Every actor's "Loading weights" bar would reach the driver's terminal, and Ray's summary of the
        # repeated bars could land after the job's last line; the job's own progress line says how it goes.
        transformers_logging.disable_progress_bar()
        threads = cpu_threads(threads)
        if tokenize:
            # The Rust tokenizer's threads: as many as the model's, read when it first encodes.
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        self.classifier = SentimentClassifier(config, reserved_gpus=ray.get_gpu_ids(), threads=threads)
        self.tokenize = TokenizeStage(config, text_column, self.classifier.encoder) if tokenize else None
        self.actor_log = actor_log
        self.key = f"{ray.get_runtime_context().get_actor_id()}"
        self.rows = 0
        self.started = time.perf_counter()
        self.model_seconds = 0.0
        """Seconds spent in calls (reading the windows, the forward passes, building the columns): the
        actor's own rate is ``rows / model_seconds``, whatever kept it waiting between calls."""
        self.first_call_at: float | None = None
        self.last_call_at: float | None = None
        self.first_call: tuple[int, float] | None = None
        if actor_log is not None:
            entry = {
                **self.classifier.describe(),
                # The engine's threads (torch's or ONNX Runtime's), under the name reports have used.
                "torch_threads": self.classifier.describe()["threads"],
                "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(),
            }
            ray.get(actor_log.add.remote(self.key, entry))

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        self.first_call_at = self.first_call_at or time.time()
        scored = score_batch(self.classifier, batch, self.tokenize)
        self.rows += batch.num_rows
        self.model_seconds += time.perf_counter() - started
        if self.first_call is None:
            # The first call also pays for CUDA's kernel set-up (and torch.compile's compile): kept apart.
            self.first_call = (self.rows, self.model_seconds)
        self.last_call_at = time.time()
        self._report()
        return scored

    def _report(self) -> None:
        if self.actor_log is None:
            return
        import ray

        counts = {
            "rows": self.rows,
            "tokens_run": self.classifier.tokens_run,
            "tokens_padded": self.classifier.tokens_padded,
            "seconds": time.perf_counter() - self.started,
            "model_seconds": self.model_seconds,
            "first_call_rows": self.first_call[0] if self.first_call else 0,
            "first_call_seconds": self.first_call[1] if self.first_call else 0.0,
            # Wall-clock times (epoch seconds), so a sampler outside the job keeps only what it saw meanwhile.
            "first_call_at": self.first_call_at,
            "last_call_at": self.last_call_at,
        }
        # Waited for, so the log holds every batch's counts once the dataset has finished.
        ray.get(self.actor_log.progress.remote(self.key, counts))


def score_batch(classifier: SentimentClassifier, batch: pa.Table, tokenize: TokenizeStage | None = None) -> pa.Table:
    """A model stage's call: ``batch`` (with the tokenize stage's columns, or texts to ``tokenize`` first)
    with the prediction columns (`pipelines.schema.with_scores`) in place of the working ones.

    The windows go from the Arrow column to the classifier as its buffers (`packed_windows`), and the
    output columns are built from the probability arrays: no Python object per row or per token.
    """
    if tokenize is not None:
        # Its own slice's texts, straight to encodings (no token columns to build and read back).
        batch, rows, row_errors = tokenize.encode(batch)
        encoded = [row for row in rows if row is not None]
        windows = TokenWindows.from_lists([window for text in encoded for window in text.windows])
        counts = np.array([len(text.windows) for text in encoded], dtype=np.int64)
        num_tokens = pa.array([row.num_tokens if row else None for row in rows], pa.int64())
        truncated = pa.array([row.truncated if row else None for row in rows], pa.bool_())
        errors: pa.Array | pa.ChunkedArray = pa.array(row_errors, pa.string())
    else:
        windows, counts = packed_windows(batch.column(WINDOWS))
        num_tokens, truncated, errors = (batch.column(name) for name in (NUM_TOKENS, TRUNCATED, ROW_ERROR))
        batch = batch.drop_columns(list(STAGE_COLUMNS))
    valid = pc.is_null(errors).to_numpy(zero_copy_only=False)
    counts = counts[counts > 0]
    if len(counts) != int(valid.sum()):
        raise ValueError(f"{len(counts)} rows have token windows but {int(valid.sum())} have no error")
    scores = classifier.score_windows(windows, counts)
    probabilities = np.zeros((batch.num_rows, len(classifier.labels)), dtype=np.float32)
    probabilities[valid] = scores.probabilities
    if scores.failed.any():
        # Only the rows that do not fit in GPU memory alone fail; the rest keep their predictions.
        rows_of = np.flatnonzero(valid)
        messages = errors.to_pylist()
        for text in np.flatnonzero(scores.failed):
            messages[rows_of[text]] = classifier.memory_message(int(scores.longest[text]))
        valid[rows_of[scores.failed]] = False
        errors = pa.array(messages, pa.string())
    return with_scores(batch, probabilities, valid, num_tokens, truncated, errors, classifier.labels)


def packed_windows(column: pa.ChunkedArray | pa.Array) -> tuple[TokenWindows, np.ndarray]:
    """A ``list<list<int32>>`` column (null for a row with an error) as the classifier's packed windows
    (values and offsets read from the Arrow buffers, no copy where there is one chunk) and each row's
    window count (0 for a null row).

    ``to_pylist`` of the same column takes 13 to 22 ms per 1,024 IMDB rows; this, well under one.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    counts = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    # The windows of the rows that have some, whatever the column's own slicing and nulls.
    inner = array.flatten()
    values = inner.values.to_numpy(zero_copy_only=False)
    offsets = inner.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    return TokenWindows(values, offsets), counts
