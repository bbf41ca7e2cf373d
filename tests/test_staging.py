"""`pipelines.staging`: the run's state, resume, and a commit that moves each output object once.

Staging directories are laid out here as Ray Data writes them (``__slice=<id>/<name>.parquet``);
the commit's storage calls are recorded through `pipelines.files.RecordingHandler`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.batch import run
from pipelines.files import Location, RecordingHandler
from pipelines.plan import STAGING_SUFFIX, InputPlan, plan_inputs, with_labels
from pipelines.staging import (
    ERROR_LOG,
    BatchJobError,
    RunState,
    Start,
    commit,
    complete_slices,
    manifest,
    open_output,
    prepare,
)
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from sentiment.testing import write_corpus

ABSENT_MODEL = ModelConfig(model_id="/nonexistent/model")


def checked(tmp_path: Path, spec: str, **fields: Any) -> Any:
    args = PipelineArgs(model=ABSENT_MODEL, input=spec, output=str(tmp_path / "out"), **fields)
    return run(args)


def test_partial_output_of_an_interrupted_run_is_not_clobbered(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", rows=4, files=1)
    (tmp_path / ("out" + STAGING_SUFFIX)).mkdir()
    with pytest.raises(InvalidInputError, match=r"holds the partial output of an interrupted run; pass --resume"):
        checked(tmp_path, str(tmp_path / "in"))
    (tmp_path / ("out" + STAGING_SUFFIX)).rmdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.parquet").write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"holds files but no _SUCCESS marker"):
        checked(tmp_path, str(tmp_path / "in"), resume=True)


def test_row_count_mismatch_fails_loudly_and_moves_nothing(tmp_path: Path) -> None:
    write_corpus(tmp_path / "in", rows=10, files=1)
    args = PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    plan = with_labels(plan_inputs(args), ["neg", "pos"])

    staging = tmp_path / "out.staging"
    (staging / "__slice=00000-00000").mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(9))}), staging / "__slice=00000-00000" / "x-0.parquet")
    state = RunState(files.locate(str(tmp_path / "out")), files.locate(str(staging)), Start.RESUME)
    with pytest.raises(BatchJobError, match=r"part-00000.parquet: 10 rows in, 9 out"):
        commit(state, plan)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in staging.iterdir()] == ["part-00000-00000-part-00000.parquet"]
    # On an object store nothing is even renamed: a rename there is a copy.
    handler = RecordingHandler(pafs.LocalFileSystem())
    shutil.rmtree(staging)
    (staging / "__slice=00000-00000").mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(9))}), staging / "__slice=00000-00000" / "x-0.parquet")
    with pytest.raises(BatchJobError, match=r"part-00000.parquet: 10 rows in, 9 out"):
        commit(recorded(state, handler), plan)
    assert handler.calls == []
    assert not (tmp_path / "out").exists()


def test_resuming_with_another_rows_per_call_is_refused_naming_the_one_to_give(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    write_corpus(tmp_path / "in", rows=20, files=1, seed=3)
    model = ModelConfig(model_id=str(tiny_checkpoint))
    args = PipelineArgs(model=model, input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_call=4)
    staging = tmp_path / ("out" + STAGING_SUFFIX)
    staging.mkdir()
    plan = with_labels(plan_inputs(args), ["neg", "pos"])
    (staging / "_manifest.json").write_text(json.dumps(manifest(args, plan)))
    refusal = r"its 'rows_per_call' differs .* pass --rows-per-call 4 or --overwrite"
    with pytest.raises(InvalidInputError, match=refusal):
        run(args.model_copy(update={"resume": True, "rows_per_call": 8}))


# -- a staging directory as Ray Data writes it -------------------------------------------------------


def two_files(tmp_path: Path, **fields: Any) -> tuple[PipelineArgs, InputPlan]:
    """a.parquet (ids 0-9: slices of 4, 4 and 2 rows) and b.parquet (ids 10-12: one slice)."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(10)), "text": ["a film"] * 10}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": [10, 11, 12], "text": ["a film"] * 3}), tmp_path / "in" / "b.parquet")
    args = PipelineArgs(
        model=ABSENT_MODEL, input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_call=4, **fields
    )
    return args, with_labels(plan_inputs(args), ["neg", "pos"])


