"""`pipelines.batch.run` end to end: the Ray Data batch job on a real local Ray with a tiny checkpoint.

Outputs are always sorted by id before comparing: Ray Data does not keep row order.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.args import PipelineArgs
from pipelines.batch import run
from pipelines.plan import STAGING_SUFFIX, is_within
from pipelines.report import format_summary
from ray_sentiment.cli import main
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
from sentiment.testing import write_corpus
from tests.helpers import invalid_utf8_strings, kill_batch_when

REPO = Path(__file__).resolve().parents[1]
OUTPUT_COLUMNS = [
    "id",
    "text",
    "input_label",
    "label",
    "score",
    "score_neg",
    "score_pos",
    "num_tokens",
    "truncated",
    "error",
]


# The shared Ray's GPU is logical (torch sees none behind it): its GPU actors may run on the CPU only when
# told so. fp32 on every device, so that on a GPU host, too, the outputs match the CPU reference within 1e-5.
LOGICAL_GPU_FLAGS = ["--gpu-fallback", "cpu", "--dtype", "fp32"]
LOGICAL_GPU_MODEL: dict[str, Any] = {"gpu_fallback": "cpu", "dtype": "fp32"}


def read_sorted(path: Path) -> pa.Table:
    table = pq.read_table(path)
    return table.sort_by("id")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three corpus files (ids 0..239), one with bad texts, one with a numeric text column, one empty."""
    root = tmp_path_factory.mktemp("batch") / "in"
    write_corpus(root, rows=240, files=3, seed=7)
    pq.write_table(
        pa.table(
            {
                "id": pa.array([1000, 1001, 1002, 1003], pa.int64()),
                "text": [None, "", "   ", "a good film"],
                "label": ["neg", "pos", "neg", "pos"],
            }
        ),
        root / "bad-rows.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": pa.array([2000, 2001], pa.int64()),
                "text": pa.array([7, None], pa.int64()),
                "label": ["pos", "neg"],
            }
        ),
        root / "numbers.parquet",
    )
    empty = pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.string())]).empty_table()
    pq.write_table(empty, root / "empty.parquet")
    (root / "_SUCCESS").write_text("")  # skipped: not data
    return root


@pytest.fixture(scope="module")
def scored(ray_session: Any, corpus: Path, tiny_checkpoint: Path) -> tuple[Path, str]:
    """``sentiment batch`` over the corpus, in this process: the output directory and what it printed."""
    out = corpus.parent / "out"
    printed = io.StringIO()
    argv = ["batch", str(corpus), str(out), "--model", str(tiny_checkpoint), "--actors", "1-2", "--rows-per-call", "32"]
    argv += LOGICAL_GPU_FLAGS
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()


def test_every_input_row_comes_out_once_with_the_core_predictions(
    scored: tuple[Path, str], corpus: Path, classifier: SentimentClassifier
) -> None:
    out, _ = scored
    expected = pa.concat_tables([pq.read_table(corpus / f"part-0000{i}.parquet") for i in range(3)]).sort_by("id")
    got = read_sorted(out)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 240 + 4 + 2
    assert ids[:240] == list(range(240))

    good = got.filter(pc.less(got.column("id"), 240))
    texts = expected.column("text").to_pylist()
    assert good.column("text").to_pylist() == texts
    assert good.column("input_label").to_pylist() == expected.column("label").to_pylist()
    predictions = classifier.predict(texts)
    assert good.column("label").to_pylist() == [p.label for p in predictions]
    assert good.column("num_tokens").to_pylist() == [p.num_tokens for p in predictions]
    assert good.column("truncated").to_pylist() == [p.truncated for p in predictions]
    assert good.column("score_pos").to_pylist() == pytest.approx([p.scores["pos"] for p in predictions], abs=1e-5)
    assert good.column("score").to_pylist() == pytest.approx([p.score for p in predictions], abs=1e-5)
    assert good.column("error").null_count == 240


