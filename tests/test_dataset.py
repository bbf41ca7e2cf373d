"""`pipelines.dataset`: the job's Ray Data graph as one list of stages, and the scoring stages on any Dataset.

Outputs are sorted by id before comparing: Ray Data does not keep row order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.args import PipelineArgs
from pipelines.columns import SLICE
from pipelines.dataset import (
    TOKENIZE_CPUS,
    Stage,
    build,
    guard,
    model_stage,
    scoring_stages,
    select_columns,
    stages,
)
from pipelines.errors import StageError, stage_error
from pipelines.plan import plan_inputs, with_labels
from pipelines.pool import NodeShape, pool_sizes
from pipelines.read import item_slices, read_slices, slice_source
from pipelines.stage import ModelStage, tokenize
from sentiment.config import ModelConfig
from sentiment.errors import ModelLoadError
from sentiment.model import SentimentClassifier
from tests.helpers import invalid_utf8_strings

ABSENT_MODEL = ModelConfig(model_id="/nonexistent/model")


def test_map_batches_runs_the_shared_class_on_an_actor_pool(tiny_checkpoint: Path) -> None:
    from ray.data import ActorPoolStrategy

    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint)),
        input="in",
        output="out",
        min_actors=2,
        max_actors=8,
        num_gpus=0.25,
        rows_per_call=128,
        cpu_threads=2,
    )
    pool = pool_sizes(args, cluster_gpus=0, nodes=[NodeShape(4)])
    stage = model_stage(args.model, args.text_column, pool, args.rows_per_call, actor_log=None)
    assert (stage.name, stage.fn, stage.rows_per_block) == ("model", ModelStage, None)
    options = stage.map_batches_args()
    compute = options.pop("compute")
    assert isinstance(compute, ActorPoolStrategy)
    assert (compute.min_size, compute.max_size) == (2, 8)
    assert options == {
        "fn_constructor_kwargs": {
            "config": args.model.model_copy(update={"gpu_memory_fraction": 0.25}),
            "actor_log": None,
            "threads": 2,
            "tokenize": False,  # GPU actors get token windows from the tokenize tasks
            "text_column": "text",
        },
        "batch_size": 128,  # map_batches' own name for rows per call
        "batch_format": "pyarrow",
        "num_cpus": 1.0,  # a GPU actor
        "num_gpus": 0.25,
        "udf_modifying_row_count": False,
    }


@pytest.fixture
def plan(tmp_path: Path) -> Any:
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"], "label": ["neg", "pos"]}), tmp_path / "a.parquet")
    args = PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path), output=str(tmp_path / "out"), keep=["id", "label"])
    return with_labels(plan_inputs(args), ["neg", "pos"])


def job_args(num_gpus: float, **fields: Any) -> PipelineArgs:
    return PipelineArgs(model=ABSENT_MODEL, input="in", output="out", num_gpus=num_gpus, rows_per_call=64, **fields)


def test_the_job_graph_is_one_list_read_tokenize_model_select_with_gpu_actors_and_no_tokenize_with_cpu_actors(
    plan: Any,
) -> None:
    gpu_args, cpu_args = job_args(1), job_args(0)
    on_gpus = stages(gpu_args, pool_sizes(gpu_args, cluster_gpus=2, nodes=[NodeShape(8)]), plan)
    on_cpus = stages(cpu_args, pool_sizes(cpu_args, cluster_gpus=0, nodes=[NodeShape(8)], calls=4), plan)
    assert [stage.name for stage in on_gpus] == ["read", "tokenize", "model", "select"]
    assert [stage.name for stage in on_cpus] == ["read", "model", "select"]
    assert [stage.fn for stage in on_gpus] == [read_slices, tokenize, ModelStage, select_columns]

    read, tokenizing, model, select = on_gpus
    assert read.kwargs["schema"] == plan.read_schema
    assert (read.kwargs["rows_per_slice"], read.kwargs["text_column"]) == (64, "text")
    # Only the read cuts its output into blocks: one slice each.
    assert [stage.rows_per_block for stage in on_gpus] == [64, None, None, None]
    assert tokenizing.map_batches_args() == {
        "fn_kwargs": {"config": gpu_args.model, "text_column": "text"},
        "batch_size": 64,
        "batch_format": "pyarrow",
        "num_cpus": TOKENIZE_CPUS,
        "udf_modifying_row_count": False,
    }
    assert (model.kwargs["tokenize"], model.map_batches_kwargs["num_gpus"]) == (False, 1.0)
    assert (on_cpus[1].kwargs["tokenize"], "num_gpus" in on_cpus[1].map_batches_kwargs) == (True, False)
    columns = ["id", "input_label", "label", "score", "score_neg", "score_pos", "num_tokens", "truncated", "error"]
    assert select.kwargs == {"columns": [*columns, "__slice"]}
    assert on_cpus[-1] == select


def test_gpu_actors_get_windows_from_tokenize_tasks_and_cpu_actors_tokenize_their_own(
    ray_session: Any, plan: Any
) -> None:
    import ray

    def operators(ds: Any) -> list[str]:
        names, op = [], ds._logical_plan.dag
        while op.input_dependencies:
            names.append(op.name)
            (op,) = op.input_dependencies
        return names[::-1]

    def scoring(num_gpus: float) -> list[str]:
        args = job_args(num_gpus)
        pool = pool_sizes(args, cluster_gpus=num_gpus, nodes=[NodeShape(8)], calls=4)
        graph = scoring_stages(args.model, args.text_column, pool, args.rows_per_call)
        return operators(build(ray.data.from_items([{"text": "x"}]), graph))

    assert scoring(1) == ["MapBatches(tokenize)", "MapBatches(ModelStage)"]
    assert scoring(0) == ["MapBatches(ModelStage)"]

    # The whole job: the same loop over its list, from the read to the selected columns.
    args = job_args(1)
    pool = pool_sizes(args, cluster_gpus=1, nodes=[NodeShape(8)], calls=4)
    job = operators(build(slice_source(plan, plan.slices), stages(args, pool, plan)))
    assert job == [
        "MapBatches(read_slices)",
        "StreamingRepartition[num_rows_per_block=64,strict=False]",
        "MapBatches(tokenize)",
        "MapBatches(ModelStage)",
        "MapBatches(select_columns)",
    ]


@pytest.mark.parametrize("num_gpus", [1, 0], ids=["gpu-actor-and-tokenize-tasks", "cpu-actor"])
def test_the_scoring_stages_score_any_dataset_with_a_text_column_even_one_of_another_type(
    ray_session: Any, tiny_checkpoint: Path, classifier: SentimentClassifier, num_gpus: float
) -> None:
    import ray

    # A Dataset the job did not read: another text column name, and blocks whose text is not a string.
    strings = pa.table({"id": [1, 2, 3, 4], "review": pa.array(["a good film", None, "  ", "dull " * 30])})
    numbers = pa.table({"id": [5, 6], "review": pa.array([7, None], pa.int64())})
    ds = ray.data.from_arrow([strings, numbers])
    # The shared Ray's GPU is logical: a GPU actor runs on the CPU only when told so. fp32, so that on a
    # GPU host, too, its scores match the CPU reference within 1e-5.
    config = ModelConfig(model_id=str(tiny_checkpoint), dtype="fp32", gpu_fallback="cpu")
    args = PipelineArgs(model=config, input="in", output="out", num_gpus=num_gpus, min_actors=1, max_actors=1)
    pool = pool_sizes(args, cluster_gpus=num_gpus, nodes=[NodeShape(8)], calls=2)
    graph = scoring_stages(config, "review", pool, rows_per_call=4)
    assert [stage.name for stage in graph] == (["tokenize", "model"] if num_gpus else ["model"])

    got = pa.Table.from_pylist(build(ds, graph).take_all()).sort_by("id")
    assert got.column_names == [
        "id",
        "review",
        "label",
        "score",
        "score_neg",
        "score_pos",
        "num_tokens",
        "truncated",
        "error",
    ]
    assert got.column("review").to_pylist() == ["a good film", None, "  ", "dull " * 30, "7", None]
    assert got.column("error").to_pylist() == [
        None,
        "text is null",
        "text is empty",
        None,
        "text must be a string, got int64",
        "text must be a string, got int64",
    ]
    expected = classifier.predict(["a good film", "dull " * 30])
    labels = got.column("label").to_pylist()
    assert [labels[0], labels[3]] == [p.label for p in expected]
    assert labels[1:3] == labels[4:] == [None, None]
    scores = got.column("score_pos").to_pylist()
    assert [scores[0], scores[3]] == pytest.approx([p.scores["pos"] for p in expected], abs=1e-5)


@pytest.mark.parametrize("num_gpus", [1, 0], ids=["gpu-actor-and-tokenize-tasks", "cpu-actor"])
def test_the_scoring_stages_give_texts_that_are_not_utf8_row_errors_in_any_dataset(
    ray_session: Any, tiny_checkpoint: Path, classifier: SentimentClassifier, num_gpus: float
) -> None:
    import ray

    # A user's own Dataset: a bytes text column, and a string column holding bytes that are not UTF-8.
    raw = pa.table({"id": [1, 2, 3], "review": pa.array([b"a great film", b"\xff bad", None], pa.binary())})
    unchecked = pa.table({"id": [4, 5], "review": invalid_utf8_strings([b"caf\xc3", b"a dull film"])})
    # The shared Ray's GPU is logical: a GPU actor runs on the CPU only when told so.
    config = ModelConfig(model_id=str(tiny_checkpoint), gpu_fallback="cpu")
    args = PipelineArgs(model=config, input="in", output="out", num_gpus=num_gpus, min_actors=1, max_actors=1)
    pool = pool_sizes(args, cluster_gpus=num_gpus, nodes=[NodeShape(8)], calls=2)
    graph = scoring_stages(config, "review", pool, rows_per_call=8)
    got = [
        pa.Table.from_pylist(build(ray.data.from_arrow(table), graph).take_all()).sort_by("id")
        for table in (raw, unchecked)
    ]
    assert [table.column("error").to_pylist() for table in got] == [
        [None, "text is not valid UTF-8 (byte 0xff at offset 0)", "text is null"],
        ["text is not valid UTF-8 (byte 0xc3 at offset 3)", None],
    ]
    assert [table.column("review").to_pylist() for table in got] == [
        ["a great film", "\ufffd bad", None],
        ["caf\ufffd", "a dull film"],
    ]
    expected = classifier.predict(["a great film", "a dull film"])
    assert [got[0].column("label")[0].as_py(), got[1].column("label")[1].as_py()] == [p.label for p in expected]


def test_a_stage_passes_constructor_kwargs_to_a_class_and_call_kwargs_to_a_function() -> None:
    as_class = Stage("model", ModelStage, {"threads": 1}, {"batch_size": 8})
    as_function = Stage("select", select_columns, {"columns": ["a"]}, {"batch_size": None})
    assert as_class.map_batches_args() == {"fn_constructor_kwargs": {"threads": 1}, "batch_size": 8}
    assert as_function.map_batches_args() == {"fn_kwargs": {"columns": ["a"]}, "batch_size": None}
    table = pa.table({"b": [1], "a": [2], "c": [3]})
    assert select_columns(table, columns=["c", "a"]).column_names == ["c", "a"]


def test_a_stage_that_raises_raises_a_stage_error_naming_the_stage_the_slices_and_the_cause() -> None:
    def fails(batch: pa.Table, *, column: str) -> pa.Table:
        raise KeyError(column)

    guarded = guard("select", fails)
    assert guarded.__name__ == "fails"  # Ray Data names the operator after it
    batch = pa.table({"x": [1, 2, 3], SLICE: ["00001-00004", "00001-00004", "00001-00005"]})
    with pytest.raises(StageError) as raised:
        guarded(batch, column="text")
    assert str(raised.value) == "stage 'select' failed on slices 00001-00004, 00001-00005 (3 rows): KeyError: 'text'"
    assert isinstance(raised.value.__cause__, KeyError)
    # A batch without slice ids (a Dataset the job did not read): its rows.
    with pytest.raises(StageError, match=r"^stage 'select' failed on a batch of 1 row: KeyError: 'text'$"):
        guarded(pa.table({"x": [1]}), column="text")


def test_a_guarded_class_keeps_its_name_and_fails_to_start_or_on_a_batch_as_a_stage_error() -> None:
    class Scorer:
        def __init__(self, *, load: bool) -> None:
            if not load:
                raise ModelLoadError("no weights in /models/x")

        def __call__(self, batch: pa.Table) -> pa.Table:
            raise ValueError("bad batch\nwith a second line")

    guarded = guard("model", Scorer)
    assert (guarded.__name__, issubclass(guarded, Scorer)) == ("Scorer", True)
    with pytest.raises(StageError, match=r"^stage 'model' failed to start: ModelLoadError: no weights in /models/x$"):
        guarded(load=False)
    with pytest.raises(
        StageError, match=r"^stage 'model' failed on slice 00000-00002 \(2 rows\): ValueError: bad batch$"
    ):
        guarded(load=True)(pa.table({SLICE: ["00000-00002"] * 2}))


def test_the_read_stage_names_the_slices_it_was_asked_for_when_its_file_fails(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), tmp_path / "a.parquet")
    items = pa.Table.from_pylist(
        [
            {
                "file": 2,
                "path": str(tmp_path / "gone.parquet"),
                "row_group": 0,
                "rows": 2,
                "first_slice": 0,
                "slices": [0],
            }
        ]
    )
    reader = guard("read", read_slices, item_slices)
    kwargs = {"filesystem": pafs.LocalFileSystem(), "schema": pa.schema([("id", pa.int64()), ("text", pa.string())])}
    with pytest.raises(StageError, match=r"^stage 'read' failed on slice 00002-00000: FileNotFoundError: "):
        list(reader(items, **kwargs, rows_per_slice=2, text_column="text"))


def test_scoring_stages_over_any_dataset_fail_with_a_message_naming_the_stage_and_the_cause(
    ray_session: Any, tiny_checkpoint: Path
) -> None:
    import ray

    config = ModelConfig(model_id=str(tiny_checkpoint))
    args = PipelineArgs(model=config, input="in", output="out", num_gpus=0, min_actors=1, max_actors=1)
    pool = pool_sizes(args, cluster_gpus=0, nodes=[NodeShape(8)], calls=1)
    ds = ray.data.from_items([{"review": "a good film"}])  # no column named "text"
    with pytest.raises(Exception, match=r"StageError") as raised:
        build(ds, scoring_stages(config, "text", pool, rows_per_call=4)).take_all()
    assert "stage 'model' failed on a batch of 1 row: InvalidInputError: text column 'text' not found" in str(
        raised.value
    )
    error = stage_error(raised.value)
    assert error is not None
    assert (error.stage, error.rows, error.reason) == (
        "model",
        1,
        "InvalidInputError: text column 'text' not found; columns are ['review']",
    )
