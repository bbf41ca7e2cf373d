"""The batch actor's host work per call, with the model replaced by a no-op engine: what keeps a GPU waiting.

    python -m benchmarks host-overhead [--rows 1024] [--calls 40] [--out benchmarks/out/host-overhead]

One call of the batch job's model stage (`pipelines.stage.score_batch`) on ``--rows`` synthetic
IMDB-length reviews, tokenized beforehand as the tokenize tasks hand them over (an Arrow table with
a ``list<list<int32>>`` windows column), with an engine whose forward pass returns zeros at once.
What remains is the serial host work a GPU waits for between calls: reading the windows, planning
and padding the passes, averaging windows, building the output columns.

Measured in the same run against the path it replaced, reimplemented here as the baseline:
``to_pylist`` of the columns, one ``EncodedText`` per row, per-row padding into fresh arrays, a read
back and softmax per pass, one ``np.mean`` and one ``Prediction`` per text, and output columns
built from Python lists. The two alternate, ``--calls`` times each; the table gives the median
milliseconds per call and the ratio. A CPU measures the host work only: the syncs a GPU pass adds
(a read-back per pass, transformers' padding check) are not in either figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.harness import ensure_checkpoint, machine, markdown_table, ratio, work_offline, write_json

TARGET_MS = 10.0


class NoOpEngine:
    """An engine that runs no model: zeros for logits, at once."""

    backend = "none"
    device = "cpu"
    dtype = "fp32"
    threads = 1
    memory_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, labels: int) -> None:
        self.labels = labels

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        return np.zeros((len(input_ids), self.labels), dtype=np.float32)

    def to_numpy(self, logits: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(logits))

    def release_memory(self) -> None:
        return None

    def peak_memory_bytes(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"threads": 1, "gpu_memory_fraction": None, "gpu_memory_cap_bytes": None}


def tokenized_call(checkpoint: Path, rows: int) -> tuple[Any, pa.Table]:
    """A classifier over the no-op engine, and one call's input as the tokenize tasks hand it over."""
    from pipelines.stage import TokenizeStage
    from sentiment.config import ModelConfig
    from sentiment.model import SentimentClassifier
    from sentiment.testing import make_reviews

    config = ModelConfig(model_id=str(checkpoint), device="cpu")
    classifier = SentimentClassifier(config, engine=NoOpEngine(2))
    # The GPU budget: on a card a call's passes are of up to 16,384 tokens and 64 rows.
    classifier.forward_max_tokens = 16384
    texts: list[str | None] = list(make_reviews(rows, seed=0))
    texts[::97] = [None] * len(texts[::97])  # a few rows with an error, as real inputs have
    table = TokenizeStage(config)(pa.table({"id": np.arange(rows), "text": pa.array(texts, pa.string())}))
    return classifier, table


def new_path(classifier: Any, table: pa.Table) -> pa.Table:
    from pipelines.stage import score_batch

    return score_batch(classifier, table)


def old_path(classifier: Any, table: pa.Table) -> pa.Table:
    """The model stage's call as it was before the host work came off the critical path."""
    from pipelines.columns import NUM_TOKENS, ROW_ERROR, STAGE_COLUMNS, TRUNCATED, WINDOWS
    from pipelines.schema import output_name, prediction_schema
    from sentiment.encoding import EncodedText
    from sentiment.model import Prediction, plan_batches, softmax

    windows = table.column(WINDOWS).to_pylist()
    num_tokens = table.column(NUM_TOKENS).to_pylist()
    truncated = table.column(TRUNCATED).to_pylist()
    errors = table.column(ROW_ERROR).to_pylist()
    valid = [index for index, error in enumerate(errors) if error is None]
    encoded = [EncodedText(windows[i], num_tokens[i], truncated[i]) for i in valid]
    batch = table.drop_columns(list(STAGE_COLUMNS))

    sequences = [window for text in encoded for window in text.windows]
    probabilities = np.zeros((len(sequences), len(classifier.labels)), dtype=np.float32)
    lengths = [len(sequence) for sequence in sequences]
    for members in plan_batches(lengths, classifier.forward_max_tokens, classifier.config.forward_max_inputs):
        part = [sequences[i] for i in members]
        longest = max(len(sequence) for sequence in part)
        input_ids = np.full((len(part), longest), classifier._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(part), longest), dtype=np.int64)
        for row, sequence in enumerate(part):
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
        probabilities[members] = softmax(classifier.engine.forward(input_ids, attention_mask))

    predictions: list[Prediction | None] = [None] * batch.num_rows
    start = 0
    for index, text in zip(valid, encoded, strict=True):
        mean = probabilities[start : start + len(text.windows)].mean(axis=0)
        start += len(text.windows)
        best = int(mean.argmax())
        predictions[index] = Prediction(
            label=classifier.labels[best],
            score=float(mean[best]),
            scores={label: float(p) for label, p in zip(classifier.labels, mean, strict=True)},
            num_tokens=text.num_tokens,
            truncated=text.truncated,
        )

    labels = classifier.labels
    schema = prediction_schema(labels)
    rows: dict[str, list[Any]] = {
        "label": [p.label if p else None for p in predictions],
        "score": [p.score if p else None for p in predictions],
    }
    for label in labels:
        rows[f"score_{label}"] = [p.scores[label] if p else None for p in predictions]
    rows["num_tokens"] = [p.num_tokens if p else None for p in predictions]
    rows["truncated"] = [p.truncated if p else None for p in predictions]
    rows["error"] = list(errors)
    batch = batch.rename_columns([output_name(name, labels) for name in batch.column_names])
    for name in schema.names:
        batch = batch.append_column(schema.field(name), pa.array(rows[name], type=schema.field(name).type))
    return batch