def test_output_has_the_documented_schema_and_layout(scored: tuple[Path, str], corpus: Path) -> None:
    out, _ = scored
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.names == OUTPUT_COLUMNS
    assert [str(schema.field(name).type) for name in OUTPUT_COLUMNS[3:]] == [
        "string",
        "double",
        "double",
        "double",
        "int64",
        "bool",
        "string",
    ]
    names = sorted(path.name for path in out.iterdir())
    assert names[:3] == ["_SUCCESS", "_manifest.json", "_report.json"]
    # Inputs are numbered in path order, slices within each; the empty file (index 1) has no output part.
    # 32 rows per slice: the corpus files of 80 rows have 3 slices each.
    assert {re.sub(r"^(part-\d{5})-\d{5}-", r"\1-N-", name) for name in names[3:]} == {
        "part-00000-N-bad-rows.parquet",
        "part-00002-N-numbers.parquet",
        "part-00003-N-part-00000.parquet",
        "part-00004-N-part-00001.parquet",
        "part-00005-N-part-00002.parquet",
    }
    assert sorted(name for name in names if name.startswith("part-00003-")) == [
        "part-00003-00000-part-00000.parquet",
        "part-00003-00001-part-00000.parquet",
        "part-00003-00002-part-00000.parquet",
    ]
    assert not Path(str(out) + STAGING_SUFFIX).exists()


def test_null_empty_and_non_string_texts_get_an_error_and_no_prediction(scored: tuple[Path, str]) -> None:
    out, _ = scored
    got = read_sorted(out).filter(pc.greater_equal(pc.field("id"), 1000))
    assert got.column("id").to_pylist() == [1000, 1001, 1002, 1003, 2000, 2001]
    assert got.column("error").to_pylist() == [
        "text is null",
        "text is empty",
        "text is empty",
        None,
        "text must be a string, got int64",
        "text must be a string, got int64",
    ]
    assert got.column("text").to_pylist() == [None, "", "   ", "a good film", "7", None]
    for name in ("label", "score", "score_neg", "score_pos", "num_tokens", "truncated"):
        values = got.column(name).to_pylist()
        assert values[3] is not None
        assert [v for i, v in enumerate(values) if i != 3] == [None] * 5, name


def test_summary_line_reports_rows_speed_truncation_and_errors(scored: tuple[Path, str]) -> None:
    out, printed = scored
    # Ray's raylet may print warnings to stdout too; the summary is the last line.
    last = printed.splitlines()[-1]
    match = re.fullmatch(
        r"246 rows in [\d.]+ s: [\d.]+ rows/s, (\d+) tokens/s, ([\d.]+)% truncated, 5 rows with errors; "
        r"246 rows in (\S+)",
        last,
    )
    assert match, printed
    assert match.group(3) == str(out)
    table = pq.read_table(out)
    truncated = pc.sum(table.column("truncated").cast(pa.int64())).as_py()
    assert match.group(2) == f"{100 * truncated / 241:.1f}"
    assert int(match.group(1)) > 0


