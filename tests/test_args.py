"""`pipelines.args.PipelineArgs`: the batch job's options, typed and checked where they are read."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from pipelines.args import PipelineArgs, parse_pipeline_args
from sentiment.errors import InvalidInputError


def test_defaults_read_a_text_column_and_keep_every_input_column() -> None:
    args = PipelineArgs(input="in", output="out")
    assert (args.text_column, args.keep, args.rows_per_call, args.num_gpus) == ("text", None, 1024, "auto")
    assert (args.overwrite, args.resume) == (False, False)
    assert args.inputs == ["in"]
    assert PipelineArgs(input=["a", "b"], output="out").inputs == ["a", "b"]


def test_auto_gpus_are_one_per_actor_where_the_cluster_has_any() -> None:
    args = PipelineArgs(input="in", output="out")
    assert (args.actor_gpus(0), args.actor_gpus(4)) == (0.0, 1.0)
    assert PipelineArgs(input="in", output="out", num_gpus=0.25).actor_gpus(0) == 0.25


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"overwrite": True, "resume": True}, "give either overwrite (start over) or resume (continue), not both"),
        ({"min_actors": 4, "max_actors": 2}, "min_actors (4) exceeds max_actors (2)"),
        ({"keep": ["id", "id"]}, "keep lists a column twice: ['id', 'id']"),
        ({"keep": []}, "keep must list at least one column name, and no empty name"),
        ({"input": ["a", ""]}, "input must name at least one file, directory or glob, and no empty path"),
        ({"text_column": ""}, "text_column"),
        ({"rows_per_call": 0}, "rows_per_call"),
    ],
)
def test_inconsistent_options_are_refused_naming_them(fields: dict[str, object], message: str) -> None:
    data = {"input": "in", "output": "out", **fields}
    with pytest.raises(ValidationError, match=re.escape(message)):
        PipelineArgs.model_validate(data)
    # Read from a config file's batch section: the same refusal, naming the section.
    with pytest.raises(InvalidInputError, match=r"^invalid batch:\n(?s:.*)" + re.escape(message)):
        parse_pipeline_args(data)
