"""`pipelines.dataset`: the job's Ray Data graph as one list of stages, and the scoring stages on any Dataset.

Outputs are sorted by id before comparing: Ray Data does not keep row order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.args import PipelineArgs
from pipelines.dataset import (
    TOKENIZE_CPUS,
    Stage,
    build,
    model_stage,
    scoring_stages,
    select_columns,
    stages,
)
from pipelines.plan import plan_inputs, with_labels
from pipelines.pool import NodeShape, pool_sizes
from pipelines.read import read_slices, slice_source
from pipelines.stage import ModelStage, tokenize
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier

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


def test_a_stage_passes_constructor_kwargs_to_a_class_and_call_kwargs_to_a_function() -> None:
    as_class = Stage("model", ModelStage, {"threads": 1}, {"batch_size": 8})
    as_function = Stage("select", select_columns, {"columns": ["a"]}, {"batch_size": None})
    assert as_class.map_batches_args() == {"fn_constructor_kwargs": {"threads": 1}, "batch_size": 8}
    assert as_function.map_batches_args() == {"fn_kwargs": {"columns": ["a"]}, "batch_size": None}
    table = pa.table({"b": [1], "a": [2], "c": [3]})
    assert select_columns(table, columns=["c", "a"]).column_names == ["c", "a"]