def test_run_report_holds_the_numbers_of_the_output_and_the_summary_line_comes_from_it(
    scored: tuple[Path, str], corpus: Path, tiny_checkpoint: Path
) -> None:
    import ray

    out, printed = scored
    report = json.loads((out / "_report.json").read_text())
    # Counted here from the files, independently of the job: Arrow's reader skips the _ files.
    input_rows = sum(pq.ParquetFile(path).metadata.num_rows for path in corpus.rglob("*.parquet"))
    table = pq.read_table(out)
    errors = table.num_rows - table.column("error").null_count
    truncated = pc.sum(table.column("truncated").cast(pa.int64())).as_py()
    tokens = pc.sum(table.column("num_tokens")).as_py()
    assert (input_rows, table.num_rows, errors) == (246, 246, 5)
    assert report["input_rows"] == input_rows
    assert report["output_rows"] == table.num_rows
    assert report["processed_rows"] == table.num_rows
    assert report["errors"] == errors
    assert report["truncated"] == truncated
    assert report["tokens"] == tokens
    assert report["rows_per_second"] == pytest.approx(246 / report["seconds"])
    assert report["tokens_per_second"] == pytest.approx(tokens / report["seconds"])
    assert report["model"] == {
        "model_id": str(tiny_checkpoint),
        "revision": None,
        "labels": ["neg", "pos"],
        "backend": "auto",
        "dtype": "fp32",
        "device": "auto",
        # num_gpus auto on a Ray with a (logical) GPU: one GPU per actor.
        "num_gpus_per_actor": 1.0,
    }
    # What each actor resolved: the GPU Ray gave it; torch sees no CUDA behind the logical GPU here.
    assert 1 <= len(report["actors"]) <= 2
    for actor in report["actors"]:
        assert len(actor["reserved_gpus"]) == 1
        assert actor["rows"] > 0
        assert 0 < actor["model_seconds"] <= actor["seconds"]
        assert actor["first_call_at"] <= actor["last_call_at"]
        if torch.cuda.is_available():
            assert (actor["device"], actor["dtype"]) == ("cuda:0", "fp32")
        else:
            assert (actor["device"], actor["dtype"], actor["gpu_memory_cap_bytes"]) == ("cpu", "fp32", None)
        assert actor["torch_threads"] >= 1
        assert actor["forward_max_tokens"] == classifier_budget(actor["device"], actor["dtype"])
    assert report["config"]["rows_per_call"] == 32
    assert (report["config"]["min_actors"], report["config"]["max_actors"]) == (1, 2)
    assert report["config"]["output"] == str(out)
    assert report["ray_version"] == ray.__version__
    started = datetime.datetime.fromisoformat(report["started_at"])
    finished = datetime.datetime.fromisoformat(report["finished_at"])
    assert datetime.timedelta(0) <= finished - started <= datetime.timedelta(minutes=10)
    assert printed.splitlines()[-1] == format_summary(report)


def classifier_budget(device: str, dtype: str) -> int:
    from sentiment.config import auto_max_batch_tokens

    return auto_max_batch_tokens(device.split(":")[0], dtype)


def test_actors_that_reserved_no_gpu_run_on_the_cpu(ray_session: Any, corpus: Path, tiny_checkpoint: Path) -> None:
    # Ray 2.60 leaves CUDA visible to a worker that reserved no GPU; the actor must not take it.
    out = corpus.parent / "out-cpu"
    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint)), input=str(corpus), output=str(out), num_gpus=0
    )
    report = run(args).report
    assert report["model"]["num_gpus_per_actor"] == 0.0
    assert report["actors"]
    assert all(
        (actor["reserved_gpus"], actor["device"], actor["dtype"]) == ([], "cpu", "fp32") for actor in report["actors"]
    )


@pytest.mark.parametrize("model", ["fp32 export", "int8 on the checkpoint"])
def test_onnx_runtime_actors_score_as_torch_on_the_cpu_and_the_report_says_so(
    ray_session: Any,
    tmp_path: Path,
    tiny_onnx: Path,
    tiny_checkpoint: Path,
    classifier: SentimentClassifier,
    model: str,
) -> None:
    corpus = tmp_path / "in"
    write_corpus(corpus, rows=48, files=1, seed=11)
    out = tmp_path / "out"
    flags = ["--model", str(tiny_onnx)]
    if model == "int8 on the checkpoint":
        flags = ["--model", str(tiny_checkpoint), "--dtype", "int8"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["batch", str(corpus), str(out), *flags, "--rows-per-call", "16"]) == 0
    report = json.loads((out / "_report.json").read_text())
    # The shared Ray has a (logical) GPU: num_gpus auto gives ONNX Runtime actors none.
    assert report["model"]["num_gpus_per_actor"] == 0.0
    dtype = "fp32" if model == "fp32 export" else "int8"
    assert report["actors"]
    for actor in report["actors"]:
        assert (actor["backend"], actor["dtype"], actor["device"], actor["reserved_gpus"]) == (
            "onnxruntime",
            dtype,
            "cpu",
            [],
        )
        assert actor["threads"] >= 1
    got = read_sorted(out)
    want = classifier.predict(got.column("text").to_pylist())
    assert got.column("num_tokens").to_pylist() == [p.num_tokens for p in want]
    tolerance = 1e-4 if dtype == "fp32" else 0.2  # int8 on random weights: only near fp32
    assert got.column("score_pos").to_pylist() == pytest.approx([p.scores["pos"] for p in want], abs=tolerance)


