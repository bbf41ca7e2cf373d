"""`pipelines.columns`: the job's working columns are registered in one module, and no input column may take one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pipelines import columns
from pipelines.columns import STAGE_COLUMNS, WORKING_COLUMNS, check_input_columns
from sentiment.errors import InvalidInputError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
# "__name", not a dunder ("__main__") and not a prefix of a longer string.
WORKING_NAME = re.compile(r"^__[a-z][a-z0-9_]*[a-z0-9]$")


def test_every_working_column_name_is_written_in_the_registry_only() -> None:
    found = {
        (path.name, node.value)
        for path in sorted(PIPELINES.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and WORKING_NAME.match(node.value)
    }
    assert {name for module, name in found if module != "columns.py"} == set()
    assert {name for _, name in found} == set(WORKING_COLUMNS)
    assert len(set(WORKING_COLUMNS)) == len(WORKING_COLUMNS)
    assert set(STAGE_COLUMNS) <= set(WORKING_COLUMNS)
    assert {value for name, value in vars(columns).items() if name.isupper() and isinstance(value, str)} == set(
        WORKING_COLUMNS
    )


@pytest.mark.parametrize("column", WORKING_COLUMNS)
def test_an_input_column_with_a_working_columns_name_is_refused_naming_it_and_its_file(column: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        check_input_columns(["id", column, "text"], "s3://bucket/reviews.parquet")
    assert str(refused.value) == (
        f"input column '{column}' clashes with a column the batch job adds while it runs "
        "(in s3://bucket/reviews.parquet); leave it out with keep (--keep) or rename it"
    )
    check_input_columns(["id", "text", "_slice", "__slice__", "slice"], "s3://bucket/reviews.parquet")
