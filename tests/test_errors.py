"""`pipelines.errors`: a stage's error and a failed run, each told in one line, whatever Ray wraps them in."""

from __future__ import annotations

import errno
import pickle

import pytest

from pipelines.errors import RunFailedError, StageError, cause_line, describe_failure, stage_error
from pipelines.staging import BatchJobError
from sentiment.errors import ModelLoadError, SentimentError


def test_a_stage_error_names_the_stage_the_slices_or_rows_and_the_cause_in_one_line() -> None:
    cause = "ValueError: boom"
    assert str(StageError("model", cause, ["00000-00003"], 32)) == (
        "stage 'model' failed on slice 00000-00003 (32 rows): ValueError: boom"
    )
    assert str(StageError("read", cause, ["00001-00000", "00001-00001"])) == (
        "stage 'read' failed on slices 00001-00000, 00001-00001: ValueError: boom"
    )
    assert str(StageError("model", cause, rows=8)) == "stage 'model' failed on a batch of 8 rows: ValueError: boom"
    assert str(StageError("model", cause, starting=True)) == "stage 'model' failed to start: ValueError: boom"
    assert str(StageError("model", cause, rows=1)) == "stage 'model' failed on a batch of 1 row: ValueError: boom"
    assert isinstance(StageError("model", cause), SentimentError)


def test_a_stage_error_survives_pickling_as_ray_sends_it() -> None:
    error = StageError("tokenize", "KeyError: 'text'", ["00002-00007"], 16)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.stage, copy.reason, copy.slices, copy.rows, copy.starting) == (
        "tokenize",
        "KeyError: 'text'",
        ("00002-00007",),
        16,
        False,
    )
    assert str(copy) == str(error)


def test_the_cause_is_its_type_and_first_line_and_an_os_error_its_errno_and_reason() -> None:
    assert cause_line(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert cause_line(KeyError()) == "KeyError"
    assert cause_line(RuntimeError("x" * 1000)).endswith("...")
    assert len(cause_line(RuntimeError("x" * 1000))) == 400
    # What a pickled OSError looks like after Ray Data's retry wrapper appended its note to the args.
    full = OSError(errno.ENOSPC, "No space left on device", "Failed to write after 1/1 attempts.\nTo change ...")
    assert cause_line(full) == "OSError: [Errno 28] No space left on device"


def test_a_stage_error_is_found_as_an_object_or_read_back_from_rays_text() -> None:
    error = StageError("model", "ModelLoadError: no weights", starting=True)
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = error
    assert stage_error(wrapped) is error
    # Ray Data's UserCodeException keeps only the worker's traceback text of the StageError.
    text = (
        "ray::MapWorker(MapBatches(ModelStage)).submit() (pid=1, ip=10.0.0.1)\n"
        '  File "pipelines/dataset.py", line 120, in calling\n'
        "pipelines.errors.StageError: stage 'model' failed on slices 00000-00001, 00000-00002 (64 rows): "
        "InvalidInputError: text column 'text' not found; columns are ['review']\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    found = stage_error(RuntimeError(text))
    assert found is not None
    assert (found.stage, found.slices, found.rows) == ("model", ("00000-00001", "00000-00002"), 64)
    assert found.reason == "InvalidInputError: text column 'text' not found; columns are ['review']"
    line = f"pipelines.errors.StageError: {StageError('model', 'X: y', starting=True)}"
    started = stage_error(RuntimeError(f"...\n{line}"))
    assert started is not None
    assert (started.stage, started.starting, started.reason) == ("model", True, "X: y")
    assert stage_error(ValueError("no stage here")) is None
    for error in (StageError("tokenize", "E: x", ["00001-00002"], 1), StageError("model", "E: y", rows=1)):
        back = stage_error(RuntimeError(f"pipelines.errors.StageError: {error}"))
        assert back is not None
        assert (back.stage, back.reason, back.slices, back.rows) == (error.stage, error.reason, error.slices, 1)


def test_failures_out_of_ray_say_which_stage_or_the_write_or_a_lost_worker() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    # A write that found the disk full: Ray's task error around the OSError.
    full = OSError(errno.ENOSPC, "No space left on device")
    name = "MapBatches(select_columns)->Write"
    write = RayTaskError(name, "Traceback ...\nOSError: ...", full, proctitle=f"ray::{name}()")
    failure = describe_failure(write.as_instanceof_cause())
    assert (failure.stage, failure.reason, failure.no_space) == (
        "write",
        "OSError: [Errno 28] No space left on device",
        True,
    )
    # A stage's error, as Ray Data hands it over.
    error = StageError("read", "OSError: Corrupt", ["00001-00002"])
    stage = RayTaskError("MapBatches(read_slices)", "...", error, proctitle="ray::MapBatches(read_slices)()")
    failure = describe_failure(stage.as_instanceof_cause())
    assert (failure.stage, failure.slices, failure.reason, failure.no_space) == (
        "read",
        ("00001-00002",),
        "OSError: Corrupt",
        False,
    )
    lost = describe_failure(ActorDiedError())
    assert (lost.stage, lost.lost_worker) == (None, True)
    assert lost.reason.startswith("ActorDiedError: ")
    # A path Ray Data wrote to names the slice (object stores say which key failed).
    s3 = OSError("When uploading part for key 'out.staging/__slice=00002-00005/a.parquet': AWS Error SLOW_DOWN")
    upload = RayTaskError("Write", "...", s3, proctitle="ray::Write()")
    assert describe_failure(upload.as_instanceof_cause()).slices == ("00002-00005",)


def test_a_failed_run_is_its_own_kind_of_error_and_a_lost_row_is_one() -> None:
    assert issubclass(RunFailedError, SentimentError)
    assert issubclass(BatchJobError, RunFailedError)
    assert not issubclass(ModelLoadError, RunFailedError)
    with pytest.raises(RunFailedError):
        raise BatchJobError("rows differ")