def test_resume_of_a_complete_output_has_nothing_to_do(
    scored: tuple[Path, str], corpus: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = scored
    argv = ["batch", str(corpus), str(out), "--model", str(tiny_checkpoint), "--resume", *LOGICAL_GPU_FLAGS]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"nothing to do: {out} is complete with 246 rows\n"


def test_an_output_that_holds_results_is_refused(
    scored: tuple[Path, str], corpus: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = scored
    before = sorted(out.iterdir())
    assert main(["batch", str(corpus), str(out), "--model", str(tiny_checkpoint)]) == 1
    assert f"output {out} already holds results; pass --overwrite" in capsys.readouterr().err
    assert sorted(out.iterdir()) == before


def test_overwrite_replaces_results_with_the_kept_columns(
    ray_session: Any, scored: tuple[Path, str], corpus: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(scored[0], out)
    inputs = [str(corpus / "part-00000.parquet"), str(corpus / "part-00002.parquet")]
    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint), **LOGICAL_GPU_MODEL),
        input=inputs,
        output=str(out),
        keep=["id"],
        overwrite=True,
    )
    result = run(args)
    assert (result.rows, result.processed_rows, result.errors) == (160, 160, 0)
    table = read_sorted(out)
    assert table.column_names == ["id", *OUTPUT_COLUMNS[3:]]
    assert table.column("id").to_pylist() == [*range(80), *range(160, 240)]
    assert sorted(path.name for path in out.glob("*.parquet"))[0].startswith("part-00000-00000-part-00000")
    assert not list(out.glob("*bad-rows*"))


# -- resume after a real interruption --------------------------------------------------------------


def complete_slices(staging: Path, rows_per_slice: int) -> int:
    """Slices whose partition in staging already holds all their rows in readable files."""
    complete = 0
    for partition in staging.glob("__slice=*"):
        try:
            rows = sum(pq.ParquetFile(path).metadata.num_rows for path in partition.iterdir())
        except (OSError, pa.ArrowInvalid):
            continue
        complete += rows == rows_per_slice
    return complete


def wait_for_free_cpus(ray: Any, cpus: float, timeout_s: float, gpus: float = 0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus or ray.available_resources().get("GPU", 0) < gpus:
        if time.monotonic() > deadline:
            pytest.fail(f"the killed or failed job still holds Ray CPUs or GPUs after {timeout_s} s")
        time.sleep(0.2)


@pytest.mark.e2e
def test_a_one_file_corpus_killed_midway_resumes_from_its_complete_slices(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    rows, rows_per_slice = 720, 4
    slices = rows // rows_per_slice
    write_corpus(tmp_path / "in", rows=rows, files=1, seed=9)
    out = tmp_path / "out"
    staging = tmp_path / ("out" + STAGING_SUFFIX)
    # Small slices and one text per forward pass: a run long enough to kill midway.
    flags = ["--model", str(tiny_checkpoint), "--rows-per-call", str(rows_per_slice), "--forward-max-inputs", "1"]
    flags += LOGICAL_GPU_FLAGS
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    kill_batch_when(
        [str(tmp_path / "in"), str(out), *flags],
        env,
        tmp_path / "killed-run.log",
        lambda: complete_slices(staging, rows_per_slice) >= 3,
        timeout_s=180,
        what="fewer than 3 slices were complete",
        interval_s=0.05,
    )
    wait_for_free_cpus(ray_session, 8, timeout_s=60)
    assert not out.exists()
    done_before = complete_slices(staging, rows_per_slice)
    assert 3 <= done_before < slices

    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint), **LOGICAL_GPU_MODEL),
        input=str(tmp_path / "in"),
        output=str(out),
        resume=True,
        rows_per_call=rows_per_slice,  # the slicing of the interrupted run
    )
    result = run(args)
    # Only the slices the kill cut short are scored again: the one file is not redone whole.
    assert (result.slices, result.skipped_slices) == (slices, done_before)
    assert (result.rows, result.processed_rows) == (rows, rows - done_before * rows_per_slice)
    table = read_sorted(out)
    assert table.column("id").to_pylist() == list(range(rows))
    texts = pq.read_table(tmp_path / "in").sort_by("id").column("text").to_pylist()
    assert table.column("label").to_pylist() == [p.label for p in classifier.predict(texts)]
    assert not staging.exists()
    assert f"resumed: {done_before} of {slices} slices were already complete" in result.summary_line()


