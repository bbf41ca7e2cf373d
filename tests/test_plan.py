"""`pipelines.plan`: the checks that fail a job before Ray starts or any model loads, and the slices.

The job-level checks go through `pipelines.batch.run` with a model path that does not exist: they
must fail on the input, before the model's config is even read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.args import PipelineArgs
from pipelines.batch import run
from pipelines.columns import WORKING_COLUMNS
from pipelines.plan import Slice, plan_inputs, plan_slices, slice_id, with_labels
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from sentiment.testing import write_corpus

ABSENT_MODEL = ModelConfig(model_id="/nonexistent/model")


def checked(tmp_path: Path, spec: str | list[str], **fields: Any) -> Any:
    args = PipelineArgs(model=fields.pop("model", ABSENT_MODEL), input=spec, output=str(tmp_path / "out"), **fields)
    return run(args)


def test_missing_text_column_names_the_file_and_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1], "review": ["fine"]}), tmp_path / "reviews.parquet")
    with pytest.raises(InvalidInputError, match=r"reviews.parquet has no text column 'text'; its columns are"):
        checked(tmp_path, str(tmp_path / "reviews.parquet"))
    plan = plan_inputs(
        PipelineArgs(model=ModelConfig(model_id="x"), text_column="review", input=str(tmp_path), output="o")
    )
    assert plan.read_columns == ["id", "review"]


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", rows=4, files=1)
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InvalidInputError, match=r"in/broken.parquet is not a readable Parquet file"):
        checked(tmp_path, str(tmp_path / "in"))
    (tmp_path / "notes.txt").write_text("a film")
    with pytest.raises(InvalidInputError, match=r"notes.txt is not a readable Parquet file"):
        checked(tmp_path, [str(tmp_path / "in" / "part-00000.parquet"), str(tmp_path / "notes.txt")])


def test_empty_or_absent_inputs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"input directory .*/empty holds no Parquet files"):
        checked(tmp_path, str(tmp_path / "empty"))
    with pytest.raises(InvalidInputError, match=r"input .*/absent does not exist"):
        checked(tmp_path, str(tmp_path / "absent"))
    with pytest.raises(InvalidInputError, match=r"input .*/empty/\*.parquet matches no files"):
        checked(tmp_path, str(tmp_path / "empty" / "*.parquet"))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty" / "none.parquet")
    with pytest.raises(InvalidInputError, match=r"has no rows \(1 file\(s\), all empty\)"):
        checked(tmp_path, str(tmp_path / "empty"))


def test_columns_that_cannot_be_read_together_are_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["x"], "text": ["b"]}), tmp_path / "b.parquet")
    with pytest.raises(InvalidInputError, match=r"b.parquet has column types that differ from .*a.parquet"):
        checked(tmp_path, str(tmp_path))
    with pytest.raises(InvalidInputError, match=r"a.parquet has no column 'title' \(from keep\)"):
        checked(tmp_path, str(tmp_path), keep=["title"])
    pq.write_table(pa.table({"__slice": ["/x"], "text": ["c"]}), tmp_path / "c.parquet")
    with pytest.raises(InvalidInputError, match=r"input column '__slice' clashes with a column the batch job adds"):
        checked(tmp_path, str(tmp_path / "c.parquet"))
    pq.write_table(pa.table({"id": [2], "text": ["d"], "stars": [5]}), tmp_path / "d.parquet")
    with pytest.raises(InvalidInputError, match=r"d.parquet has columns \['id', 'text', 'stars'\] but .*a.parquet has"):
        checked(tmp_path, [str(tmp_path / "a.parquet"), str(tmp_path / "d.parquet")])
    plan = plan_inputs(
        PipelineArgs(
            model=ABSENT_MODEL,
            input=[str(tmp_path / "a.parquet"), str(tmp_path / "d.parquet")],
            output="o",
            keep=["id"],
        )
    )
    assert plan.read_columns == ["id", "text"]


@pytest.mark.parametrize("num_gpus", [0, 1])
@pytest.mark.parametrize("column", WORKING_COLUMNS)
def test_every_working_column_in_the_input_is_refused_before_the_job_picks_gpu_or_cpu_actors(
    tmp_path: Path, column: str, num_gpus: int
) -> None:
    # `__windows` once passed this check and broke only the GPU path (tokenize tasks), with an Arrow error.
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["a fine film"], column: [0]}), path)
    refusal = re.escape(f"input column '{column}' clashes with a column the batch job adds while it runs (in {path})")
    with pytest.raises(InvalidInputError, match=refusal):
        checked(tmp_path, str(path), num_gpus=num_gpus)
    # As the text column too.
    pq.write_table(pa.table({"id": [1], column: ["a fine film"]}), path)
    with pytest.raises(InvalidInputError, match=refusal):
        checked(tmp_path, str(path), num_gpus=num_gpus, text_column=column)
    # Left out with keep, it is never read: nothing clashes.
    args = PipelineArgs(model=ABSENT_MODEL, input=str(path), output="o", keep=["id"], text_column="id")
    assert plan_inputs(args).read_columns == ["id"]


def test_the_output_directory_is_never_read_as_input(tmp_path: Path) -> None:
    write_corpus(tmp_path / "data", rows=6, files=2)
    write_corpus(tmp_path / "data" / "scored", rows=3, files=1)
    write_corpus(tmp_path / "data" / "scored.staging", rows=3, files=1)
    args = PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path / "data"), output=str(tmp_path / "data" / "scored"))
    assert [Path(item.path).name for item in plan_inputs(args).inputs] == ["part-00000.parquet", "part-00001.parquet"]


def test_every_row_is_in_exactly_one_slice_of_one_row_group(tmp_path: Path) -> None:
    table = pa.table({"id": list(range(10)), "text": ["a film"] * 10})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=6)
    pq.write_table(table.slice(0, 3), tmp_path / "b.parquet")
    plan = plan_inputs(PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path), output="o", rows_per_call=4))
    assert [item.row_groups for item in plan.inputs] == [(6, 4), (3,)]
    assert plan.slices == [
        Slice(file=0, number=0, row_group=0, offset=0, rows=4),
        Slice(file=0, number=1, row_group=0, offset=4, rows=2),
        Slice(file=0, number=2, row_group=1, offset=0, rows=4),
        Slice(file=1, number=0, row_group=0, offset=0, rows=3),
    ]
    assert plan.slices == plan_slices(plan.inputs, 4)
    assert [piece.id for piece in plan.slices] == ["00000-00000", "00000-00001", "00000-00002", "00001-00000"]
    assert slice_id(12, 3) == "00012-00003"


def test_the_labels_name_the_score_columns_and_a_kept_column_named_like_one_is_renamed(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1], "text": ["a"], "label": ["pos"]}), tmp_path / "a.parquet")
    plan = with_labels(plan_inputs(PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path), output="o")), ["neg", "pos"])
    assert plan.output_columns == [
        "id",
        "text",
        "input_label",
        "label",
        "score",
        "score_neg",
        "score_pos",
        "num_tokens",
        "truncated",
        "error",
    ]