def stage(staging: Path, slice_id: str, ids: list[int], name: str = "x-0.parquet") -> None:
    """One file of a slice's output, where Ray Data's write partitioned by the slice id puts it."""
    (staging / f"__slice={slice_id}").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids}), staging / f"__slice={slice_id}" / name)


def stage_all(staging: Path) -> None:
    # The first slice in two files, as when Ray Data cut it across two blocks.
    stage(staging, "00000-00000", [0, 1])
    stage(staging, "00000-00000", [2, 3], "x-1.parquet")
    stage(staging, "00000-00001", [4, 5, 6, 7])
    stage(staging, "00000-00002", [8, 9])
    stage(staging, "00001-00000", [10, 11, 12])


PARTS = [
    "part-00000-00000-a.parquet",
    "part-00000-00000-a-1.parquet",
    "part-00000-00001-a.parquet",
    "part-00000-00002-a.parquet",
    "part-00001-00000-b.parquet",
]
STAGED = [
    "__slice=00000-00000/x-0.parquet",
    "__slice=00000-00000/x-1.parquet",
    "__slice=00000-00001/x-0.parquet",
    "__slice=00000-00002/x-0.parquet",
    "__slice=00001-00000/x-0.parquet",
]


def recorded(state: RunState, handler: RecordingHandler) -> RunState:
    """``state`` with its output and staging seen through ``handler``'s filesystem."""
    filesystem = pafs.PyFileSystem(handler)
    return RunState(
        Location(filesystem, state.output.path),
        Location(filesystem, state.staging.path),
        state.start,
        state.manifest,
        state.pending,
    )


def test_on_an_object_store_the_commit_moves_each_output_object_once_and_writes_the_marker_last(
    tmp_path: Path,
) -> None:
    args, plan = two_files(tmp_path)
    handler = RecordingHandler(pafs.LocalFileSystem())
    state = recorded(prepare(open_output(args), manifest(args, plan), plan), handler)
    staging, out = tmp_path / "out.staging", tmp_path / "out"
    stage_all(staging)

    commit(state, plan, report={"input_rows": 13})

    # The commit before this one renamed each file within staging, then moved the staging tree
    # file by file: on an object store, where a move is a copy and a delete, two copies per object.
    moves = [call for call in handler.calls if call[0] in ("move", "copy_file")]
    assert moves == [
        ("move", f"{staging}/{source}", f"{out}/{part}") for source, part in zip(STAGED, PARTS, strict=True)
    ]
    written = [call[1] for call in handler.calls if call[0] == "open_output_stream"]
    assert written == [f"{out}/_manifest.json", f"{out}/_report.json", f"{out}/_SUCCESS"]
    # Nothing lands in the output after its marker; only staging's removal follows.
    last = handler.calls.index(("open_output_stream", f"{out}/_SUCCESS"))
    assert handler.calls[last + 1 :] == [("delete_dir", str(staging))]

    assert not staging.exists()
    assert sorted(path.name for path in out.iterdir()) == ["_SUCCESS", "_manifest.json", "_report.json", *sorted(PARTS)]
    assert pq.read_table(out).sort_by("id").column("id").to_pylist() == list(range(13))
    assert json.loads((out / "_SUCCESS").read_text()) == {"rows": 13, "files": 5}
    assert json.loads((out / "_report.json").read_text()) == {"input_rows": 13, "output_rows": 13}
    assert json.loads((out / "_manifest.json").read_text()) == manifest(args, plan)