# -- bad data and failures: row errors, one clear line, and a resume that finishes -------------------


def test_undecodable_texts_get_row_errors_and_every_other_row_is_scored(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    source = tmp_path / "in"
    write_corpus(source, rows=40, files=1, seed=3)
    # 64 bytes of 0xff in one page of an uncompressed string column, as writers that do not validate leave it.
    undecodable = [b"a good film", b"x" * 426 + b"\xff" * 64 + b" dull", "caf\u00e9 is fine".encode()]
    pq.write_table(
        pa.table({"id": [100, 101, 102], "text": invalid_utf8_strings(undecodable), "label": ["pos", "neg", "pos"]}),
        source / "undecodable.parquet",
        compression="none",
    )
    raw = pa.array([b"a great film", b"\xc3( bad"], pa.binary())  # a bytes text column
    pq.write_table(pa.table({"id": [200, 201], "text": raw, "label": ["pos", "neg"]}), source / "bytes.parquet")
    out = tmp_path / "out"
    args = PipelineArgs(model=ModelConfig(model_id=str(tiny_checkpoint)), input=str(source), output=str(out))
    result = run(args.model_copy(update={"rows_per_call": 16, "num_gpus": 0.0}))
    assert (result.rows, result.errors) == (45, 2)

    got = read_sorted(out).filter(pc.greater_equal(pc.field("id"), 100))
    assert got.column("id").to_pylist() == [100, 101, 102, 200, 201]
    assert got.column("error").to_pylist() == [
        None,
        "text is not valid UTF-8 (byte 0xff at offset 426)",
        None,
        None,
        "text is not valid UTF-8 (byte 0xc3 at offset 0)",
    ]
    # The row keeps what can be decoded: U+FFFD for each bad byte; the other columns as they were.
    assert got.column("text").to_pylist() == [
        "a good film",
        "x" * 426 + "\ufffd" * 64 + " dull",
        "caf\u00e9 is fine",
        "a great film",
        "\ufffd( bad",
    ]
    assert got.column("input_label").to_pylist() == ["pos", "neg", "pos", "pos", "neg"]
    scored = ["a good film", "caf\u00e9 is fine", "a great film"]
    labels = got.column("label").to_pylist()
    assert [labels[0], labels[2], labels[3]] == [p.label for p in classifier.predict(scored)]
    assert labels[1] is labels[4] is None
    assert read_sorted(out).filter(pc.less(pc.field("id"), 100)).column("error").null_count == 40


def test_a_truncated_file_fails_before_anything_runs_with_one_line_naming_it(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_corpus(tmp_path / "in", rows=20, files=2, seed=4)
    paths[1].write_bytes(paths[1].read_bytes()[:-100])
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), str(out), "--model", str(tiny_checkpoint)]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"sentiment batch: error: {paths[1]} is not a readable Parquet file: ")
    assert not out.exists()
    assert not Path(str(out) + STAGING_SUFFIX).exists()


def corrupt_row_group(path: Path, row_group: int, column: int) -> bytes:
    """Overwrite bytes in the middle of one column chunk's pages (the footer stays intact); return the original."""
    original = path.read_bytes()
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data = bytearray(original)
    data[start : start + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))
    return original


