"""The batch job's stages in-process: `TokenizeStage` then `ModelStage` on pyarrow column batches.

They run here on the driver, not in Ray Data actors, against the shared local Ray (`ModelStage`
asks Ray which GPUs it reserved: none, in the driver, so it runs on the CPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.columns import STAGE_COLUMNS, WINDOWS
from pipelines.stage import ActorLog, ModelStage, TokenizeStage, packed_windows
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from sentiment.model import SentimentClassifier

OUTPUT = ["label", "score", "score_neg", "score_pos", "num_tokens", "truncated", "error"]


@pytest.fixture(scope="module")
def stages(ray_session: Any, tiny_checkpoint: Path) -> tuple[TokenizeStage, ModelStage]:
    config = ModelConfig(model_id=str(tiny_checkpoint), device="cpu", max_length=64)
    return TokenizeStage(config), ModelStage(config)


def score(stages: tuple[TokenizeStage, ModelStage], table: pa.Table) -> pa.Table:
    tokenize, model = stages
    return model(tokenize(table))


def test_tokenize_then_model_equals_the_core_and_keeps_the_input_columns(
    stages: tuple[TokenizeStage, ModelStage], tiny_checkpoint: Path
) -> None:
    texts = ["good film", None, "  ", "bad film " * 40, ""]
    table = pa.table({"id": [1, 2, 3, 4, 5], "text": pa.array(texts, pa.string()), "label": ["x"] * 5})
    tokenized = stages[0](table)
    assert tokenized.column_names == ["id", "text", "label", *STAGE_COLUMNS]
    out = stages[1](tokenized)
    assert out.column_names == ["id", "text", "input_label", *OUTPUT]
    assert out.column("error").to_pylist() == [None, "text is null", "text is empty", None, "text is empty"]
    core = SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cpu", max_length=64))
    direct = core.predict(["good film", "bad film " * 40])
    assert out.column("label").to_pylist()[0::3][:2] == [p.label for p in direct]
    got = np.array(out.column("score_pos").to_pylist()[0::3][:2], dtype=float)
    np.testing.assert_allclose(got, [p.scores["pos"] for p in direct], atol=1e-6)
    assert out.column("num_tokens").to_pylist()[3] == direct[1].num_tokens
    assert out.column("truncated").to_pylist() == [False, None, None, True, None]
    assert out.schema.field("num_tokens").type == pa.int64()


def test_windows_follow_the_long_text_strategy(stages: tuple[TokenizeStage, ModelStage]) -> None:
    tokenized = stages[0](pa.table({"text": ["word " * 200]}))
    (windows,) = tokenized.column(WINDOWS).to_pylist()
    assert [len(window) for window in windows] == [64]  # head_tail: one window at the limit


def test_a_batch_without_the_text_column_is_refused_naming_it(stages: tuple[TokenizeStage, ModelStage]) -> None:
    with pytest.raises(InvalidInputError, match=r"text column 'text' not found; columns are \['review'\]"):
        stages[0](pa.table({"review": ["x"]}))


def test_the_model_stage_marks_only_the_row_that_does_not_fit_in_gpu_memory(
    stages: tuple[TokenizeStage, ModelStage], monkeypatch: pytest.MonkeyPatch
) -> None:
    classifier = stages[1].classifier
    original = classifier._forward_batch

    def forward(batch: list[list[int]]) -> np.ndarray:
        if max(len(sequence) for sequence in batch) >= 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(batch)

    monkeypatch.setattr(classifier, "_forward_batch", forward)
    out = score(stages, pa.table({"text": ["a fine film", "dull " * 60, None], "id": [1, 2, 3]}))
    errors = out.column("error").to_pylist()
    assert errors[0] is None
    assert errors[1] is not None
    assert "does not fit in cpu memory even alone" in errors[1]
    assert errors[2] == "text is null"
    assert out.column("label").to_pylist()[0] in ("neg", "pos")
    assert out.column("label").to_pylist()[1:] == [None, None]
    assert out.column("id").to_pylist() == [1, 2, 3]


def test_the_actor_log_sums_what_the_model_actors_report() -> None:
    log = ActorLog()
    log.add("a", {"device": "cpu"})
    log.add("b", {"device": "cuda:0"})
    log.progress("a", {"rows": 10, "tokens_run": 100, "tokens_padded": 120})
    log.progress("a", {"rows": 30, "tokens_run": 300, "tokens_padded": 330})  # cumulative: the latest counts
    log.progress("b", {"rows": 5, "tokens_run": 50, "tokens_padded": 50})
    assert log.totals() == {"rows": 35, "tokens_run": 350, "tokens_padded": 380}
    assert log.entries()[0] == {"device": "cpu", "rows": 30, "tokens_run": 300, "tokens_padded": 330}


def test_a_model_actor_runs_the_threads_its_pool_gave_it(ray_session: Any, tiny_checkpoint: Path) -> None:
    before = torch.get_num_threads()
    try:
        ModelStage(ModelConfig(model_id=str(tiny_checkpoint), device="cpu"), threads=1)
        assert torch.get_num_threads() == 1
        ModelStage(ModelConfig(model_id=str(tiny_checkpoint), device="cpu"), threads=10_000)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))  # never more than the cores
    finally:
        torch.set_num_threads(before)


def test_a_cpu_model_actor_tokenizes_its_own_slice_as_the_tokenize_stage_would(
    stages: tuple[TokenizeStage, ModelStage], tiny_checkpoint: Path
) -> None:
    config = ModelConfig(model_id=str(tiny_checkpoint), device="cpu", max_length=64)
    table = pa.table({"id": [1, 2, 3], "text": pa.array(["good film", None, "bad film " * 40], pa.string())})
    before = torch.get_num_threads()
    try:
        fused = ModelStage(config, tokenize=True)(table)
    finally:
        torch.set_num_threads(before)
    assert fused.equals(score(stages, table))


def test_windows_are_read_from_the_arrow_buffers_whatever_the_chunks_slices_and_nulls() -> None:
    windows_type = pa.list_(pa.list_(pa.int32()))
    rows = [[[101, 1, 102], [101, 2, 2, 102]], None, [[101, 3, 102]], [[101, 4, 102], [101, 5, 102], [101, 6, 102]]]
    chunked = pa.chunked_array([pa.array(rows[:2], windows_type), pa.array(rows[2:], windows_type)])
    packed, counts = packed_windows(chunked)
    assert counts.tolist() == [2, 0, 1, 3]
    assert packed.tolist() == [window for row in rows if row for window in row]
    # A slice of a bigger column (as a block cut from a read): its own rows only.
    sliced = pa.array(rows * 2, windows_type).slice(3, 3)
    packed, counts = packed_windows(sliced)
    assert counts.tolist() == [3, 2, 0]
    assert packed.tolist() == [*rows[3], *rows[0]]
    assert packed.values.dtype == np.int32  # straight from the buffer


def test_the_model_stage_on_a_batch_of_errors_only_and_on_an_empty_one(
    stages: tuple[TokenizeStage, ModelStage],
) -> None:
    errors_only = score(stages, pa.table({"id": [1, 2], "text": pa.array([None, " "], pa.string())}))
    assert errors_only.column("error").to_pylist() == ["text is null", "text is empty"]
    assert errors_only.column("label").to_pylist() == [None, None]
    empty = score(stages, pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}))
    assert (empty.num_rows, empty.column_names) == (0, ["id", "text", *OUTPUT])
