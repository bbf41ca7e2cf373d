"""`score`: sentiment columns for any Ray Dataset, inside a user's own pipeline.

As ``ray.data.llm``'s processors do for LLMs: a team whose reviews already live in a Ray Dataset
(``read_json``, ``from_items``, a database, their own maps and filters) adds the predictions as a
lazy step and writes where it likes. The stages, their actor pool and the output columns are those
of ``sentiment batch`` (`pipelines.dataset.scoring_stages`, `pipelines.pool`, `pipelines.schema`),
which uses the same stages behind its Parquet slices, resume and commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pipelines.args import ScoringArgs
from pipelines.columns import check_input_columns
from pipelines.dataset import Stage, build, scoring_stages
from pipelines.plan import actor_bytes
from pipelines.pool import cluster_pool
from pipelines.texts import as_text
from sentiment.config import ModelConfig, parse_section
from sentiment.engines import prepare_onnx
from sentiment.errors import InvalidInputError

if TYPE_CHECKING:
    from ray.data import Dataset


def score(
    ds: Dataset, model: ModelConfig | Mapping[str, Any] | str | None = None, *, text_column: str = "text", **pool: Any
) -> Dataset:
    """``ds`` with the prediction columns appended: ``label``, ``score``, a ``score_<label>`` per label,
    ``num_tokens``, ``truncated`` and ``error`` (as ``sentiment batch`` writes them; an input column
    named like one of them is renamed ``input_<name>``).

    Lazy, like any Dataset transform: nothing runs until the result is consumed or written. A row whose
    text is null, empty or not a string keeps its columns and gets an ``error`` instead of a
    prediction; every row comes out once.

    ``model``: a `ModelConfig`, a mapping of its fields, or a hub id or checkpoint directory (default:
    the default model). ``pool``: the actor-pool fields of `pipelines.args.ScoringArgs` (``num_gpus``,
    ``min_actors``, ``max_actors``, ``num_cpus``, ``cpu_threads``, ``rows_per_call``); by default the
    pool ``sentiment batch`` would run on this cluster (one actor per GPU, else one per CPU core),
    starting from one actor and growing as blocks queue.

    >>> import ray, pipelines
    >>> scored = pipelines.score(ray.data.read_json("reviews.jsonl"), "./models/bert-imdb", text_column="review")
    >>> scored.filter(lambda row: row["label"] == "neg").write_parquet("negative/")
    """
    import ray

    args = scoring_args(model, text_column, pool)
    # Checked here when the Dataset already knows its columns; a lazy read is not run to find out.
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        check_input_columns(list(schema.names), "the dataset")
        if text_column not in schema.names:
            raise InvalidInputError(
                f"text column {text_column!r} not found; the dataset's columns are {list(schema.names)}"
            )
    # ONNX Runtime on a torch checkpoint: exported once into the local cache here, not by every actor.
    prepare_onnx(args.model)
    if not ray.is_initialized():
        ray.init()
    sizes = cluster_pool(args, calls=None, actor_bytes=actor_bytes(args.model))
    if args.min_actors is None and sizes.min_actors > 1:
        # The Dataset's size is unknown before it runs: the pool starts with one actor and grows to
        # the full pool as blocks queue, so a small Dataset does not load a model per core for nothing.
        sizes = replace(sizes, min_actors=1)
    # Text columns as strings block by block, before any stage gathers blocks into a call: a Dataset
    # can mix types across blocks (a JSON file whose reviews are numbers), which Arrow cannot concatenate.
    texts = Stage(
        "texts",
        as_text,
        {"text_column": args.text_column},
        {"batch_size": None, "batch_format": "pyarrow", "udf_modifying_row_count": False},
    )
    return build(ds, [texts, *scoring_stages(args.model, args.text_column, sizes, args.rows_per_call)])


def scoring_args(
    model: ModelConfig | Mapping[str, Any] | str | None, text_column: str, pool: Mapping[str, Any]
) -> ScoringArgs:
    """`ScoringArgs` from `score`'s arguments; `InvalidInputError` naming each bad field."""
    if isinstance(model, str):
        config = ModelConfig(model_id=model)
    elif model is None:
        config = ModelConfig()
    else:
        config = parse_section(ModelConfig, model, "model")
    return parse_section(ScoringArgs, {"model": config, "text_column": text_column, **pool}, "score")
