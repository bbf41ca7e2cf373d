"""The columns the batch job adds to rows while it runs, registered here once, and the check that keeps inputs off them.

Every working column is named here and only here (`tests/test_columns.py` fails on a ``"__name"``
string anywhere else in `pipelines`), so `check_input_columns`, which the plan runs on every input
file before anything is scored, refuses every one of them: an input column that shares a working
column's name would be overwritten or misread by a later stage, on whichever path the job takes.
None of them is ever written to the output.
"""

from __future__ import annotations

from collections.abc import Iterable

from sentiment.errors import InvalidInputError

SLICE = "__slice"
"""The row's slice id (``<file index>-<slice number>``, `pipelines.plan.Slice`): the write partitions by it."""
TEXT_ERROR = "__text_error"
"""Why the read turned a row's text into a string it must not score (`pipelines.texts`); null otherwise."""
WINDOWS = "__windows"
"""The row's token windows, from the tokenize stage to the model stage (`pipelines.stage`)."""
NUM_TOKENS = "__num_tokens"
"""Tokens of the row's whole text, from the tokenize stage to the model stage."""
TRUNCATED = "__truncated"
"""Whether the row's text was cut, from the tokenize stage to the model stage."""
ROW_ERROR = "__row_error"
"""Why the row gets no prediction, from the tokenize stage to the model stage."""

STAGE_COLUMNS = (WINDOWS, NUM_TOKENS, TRUNCATED, ROW_ERROR)
"""What the tokenize stage appends and the model stage consumes."""
WORKING_COLUMNS = (SLICE, TEXT_ERROR, *STAGE_COLUMNS)
"""Every column the job adds while it runs; no input column may have one of these names."""


def check_input_columns(names: Iterable[str], source: str) -> None:
    """Raise `InvalidInputError` naming the first of ``names`` (columns read from ``source``) that a working
    column has."""
    clashes = [name for name in names if name in WORKING_COLUMNS]
    if clashes:
        raise InvalidInputError(
            f"input column {clashes[0]!r} clashes with a column the batch job adds while it runs (in {source}); "
            "leave it out with keep (--keep) or rename it"
        )
