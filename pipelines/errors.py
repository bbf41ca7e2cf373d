"""How the pipelines fail: a stage that raised (`StageError`) and a batch run that failed (`RunFailedError`).

A bad row is no failure: it gets its ``error`` and the job goes on (`pipelines.texts`). Anything
else that goes wrong inside the Ray Data graph fails it, and is told in one line:

- every stage's callable runs inside `pipelines.dataset.Stage.apply`'s guard, which turns what it
  raises into a `StageError` naming the stage, the slices of the batch (where the batch carries
  the slice id column, `pipelines.columns.SLICE`) and the cause;
- Ray Data hands a stage's exception to the driver as a ``UserCodeException`` that keeps only the
  text of the original (the exception object itself stays in the worker), so `stage_error` reads
  the `StageError` back from that text;
- `describe_failure` says, of any exception out of a Ray Data execution, which stage failed, on
  which slices, and why, in one line: a stage's error, a write's (``OSError``), a lost worker's;
- `pipelines.batch` makes that a `RunFailedError`, the job's one ``sentiment batch: error:`` line
  with what was kept and the command that continues, the traceback in a log file.

Nothing here imports ray: the CLI maps these errors to exit statuses without starting it.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.columns import SLICE
from sentiment.errors import SentimentError

# Longest cause quoted in a one-line message; the log file has all of it.
_CAUSE_CHARS = 400
_SLICE_ID = r"\d+-\d+"
_STAGE_LINE = re.compile(
    rf"^(?:[\w.]+\.)?StageError: stage '(?P<stage>[^']*)' failed"
    rf"(?: on slices? (?P<slices>{_SLICE_ID}(?:, {_SLICE_ID})*)(?: \((?P<rows>\d+) rows?\))?"
    r"| on a batch of (?P<batch>\d+) rows?| (?P<start>to start))?: (?P<reason>.*)$",
    re.MULTILINE,
)
# Ray's errors for a worker, actor or node that went away (past Ray's own retries when they reach the driver).
_LOST = (
    "ActorDiedError",
    "ActorUnavailableError",
    "WorkerCrashedError",
    "NodeDiedError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "OwnerDiedError",
    "OutOfMemoryError",
    "LocalRayletDiedError",
)
# A path Ray Data writes a slice's output to names the slice: ``OUTPUT.staging/<SLICE>=00001-00003/...``.
_SLICE_PATH = re.compile(rf"{re.escape(SLICE)}=({_SLICE_ID})")
_WRITE_TASK = re.compile(r"\bWrite\b")
_NO_SPACE = re.compile(r"errno 28\b|no space left on device|disk quota exceeded", re.IGNORECASE)


class StageError(SentimentError, RuntimeError):
    """A stage of the Ray Data graph raised: which stage, on which slices or rows, and why (one line).

    ``slices`` are the slice ids (`pipelines.plan.slice_id`) of the failed batch, where it carries
    them; ``rows`` its row count; ``starting`` says it failed before any batch (the model's load).
    """

    def __init__(
        self, stage: str, reason: str, slices: Sequence[str] = (), rows: int | None = None, starting: bool = False
    ) -> None:
        self.stage = stage
        self.reason = reason
        self.slices = tuple(slices)
        self.rows = rows
        self.starting = starting
        super().__init__(self.message())

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions: rebuild from the fields, not from the message.
        return (type(self), (self.stage, self.reason, self.slices, self.rows, self.starting))

    def message(self) -> str:
        """``stage 'model' failed on slice 00000-00003 (32 rows): ValueError: ...``; `stage_error` reads it back."""
        rows = f"{self.rows} row{'' if self.rows == 1 else 's'}"
        if self.starting:
            where = " to start"
        elif self.slices:
            plural = "s" if len(self.slices) > 1 else ""
            counted = f" ({rows})" if self.rows is not None else ""
            where = f" on slice{plural} {', '.join(self.slices)}{counted}"
        elif self.rows is not None:
            where = f" on a batch of {rows}"
        else:
            where = ""
        return f"stage {self.stage!r} failed{where}: {self.reason}"

    @classmethod
    def of(
        cls, stage: str, exc: BaseException, slices: Sequence[str] = (), rows: int | None = None, starting: bool = False
    ) -> StageError:
        """``exc``, raised by ``stage``'s callable, as a `StageError` (itself when it is one already)."""
        if isinstance(exc, StageError):
            return exc
        return cls(stage, cause_line(exc), slices, rows, starting)


class RunFailedError(SentimentError, RuntimeError):
    """A batch run started scoring and failed; what it finished stays in staging for ``--resume``.

    The CLI exits with status 3 for it (1 is for input it refused before scoring).
    """


def cause_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``, cut to a few hundred characters.

    An ``OSError`` is its errno and strerror (``OSError: [Errno 28] No space left on device``): Ray
    Data's retry wrapper appends its own note to the exception's args, which a pickled ``OSError``
    then takes for its file name.
    """
    if isinstance(exc, OSError) and exc.errno and exc.strerror:
        text = f"[Errno {exc.errno}] {exc.strerror}"
    else:
        text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= _CAUSE_CHARS else line[: _CAUSE_CHARS - 3] + "..."


def stage_error(exc: BaseException) -> StageError | None:
    """The `StageError` behind an exception out of a Ray Data execution, or None when no stage raised.

    Found as an object where it travelled as one (the exception chain, or Ray's ``cause``), else read
    back from the worker's traceback text in Ray's message, where a ``UserCodeException`` left it.
    """
    links = _chain(exc)
    # The last one: Ray's RayTaskError(StageError) wraps the StageError it came from, which follows it.
    raised = [link for link in links if isinstance(link, StageError)]
    if raised:
        return raised[-1]
    for link in links:
        matches = list(_STAGE_LINE.finditer(str(link)))
        if matches:
            match = matches[-1]
            slices = match.group("slices")
            rows = match.group("rows") or match.group("batch")
            return StageError(
                match.group("stage"),
                match.group("reason").strip(),
                slices.split(", ") if slices else (),
                int(rows) if rows else None,
                starting=bool(match.group("start")),
            )
    return None


@dataclass(frozen=True)
class Failure:
    """What failed in a Ray Data execution (`describe_failure`); `pipelines.batch` tells it in one line."""

    stage: str | None
    """The stage that raised, ``write`` for the write, None where it is not known."""
    reason: str
    """The cause, one line."""
    slices: tuple[str, ...] = ()
    """The failed batch's slice ids, where known."""
    no_space: bool = False
    """The cause is a full disk (or quota)."""
    lost_worker: bool = False
    """Ray lost a worker, an actor or a node, past its retries."""


def describe_failure(exc: BaseException) -> Failure:
    """Which stage failed, on which slices and why, from any exception out of a Ray Data execution.

    In this order: a stage's `StageError` (found by `stage_error`); a worker, actor or node Ray lost;
    else the innermost exception, which is the write's when Ray's task was the write (``...->Write``).
    """
    links = _chain(exc)
    texts = [str(link) for link in links]
    no_space = any(
        getattr(link, "errno", None) == errno.ENOSPC or bool(_NO_SPACE.search(text))
        for link, text in zip(links, texts, strict=True)
    )
    error = stage_error(exc)
    if error is not None:
        return Failure(error.stage, error.reason, error.slices, no_space=no_space)
    lost = next((link for link in links if type(link).__name__ in _LOST), None)
    if lost is not None:
        return Failure(None, cause_line(lost), no_space=no_space, lost_worker=True)
    # Ray's task error names its task on its first line (``ray::MapBatches(select_columns)->Write()``);
    # a path in the cause's message may name the slice being written (object stores name the key).
    writing = any(_WRITE_TASK.search(text.split("\n", 1)[0]) for text in texts)
    slices = tuple(dict.fromkeys(_SLICE_PATH.findall(texts[-1])))
    return Failure("write" if writing else None, cause_line(links[-1]), slices, no_space=no_space)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, then its causes: Python's ``__cause__``/``__context__`` and Ray's ``cause``, each once."""
    links: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not link for link in links):
        links.append(current)
        cause = getattr(current, "cause", None)
        current = (
            cause
            if isinstance(cause, BaseException) and cause is not current
            else (current.__cause__ or current.__context__)
        )
    return links
