"""`deployments.errors`: plain exceptions that say what went wrong; the routes' table says how it is answered."""

from __future__ import annotations

import ast
import inspect

import pytest

from deployments import errors
from deployments.errors import (
    BackendFailure,
    EmptyInput,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ServeError,
    TooLarge,
    Unauthorized,
    Unhealthy,
)
from sentiment.errors import InvalidInputError


@pytest.mark.parametrize("cls", [MalformedBody, EmptyInput, TooLarge])
def test_the_serve_layers_input_errors_are_the_cores_invalid_input(cls: type[InvalidInputError]) -> None:
    # Whoever handles the core's InvalidInputError handles these too.
    assert issubclass(cls, InvalidInputError)


@pytest.mark.parametrize("cls", [Unauthorized, NotFound, MethodNotAllowed, Overloaded, Unhealthy, BackendFailure])
def test_the_other_errors_share_one_base(cls: type[ServeError]) -> None:
    assert issubclass(cls, ServeError)
    assert not issubclass(cls, InvalidInputError)


def test_errors_carry_what_the_answer_needs_as_data() -> None:
    busy = Overloaded("the replica is busy", retry_after_s=3)
    assert (str(busy), busy.retry_after_s) == ("the replica is busy", 3)
    wrong = MethodNotAllowed("Method Not Allowed", ["GET", "POST"])
    assert (str(wrong), wrong.allowed) == ("Method Not Allowed", ["GET", "POST"])
    assert isinstance(wrong, NotFound)


def test_no_error_knows_a_status_code_or_imports_a_web_framework() -> None:
    source = inspect.getsource(errors)
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {"__future__", "sentiment.errors"}
    for name, cls in vars(errors).items():
        if isinstance(cls, type) and issubclass(cls, Exception):
            assert not any("status" in attribute for attribute in vars(cls)), name
