"""`pipelines.files`: finding Parquet files, and moving results on local disk or through any pyarrow filesystem."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import files
from pipelines.args import PipelineArgs
from pipelines.files import Location, RecordingHandler, SmallDiskHandler
from pipelines.plan import plan_inputs
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from sentiment.testing import write_corpus


def test_globs_lists_and_directories_find_the_same_files(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "in" / "nested", rows=9, files=3)
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / ".hidden.parquet").write_bytes(b"not read")
    model = ModelConfig(model_id="x")
    specs: list[str | list[str]] = [
        str(tmp_path / "in"),
        str(tmp_path / "in" / "**" / "*.parquet"),
        [str(path) for path in paths],
        f"file://{tmp_path}/in/nested/part-0000[0-2].parquet",
    ]
    found = [
        [item.path for item in plan_inputs(PipelineArgs(model=model, input=spec, output="o")).inputs] for spec in specs
    ]
    assert found == [[str(path) for path in paths]] * 4
    assert [item.path for item in files.list_parquet(str(tmp_path / "in"))] == [str(path) for path in paths]


def test_locations_name_children_and_siblings_on_the_same_filesystem(tmp_path: Path) -> None:
    output = files.locate(str(tmp_path / "out"))
    assert isinstance(output.filesystem, pafs.LocalFileSystem)
    assert (output.child("_SUCCESS").path, output.sibling(".staging").path) == (
        f"{tmp_path}/out/_SUCCESS",
        f"{tmp_path}/out.staging",
    )
    remote = files.locate(f"file://{tmp_path}/out/")
    assert (remote.path, remote.uri) == (f"{tmp_path}/out", f"file://{tmp_path}/out")
    with pytest.raises(InvalidInputError, match=r"cannot open nope://x"):
        files.locate("nope://x/y")


def test_a_recorded_filesystem_passes_calls_on_and_lists_the_ones_that_change_storage(tmp_path: Path) -> None:
    handler = RecordingHandler(pafs.LocalFileSystem())
    root = Location(pafs.PyFileSystem(handler), str(tmp_path))
    # Not a local filesystem to the job: it is moved as an object store is, file by file.
    assert files.renames_directories(pafs.LocalFileSystem())
    assert not files.renames_directories(root.filesystem)
    root.filesystem.create_dir(root.child("a").path, recursive=True)
    files.write_text(root.child("a/x.txt"), "x")
    files.write_text(root.child("a/y.txt"), "y")
    files.move(root.child("a"), root.child("b"))
    assert files.read_text(root.child("b/x.txt")) == "x"
    assert [path.path for path in files.list_files(root)] == [f"{tmp_path}/b/x.txt", f"{tmp_path}/b/y.txt"]
    assert handler.count("move") == 2
    assert handler.count("copy_file") == 0
    assert handler.calls[-3:] == [
        ("move", f"{tmp_path}/a/x.txt", f"{tmp_path}/b/x.txt"),
        ("move", f"{tmp_path}/a/y.txt", f"{tmp_path}/b/y.txt"),
        ("delete_dir", f"{tmp_path}/a"),
    ]


def test_on_local_disk_a_directory_moves_with_one_rename(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    files.move(files.locate(str(tmp_path / "a")), files.locate(str(tmp_path / "deeper" / "b")))
    assert (tmp_path / "deeper" / "b" / "x.txt").read_text() == "x"
    assert not (tmp_path / "a").exists()
    files.delete(files.locate(str(tmp_path / "deeper")))
    files.delete(files.locate(str(tmp_path / "absent")))  # nothing there: nothing to do
    assert list(tmp_path.iterdir()) == []


def test_a_small_disk_fails_a_write_that_does_not_fit_as_a_full_disk_does_until_space_is_freed(tmp_path: Path) -> None:
    disk = SmallDiskHandler(pafs.LocalFileSystem(), str(tmp_path), capacity=1000)
    root = Location(pafs.PyFileSystem(disk), str(tmp_path))
    files.write_text(root.child("a.txt"), "a" * 600)
    with root.filesystem.open_output_stream(root.child("b.txt").path) as stream:
        stream.write(b"b" * 300)
        with pytest.raises(OSError, match=r"No space left on device") as full:
            stream.write(b"b" * 300)  # 1200 bytes: does not fit
    assert full.value.errno == errno.ENOSPC
    assert (tmp_path / "b.txt").read_bytes() == b"b" * 300  # what it wrote before the disk was full stays
    assert disk.used() == 900
    files.delete(root.child("a.txt"))  # space freed: the same write fits
    files.write_text(root.child("c.txt"), "c" * 600)
    assert disk.used() == 900
    # Pickled into another process (a Ray worker) it is the same disk: the files are the count.
    copy = pickle.loads(pickle.dumps(root.filesystem))
    with copy.open_output_stream(f"{tmp_path}/d.txt") as stream, pytest.raises(OSError, match=r"No space left"):
        stream.write(b"d" * 200)


def test_a_file_the_disk_cut_short_is_never_complete_even_where_its_footer_was_written(tmp_path: Path) -> None:
    table = pq.read_table(write_corpus(tmp_path / "in", rows=8, files=1)[0])
    whole = tmp_path / "whole.parquet"
    pq.write_table(table, whole)
    assert files.parquet_rows(files.locate(str(whole))) == 8
    # Disks of growing size: the write fails in the middle of the file; with room for the footer, Arrow
    # still writes it, listing the column chunks it could not write as empty.
    footers = 0
    for capacity in range(500, 12_000, 250):
        disk = tmp_path / f"disk-{capacity}"
        disk.mkdir()
        small = pafs.PyFileSystem(SmallDiskHandler(pafs.LocalFileSystem(), str(disk), capacity))
        try:
            pads.write_dataset(table, str(disk), format="parquet", filesystem=small, basename_template="x-{i}.parquet")
        except OSError:
            written = disk / "x-0.parquet"
            if written.exists():
                footers += has_footer(written)
                assert files.parquet_rows(files.locate(str(written))) is None, capacity
    assert footers > 0  # the case is real: some of the cut-short files had a footer


def has_footer(path: Path) -> bool:
    try:
        pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError):
        return False
    return True
