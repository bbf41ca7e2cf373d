"""`PipelineArgs`: every option of the offline batch job, typed, with the shared `ModelConfig` inside.

A YAML file's ``model:`` and ``batch:`` sections and ``sentiment batch`` flags are read into this one
object; `pipelines.batch.run` executes it. Nothing here imports ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sentiment.config import ModelConfig, parse_section
from sentiment.engines import backend_of


class ScoringArgs(BaseModel):
    """What scoring a Dataset takes: the model, the column that holds the texts, and the actor pool that runs it.

    `pipelines.scoring.score` takes these for a user's own Dataset; `PipelineArgs` adds the files of
    the batch job. Every field is also a flag of ``sentiment batch``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The model every actor loads.",
    )
    text_column: str = Field("text", min_length=1, description="Input column that holds the reviews.")
    min_actors: int | None = Field(
        None, ge=1, description="Fewest model actors in the pool. None: 1 with GPU actors, else max_actors."
    )
    max_actors: int | None = Field(
        None,
        ge=1,
        description=(
            "Most model actors in the pool; Ray Data scales between the two. None: one per GPU up in the "
            "cluster (at least one) with GPU actors, else one per CPU core (fewer where a node's "
            "memory cannot hold that many model copies, or the job makes fewer model calls)."
        ),
    )
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description=(
            "GPUs per actor; a fraction packs several actors on one card. Unless model.gpu_memory_fraction "
            "is set, a fractional actor caps its CUDA memory to this fraction. 'auto': 1 when the cluster "
            "has GPUs when the job starts, else 0 (CPU actors). On an autoscaling cluster whose GPU nodes "
            "start at zero, give a number: 'auto' sees no GPU there."
        ),
    )
    num_cpus: float | None = Field(
        None,
        ge=0,
        description=(
            "Logical CPUs each model actor reserves from Ray. None: 1 for a GPU actor; CPU actors share all "
            "of their node's CPUs but one, where Ray Data's reads and writes run."
        ),
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description=(
            "Torch threads of each CPU model actor. None: one, with an actor per core; the node's cores shared "
            "among its actors where there are fewer (memory, or a short job)."
        ),
    )
    rows_per_call: int = Field(
        1024,
        ge=1,
        description=(
            "Rows per model call, and per slice: the unit the job reads, writes as one output file and, after "
            "a crash, re-does. The classifier sorts a call's rows by length and packs them under "
            "model.forward_max_tokens, so bigger calls pad less; smaller ones lose less to a crash."
        ),
    )

    @model_validator(mode="after")
    def _check_actors(self) -> ScoringArgs:
        if self.min_actors is not None and self.max_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) exceeds max_actors ({self.max_actors})")
        return self

    def actor_gpus(self, cluster_gpus: float) -> float:
        """GPUs each actor reserves: `num_gpus`, with 'auto' resolved against the cluster's GPUs."""
        if self.num_gpus == "auto":
            # ONNX Runtime runs on the CPU: its actors take no GPU.
            return 1.0 if cluster_gpus > 0 and backend_of(self.model) == "torch" else 0.0
        return float(self.num_gpus)


class PipelineArgs(ScoringArgs):
    """The batch job: which Parquet to read and write, the model, and the actor pool that runs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str | list[str] = Field(
        description=(
            "Parquet input: a file, a directory (its *.parquet files, recursively), a glob, or a list of "
            "these; local paths or any URI pyarrow knows (s3://, gs://, ...)."
        ),
    )
    output: str = Field(
        min_length=1,
        description="Output directory (local path or URI); it receives Parquet parts and a _SUCCESS marker.",
    )
    keep: list[str] | None = Field(
        None,
        description=(
            "Input columns to carry into the output, in this order. None: all of them. The text column "
            "is read either way, but written only when kept."
        ),
    )
    overwrite: bool = Field(False, description="Replace an output directory that already holds results.")
    resume: bool = Field(
        False,
        description=(
            "Continue an interrupted run: keep the slices it already wrote (checked against its manifest), "
            "score the rest."
        ),
    )

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items or any(not item for item in items):
            raise ValueError("input must name at least one file, directory or glob, and no empty path")
        return value

    @field_validator("keep")
    @classmethod
    def _check_keep(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or any(not name for name in value):
            raise ValueError("keep must list at least one column name, and no empty name")
        if len(set(value)) != len(value):
            raise ValueError(f"keep lists a column twice: {value}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> PipelineArgs:
        if self.overwrite and self.resume:
            raise ValueError("give either overwrite (start over) or resume (continue), not both")
        return self

    @property
    def inputs(self) -> list[str]:
        """`input` as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_pipeline_args(data: PipelineArgs | Mapping[str, Any], source: str = "batch") -> PipelineArgs:
    """A `PipelineArgs` from a mapping (a YAML ``batch:`` section plus ``model``), errors naming each bad field."""
    return parse_section(PipelineArgs, data, source)
