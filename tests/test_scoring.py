"""`pipelines.score` on users' own Datasets: a real local Ray, Datasets from ``from_items`` and ``read_json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from ray.data.expressions import col

import pipelines
from pipelines.schema import prediction_columns
from sentiment.errors import InvalidInputError
from sentiment.model import SentimentClassifier

REVIEWS = ["a wonderful, moving film", "two hours I will never get back", "fine", "the plot was dull " * 200]


def rows_by_id(ds: Any) -> list[dict[str, Any]]:
    # Ray Data keeps no order across blocks: every row carries an id.
    return sorted(ds.take_all(), key=lambda row: row["id"])


def test_score_appends_the_batch_jobs_columns_to_a_dataset_from_items(
    ray_session: Any, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    items = [{"id": i, "review": text, "stars": i % 5} for i, text in enumerate(REVIEWS)]
    items += [{"id": 4, "review": None, "stars": 1}, {"id": 5, "review": "   ", "stars": 2}]
    ds = ray_session.data.from_items(items, override_num_blocks=3)

    scored = pipelines.score(ds, str(tiny_checkpoint), text_column="review", num_gpus=0, rows_per_call=2)
    assert scored.columns() == ["id", "review", "stars", *prediction_columns(classifier.labels)]
    rows = rows_by_id(scored)
    assert [row["id"] for row in rows] == [0, 1, 2, 3, 4, 5]
    want = classifier.predict(REVIEWS)
    for row, prediction in zip(rows, want, strict=False):
        assert (row["label"], row["num_tokens"], row["truncated"], row["error"]) == (
            prediction.label,
            prediction.num_tokens,
            prediction.truncated,
            None,
        )
        assert row["score"] == pytest.approx(prediction.score, abs=1e-5)
        assert row["score_pos"] == pytest.approx(prediction.scores["pos"], abs=1e-5)
    # Bad rows keep their columns and carry their error; nothing is dropped.
    assert [(row["stars"], row["label"], row["error"]) for row in rows[4:]] == [
        (1, None, "text is null"),
        (2, None, "text is empty"),
    ]


def test_score_composes_with_read_json_filters_and_writes_of_the_users_own(
    ray_session: Any, tiny_checkpoint: Path, classifier: SentimentClassifier, tmp_path: Path
) -> None:
    lines = [{"id": i, "text": text} for i, text in enumerate(REVIEWS)] + [{"id": 9, "text": 42}]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:4]))
    (tmp_path / "more.jsonl").write_text(json.dumps(lines[4]) + "\n")
    ds = ray_session.data.read_json(str(tmp_path), file_extensions=["jsonl"])

    scored = pipelines.score(ds, {"model_id": str(tiny_checkpoint), "long_text": "head"}, num_gpus=0)
    want = classifier.predict(REVIEWS, "head")
    top = scored.filter(expr=col("label") == want[0].label)
    top.write_parquet(str(tmp_path / "out"))

    written = pq.read_table(tmp_path / "out").sort_by("id").to_pylist()
    assert [row["id"] for row in written] == [i for i, p in enumerate(want) if p.label == want[0].label]
    # A file whose text column is not a string is scored with a row error, not a failed job.
    errors = {row["id"]: row["error"] for row in scored.take_all() if row["error"]}
    assert errors == {9: "text must be a string, got int64"}


def test_score_on_logical_gpu_actors_tokenizes_in_tasks_and_gives_the_same_predictions(
    ray_session: Any, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    ds = ray_session.data.from_items([{"id": i, "text": text} for i, text in enumerate(REVIEWS)])
    # The shared Ray's GPU is logical: a GPU actor runs on the CPU only when told so.
    model = {"model_id": str(tiny_checkpoint), "device": "auto", "dtype": "fp32", "gpu_fallback": "cpu"}
    rows = rows_by_id(pipelines.score(ds, model, num_gpus=1))
    assert [row["label"] for row in rows] == [p.label for p in classifier.predict(REVIEWS)]


def test_score_refuses_bad_arguments_naming_them(ray_session: Any, tiny_checkpoint: Path) -> None:
    ds = ray_session.data.from_items([{"id": 1, "text": "fine", "__windows": 3}])
    ds = ds.materialize()  # its columns are known without running anything
    with pytest.raises(InvalidInputError, match="input column '__windows' clashes"):
        pipelines.score(ds, str(tiny_checkpoint))
    with pytest.raises(InvalidInputError, match="text column 'review' not found"):
        pipelines.score(ds.drop_columns(["__windows"]).materialize(), str(tiny_checkpoint), text_column="review")
    with pytest.raises(InvalidInputError, match=r"score\.num_gpus"):
        pipelines.score(ds, str(tiny_checkpoint), num_gpus=-1)
    with pytest.raises(InvalidInputError, match=r"model\.long_text"):
        pipelines.score(ds, {"model_id": str(tiny_checkpoint), "long_text": "middle"})
    with pytest.raises(InvalidInputError, match=r"score\.num_actors: Extra inputs are not permitted"):
        pipelines.score(ds, str(tiny_checkpoint), num_actors=2)
