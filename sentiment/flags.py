"""Command-line flags generated from a pydantic model's fields, as vLLM builds its flags from its configs.

Each field becomes ``--field-name`` (or the spelling in ``names``), with its type, choices and help
taken from the annotation and the description; a flag left out is ``None`` in the namespace, so
the config file's value (or the field's default) stands. `flag_values` reads the given flags back
as field values. Adding a field to the model adds its flag; no CLI code changes.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def add_flags(
    group: Any,
    model: type[BaseModel],
    *,
    names: Mapping[str, str] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, str]:
    """Add a flag for each field of ``model`` (or each of ``only``) to ``group``; return {namespace dest: field}."""
    names = names or {}
    dests: dict[str, str] = {}
    for field, info in model.model_fields.items():
        if only is not None and field not in only:
            continue
        flag = names.get(field, field).replace("_", "-")
        dest = flag.replace("-", "_")
        options = _options(info.annotation, field)
        # A default_factory leaves info.default undefined: no default is shown for it.
        default = None if info.default is PydanticUndefined else info.default
        shown = "" if default is None else f" (default: {_shown(default)})"
        group.add_argument(
            f"--{flag}", dest=dest, default=None, help=((info.description or "") + shown).replace("%", "%%"), **options
        )
        dests[dest] = field
    return dests


def flag_values(args: argparse.Namespace, dests: Mapping[str, str]) -> dict[str, Any]:
    """The fields whose flags were given on the command line, with their values."""
    return {field: getattr(args, dest) for dest, field in dests.items() if getattr(args, dest, None) is not None}


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _options(annotation: Any, field: str) -> dict[str, Any]:
    """argparse keywords (type, choices, action, metavar) for one annotation."""
    members = _members(annotation)
    literals = [
        value for member in members if typing.get_origin(member) is Literal for value in typing.get_args(member)
    ]
    others = [member for member in members if typing.get_origin(member) is not Literal]
    if others == [bool] and not literals:
        return {"action": argparse.BooleanOptionalAction}
    if not others:
        return {"choices": literals}
    if len(others) == 1 and typing.get_origin(others[0]) is list:
        return {"type": _comma_list, "metavar": "A,B,..."}
    if len(others) == 1 and others[0] is str and not literals:
        return {}
    numbers = [member for member in others if member in (int, float)]
    if len(numbers) != len(others):
        raise TypeError(f"{field}: no flag type for {annotation!r}")
    number = float if float in numbers else int
    if not literals:
        return {"type": number}
    words = [str(value) for value in literals]
    metavar = ("N" if number is int else "X") + "".join(f"|{word}" for word in words)
    return {"type": _number_or(number, words), "metavar": metavar}


def _members(annotation: Any) -> list[Any]:
    """The members of a union (``None`` dropped: a flag is optional anyway), unwrapping ``Annotated``."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(annotation) for member in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _number_or(number: type, words: list[str]) -> Callable[[str], Any]:
    kind = "an integer" if number is int else "a number"

    def parse(value: str) -> Any:
        if value in words:
            return value
        try:
            return number(value)
        except ValueError:
            alternatives = " or ".join(repr(word) for word in words)
            raise argparse.ArgumentTypeError(f"expected {kind} or {alternatives}, got {value!r}") from None

    parse.__name__ = f"{number.__name__} or {'/'.join(words)}"
    return parse