def measure(checkpoint: Path, rows: int, calls: int) -> dict[str, Any]:
    from pipelines.columns import WINDOWS
    from pipelines.stage import packed_windows

    classifier, table = tokenized_call(checkpoint, rows)
    old_out, new_out = old_path(classifier, table), new_path(classifier, table)
    if not old_out.equals(new_out):
        raise AssertionError("the two paths disagree on the output table")
    timings: dict[str, list[float]] = {"old": [], "new": [], "old_read": [], "new_read": []}
    column = table.column(WINDOWS)
    for _ in range(calls):
        for name, path in (("old", old_path), ("new", new_path)):
            started = time.perf_counter()
            path(classifier, table)
            timings[name].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        column.to_pylist()
        timings["old_read"].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        packed_windows(column)
        timings["new_read"].append(1000 * (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "rows": rows,
        "windows": int(sum(len(row) for row in column.to_pylist() if row)),
        "calls": calls,
        "median_ms": medians,
        "min_ms": {name: min(values) for name, values in timings.items()},
        "speedup": medians["old"] / medians["new"],
    }


def render(result: dict[str, Any], facts: dict[str, Any]) -> str:
    median, low = result["median_ms"], result["min_ms"]
    rows = [
        [
            "whole call, old path (to_pylist, per-row padding, np.mean per text)",
            f"{median['old']:.1f}",
            f"{low['old']:.1f}",
            "1.00x",
            "",
        ],
        [
            "whole call, new path (Arrow buffers, indexed padding, reduceat)",
            f"{median['new']:.1f}",
            f"{low['new']:.1f}",
            ratio(median["old"], median["new"]),
            f"<= {TARGET_MS:.0f} ms: {'met' if median['new'] <= TARGET_MS else 'MISSED'}",
        ],
        [
            "of which reading the windows, old (to_pylist)",
            f"{median['old_read']:.2f}",
            f"{low['old_read']:.2f}",
            "",
            "",
        ],
        [
            "of which reading the windows, new (offsets + values)",
            f"{median['new_read']:.2f}",
            f"{low['new_read']:.2f}",
            ratio(median["old_read"], median["new_read"]),
            "",
        ],
    ]
    header = (
        f"Host work per {result['rows']:,}-row call ({result['windows']:,} windows), no-op engine, "
        f"{result['calls']} calls each; {facts['cpu']}, {facts['cores']} CPUs; {facts['date']}\n"
        f"`{facts['command']}`\n\n"
    )
    table = markdown_table(["path", "median ms", "min ms", "speed-up", "target"], rows, right=(1, 2, 3))
    return header + table + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="rows per call (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=40, help="timed calls of each path (default: %(default)s)")
    parser.add_argument(
        "--out", default="benchmarks/out/host-overhead", help="working directory (default: %(default)s)"
    )
    options = parser.parse_args(argv)
    work_offline()
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = measure(ensure_checkpoint(out, "tiny"), options.rows, options.calls)
    facts = machine("benchmarks host-overhead", argv)
    write_json(out / "host_overhead.json", {**facts, **result})
    print(render(result, facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