def test_on_local_disk_the_commit_renames_each_file_once_then_the_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, plan = two_files(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"an older output, replaced whole")
    handler = RecordingHandler(pafs.LocalFileSystem())
    state = recorded(
        prepare(open_output(args.model_copy(update={"overwrite": True})), manifest(args, plan), plan), handler
    )
    staging, out = tmp_path / "out.staging", tmp_path / "out"
    stage_all(staging)
    # The recorded filesystem, renamed as local disk is.
    monkeypatch.setattr(files, "renames_directories", lambda filesystem: True)

    commit(state, plan, report={"input_rows": 13})

    moves = [call for call in handler.calls if call[0] in ("move", "copy_file")]
    assert moves == [
        *(("move", f"{staging}/{source}", f"{staging}/{part}") for source, part in zip(STAGED, PARTS, strict=True)),
        ("move", str(staging), str(out)),
    ]
    written = [call[1] for call in handler.calls if call[0] == "open_output_stream"]
    assert written == [f"{staging}/_report.json", f"{staging}/_SUCCESS"]
    assert not staging.exists()
    assert sorted(path.name for path in out.iterdir()) == ["_SUCCESS", "_manifest.json", "_report.json", *sorted(PARTS)]
    assert pq.read_table(out).sort_by("id").column("id").to_pylist() == list(range(13))


class FailingHandler(RecordingHandler):
    """Fails the move after ``moves`` of them, as a commit cut short on an object store."""

    def __init__(self, filesystem: pafs.FileSystem, moves: int) -> None:
        super().__init__(filesystem)
        self.moves = moves

    def move(self, src: str, dest: str) -> None:
        if self.count("move") == self.moves:
            raise OSError("connection reset (injected)")
        super().move(src, dest)


def test_a_commit_cut_short_on_an_object_store_is_resumed_and_rescores_only_the_slices_it_had_moved(
    tmp_path: Path,
) -> None:
    args, plan = two_files(tmp_path)
    state = prepare(open_output(args), manifest(args, plan), plan)
    staging, out = tmp_path / "out.staging", tmp_path / "out"
    stage_all(staging)
    with pytest.raises(OSError, match="injected"):
        commit(recorded(state, FailingHandler(pafs.LocalFileSystem(), moves=3)), plan, report={})
    assert sorted(path.name for path in out.iterdir()) == sorted(PARTS[:3])  # no _SUCCESS: not an output yet

    resumed = open_output(args.model_copy(update={"resume": True}))
    assert resumed.start is Start.RESUME
    resumed = prepare(resumed, manifest(args, plan), plan)
    # The first slice (two files) and the second were moved out: they are scored again.
    assert [piece.id for piece in resumed.pending] == ["00000-00000", "00000-00001"]
    assert resumed.resumed
    stage(staging, "00000-00000", [0, 1, 2, 3])
    stage(staging, "00000-00001", [4, 5, 6, 7])
    commit(recorded(resumed, RecordingHandler(pafs.LocalFileSystem())), plan, report={})

    assert not staging.exists()
    assert sorted(path.name for path in out.iterdir()) == [
        "_SUCCESS",
        "_manifest.json",
        "_report.json",
        "part-00000-00000-a.parquet",
        "part-00000-00001-a.parquet",
        "part-00000-00002-a.parquet",
        "part-00001-00000-b.parquet",
    ]
    assert pq.read_table(out).sort_by("id").column("id").to_pylist() == list(range(13))