# ``sentiment batch`` with its output directory under ROOT on a disk of CAPACITY bytes (`SmallDiskHandler`).
ON_SMALL_DISK = """
import sys

from pipelines import files
from ray_sentiment.cli import main


def small_disk(real_locate, root, capacity):
    # Names the function needs, held in its closure: Ray's driver setup touches __main__'s globals.
    import pyarrow.fs as pafs

    from pipelines.files import Location, SmallDiskHandler
    from pipelines.plan import is_within

    def locate(spec):
        location = real_locate(spec)
        if not is_within(location.path, root):
            return location
        return Location(pafs.PyFileSystem(SmallDiskHandler(pafs.LocalFileSystem(), root, capacity)), location.path)

    return locate


files.locate = small_disk(files.locate, sys.argv[1], int(sys.argv[2]))
sys.exit(main(sys.argv[3:]))
"""


def batch_process(ray: Any, argv: list[str], small_disk: tuple[Path, int] | None = None) -> tuple[int, str]:
    """``sentiment batch`` in a process of its own on the tests' Ray: its exit status and the last line of its stderr.

    Its own process, as a user runs it: when it ends, Ray ends the model actors of its failed run.
    """
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "ray_sentiment", *argv]
    if small_disk is not None:
        command = [sys.executable, "-c", ON_SMALL_DISK, str(small_disk[0]), str(small_disk[1]), *argv]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.rstrip("\n").splitlines()
    return done.returncode, lines[-1] if lines else ""


def full_disk_slices(last: str, staging: Path, resume: str, disk: Path, detail: str = "") -> int:
    """The one line a run that filled ``disk`` ends with, checked whole: the slices it kept complete (returned).

    ``detail``: a pattern for what Arrow says between ``[Errno 28]`` and ``No space left on device``. The
    traceback's file is read, and removed where the full disk could not take it.
    """
    match = re.fullmatch(
        rf"sentiment batch: error: writing the results to {staging} failed: OSError: \[Errno 28\] {detail}No space "
        rf"left on device; (\d+) of 20 slices are complete and kept in {staging}; free space on the disk of {staging}, "
        rf"then continue with: {re.escape(resume)}; traceback in (\S+)",
        last,
    )
    assert match, last
    done = int(match.group(1))
    assert 0 < done < 20
    # The staging disk is full: the traceback goes to a temporary file, unless it still fits there.
    log = Path(match.group(2))
    assert "No space left on device" in log.read_text()
    if not is_within(str(log), str(disk)):
        log.unlink()
    return done