def test_the_run_state_is_decided_once_from_what_the_output_and_its_staging_hold(tmp_path: Path) -> None:
    args, plan = two_files(tmp_path)
    expected = manifest(args, plan)
    staging, out = tmp_path / "out.staging", tmp_path / "out"
    resume = args.model_copy(update={"resume": True})

    # Nothing there: a fresh run, with an empty staging directory holding its manifest.
    fresh = open_output(args)
    assert (fresh.start, fresh.output.path, fresh.staging.path) == (Start.FRESH, str(out), str(staging))
    assert open_output(resume).start is Start.FRESH
    fresh = prepare(fresh, expected, plan)
    assert (fresh.pending, fresh.manifest, fresh.resumed, fresh.complete) == (
        tuple(plan.slices),
        expected,
        False,
        False,
    )
    assert [path.name for path in staging.iterdir()] == ["_manifest.json"]
    assert json.loads((staging / "_manifest.json").read_text()) == expected

    # An interrupted run: its complete slices are kept, a partial one's files deleted.
    stage(staging, "00000-00001", [4, 5, 6, 7])
    stage(staging, "00001-00000", [10])
    resumed = prepare(open_output(resume), expected, plan)
    assert resumed.start is Start.RESUME
    assert [piece.id for piece in resumed.pending] == ["00000-00000", "00000-00002", "00001-00000"]
    assert not list((staging / "__slice=00001-00000").iterdir())
    # One that had not written its manifest yet had written nothing: it starts afresh.
    (staging / "_manifest.json").unlink()
    assert prepare(open_output(resume), expected, plan).start is Start.FRESH
    assert not (staging / "__slice=00000-00001").exists()

    # A finished output: nothing to do when resumed, refused otherwise, replaced with --overwrite.
    stage_all(staging)
    commit(prepare(open_output(resume), expected, plan), plan)
    done = prepare(open_output(resume), expected, plan)
    assert (done.start, done.pending, done.complete) == (Start.COMPLETE, (), True)
    with pytest.raises(InvalidInputError, match=r"already holds results; pass --overwrite"):
        open_output(args)
    assert open_output(args.model_copy(update={"overwrite": True})).start is Start.FRESH
    (out / "part-00000-00002-a.parquet").unlink()
    with pytest.raises(BatchJobError, match=r"holds 11 rows but the inputs hold 13"):
        prepare(open_output(resume), expected, plan)


def test_an_output_that_is_a_file_or_a_bucket_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("")
    with pytest.raises(InvalidInputError, match=r"output .*/out is a file; give a directory"):
        open_output(PipelineArgs(model=ABSENT_MODEL, input="in", output=str(tmp_path / "out")))
    with pytest.raises(InvalidInputError, match=r"output / must be a directory below a bucket or filesystem root"):
        open_output(PipelineArgs(model=ABSENT_MODEL, input="in", output="/"))


def test_complete_slices_have_every_row_in_readable_files_and_the_commit_leaves_a_failed_runs_log_behind(
    tmp_path: Path,
) -> None:
    write_corpus(tmp_path / "in", rows=10, files=1)
    args = PipelineArgs(model=ABSENT_MODEL, input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_call=4)
    plan = with_labels(plan_inputs(args), ["neg", "pos"])
    staging = tmp_path / "out.staging"
    for piece, rows in (("00000-00000", 4), ("00000-00001", 4)):
        (staging / f"__slice={piece}").mkdir(parents=True)
        pq.write_table(pa.table({"id": list(range(rows))}), staging / f"__slice={piece}" / "x-0.parquet")
    # A write the disk cut short: no footer, never complete.
    cut = staging / "__slice=00000-00001" / "x-0.parquet"
    cut.write_bytes(cut.read_bytes()[:-20])
    (staging / ERROR_LOG).write_text("the traceback of the run that failed\n")
    location = files.locate(str(staging))
    assert [piece.id for piece in complete_slices(location, plan)] == ["00000-00000"]

    for piece, rows in (("00000-00001", 4), ("00000-00002", 2)):
        (staging / f"__slice={piece}").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": list(range(rows))}), staging / f"__slice={piece}" / "x-0.parquet")
    assert len(complete_slices(location, plan)) == 3
    commit(RunState(files.locate(str(tmp_path / "out")), location, Start.RESUME), plan)
    assert not (tmp_path / "out" / ERROR_LOG).exists()
    assert (tmp_path / "out" / "_SUCCESS").exists()