@pytest.mark.e2e
def test_a_stage_that_raises_ends_in_one_line_naming_file_and_rows_and_resume_finishes(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    source = tmp_path / "in"
    write_corpus(source, rows=64, files=1, seed=5)
    broken = source / "broken.parquet"  # input 0: 64 rows in two row groups, the second one's pages corrupt
    pq.write_table(
        pq.read_table(source / "part-00000.parquet").set_column(0, "id", pa.array(range(64, 128))),
        broken,
        row_group_size=32,
    )
    original = corrupt_row_group(broken, row_group=1, column=1)
    out = tmp_path / "out"
    staging = Path(str(out) + STAGING_SUFFIX)
    argv = ["batch", str(source), str(out), "--model", str(tiny_checkpoint), "--rows-per-call", "16", "--num-gpus", "0"]

    status, last = batch_process(ray_session, argv)
    assert status == 3, last
    command = f"sentiment batch {source} {out} --model {tiny_checkpoint} --rows-per-call 16 --num-gpus 0 --resume"
    match = re.fullmatch(
        rf"sentiment batch: error: stage 'read' failed on {broken} rows 32-63: OSError: Corrupt snappy compressed "
        rf"data\.; (\d) of 8 slices are complete and kept in {staging}; fix the cause, then continue with: "
        rf"{re.escape(command)}; traceback in {staging}/_error.log",
        last,
    )
    assert match, last
    log = (staging / "_error.log").read_text()
    assert log.startswith(last.removeprefix("sentiment batch: error: ").split("; traceback in")[0])
    assert "Traceback" in log
    assert "Corrupt snappy compressed data" in log
    assert not out.exists()

    broken.write_bytes(original)  # the cause fixed: the same file, readable
    wait_for_free_cpus(ray_session, 8, timeout_s=60, gpus=1)
    result = run(
        PipelineArgs(
            model=ModelConfig(model_id=str(tiny_checkpoint)),
            input=str(source),
            output=str(out),
            rows_per_call=16,
            num_gpus=0,
            resume=True,
        )
    )
    assert (result.slices, result.skipped_slices) == (8, int(match.group(1)))
    table = read_sorted(out)
    assert table.column("id").to_pylist() == list(range(128))
    assert table.column("error").null_count == 128
    assert not (out / "_error.log").exists()
    assert not staging.exists()


@pytest.mark.e2e
def test_a_full_disk_ends_in_one_line_keeps_the_complete_slices_and_resume_writes_every_row_once(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    paths = write_corpus(source, rows=160, files=2, seed=11)
    disk = tmp_path / "disk"
    disk.mkdir()
    # A disk that holds about half of the output: the write fails midway, some slices complete.
    capacity = sum(path.stat().st_size for path in paths) // 2
    out = disk / "out"
    staging = Path(str(out) + STAGING_SUFFIX)
    argv = ["batch", str(source), str(out), "--model", str(tiny_checkpoint), "--rows-per-call", "8", "--num-gpus", "0"]

    status, last = batch_process(ray_session, argv, small_disk=(disk, capacity))
    assert status == 3, last
    command = f"sentiment batch {source} {out} --model {tiny_checkpoint} --rows-per-call 8 --num-gpus 0 --resume"
    done = full_disk_slices(last, staging, command, disk)

    # Space freed (the same directory, on a disk with room): the command the line gave.
    wait_for_free_cpus(ray_session, 8, timeout_s=60, gpus=1)
    assert main([*argv, "--resume"]) == 0
    assert f"resumed: {done} of 20 slices were already complete" in capsys.readouterr().out
    table = read_sorted(out)
    assert table.column("id").to_pylist() == list(range(160))
    assert table.column("error").null_count == 160


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 128 KiB (a tmpfs), unmounted afterwards; skipped where mounting needs what we lack."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real small filesystem needs root and mount(8); the SmallDiskHandler test covers the job")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the SmallDiskHandler test covers the job")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.e2e
def test_on_a_real_full_disk_the_run_ends_in_one_line_and_resumes_once_space_is_freed(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path, small_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    write_corpus(source, rows=160, files=2, seed=11)  # about 270 KB of output: twice the disk
    out = small_tmpfs / "out"
    staging = Path(str(out) + STAGING_SUFFIX)
    argv = ["batch", str(source), str(out), "--model", str(tiny_checkpoint), "--rows-per-call", "8", "--num-gpus", "0"]

    status, last = batch_process(ray_session, argv)
    assert status == 3, last
    command = f"sentiment batch {source} {out} --model {tiny_checkpoint} --rows-per-call 8 --num-gpus 0 --resume"
    done = full_disk_slices(last, staging, command, small_tmpfs, detail=".*")

    subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", str(small_tmpfs)], check=True)  # space freed
    wait_for_free_cpus(ray_session, 8, timeout_s=60, gpus=1)
    assert main([*argv, "--resume"]) == 0
    assert f"resumed: {done} of 20 slices were already complete" in capsys.readouterr().out
    table = read_sorted(out)
    assert table.column("id").to_pylist() == list(range(160))
    assert not staging.exists()


def test_gpu_actors_where_torch_sees_no_gpu_fail_the_job_at_start_naming_the_cause(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from pipelines.errors import RunFailedError

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the reserved GPU is usable")
    write_corpus(tmp_path / "in", rows=8, files=1, seed=3)
    # No silent run on one core: the model actors' constructor fails, and with it the job, saying why.
    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint)), input=str(tmp_path / "in"), output=str(tmp_path / "out")
    )
    with pytest.raises(RunFailedError) as caught:
        run(args)
    assert "reserved GPU ids [0] from Ray but torch sees no CUDA device: the installed torch is a CPU build" in str(
        caught.value
    )
    assert "--gpu-fallback cpu" in str(caught.value)
    assert not (tmp_path / "out").exists()
    # A failed run lets go only of a Ray it connected to itself: the caller's stays up.
    assert ray_session.is_initialized()
