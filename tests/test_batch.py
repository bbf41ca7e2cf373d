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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.args import PipelineArgs
from pipelines.batch import run
from pipelines.plan import STAGING_SUFFIX
from pipelines.report import format_summary
from ray_sentiment.cli import main
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
from sentiment.testing import write_corpus

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


def wait_for_free_cpus(ray: Any, cpus: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus:
        if time.monotonic() > deadline:
            pytest.fail(f"the killed job still holds Ray CPUs after {timeout_s} s")
        time.sleep(0.2)


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
    log = tmp_path / "killed-run.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "ray_sentiment", "batch", str(tmp_path / "in"), str(out), *flags],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            while complete_slices(staging, rows_per_slice) < 3:
                if process.poll() is not None:
                    pytest.fail(f"the run ended (status {process.returncode}) before it was killed:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"fewer than 3 slices were complete after 180 s:\n{log.read_text()}")
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
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


def test_gpu_actors_where_torch_sees_no_gpu_fail_the_job_at_start_naming_the_cause(
    ray_session: Any, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from ray.exceptions import ActorDiedError

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the reserved GPU is usable")
    write_corpus(tmp_path / "in", rows=8, files=1, seed=3)
    # No silent run on one core: the model actors' constructor fails, and with it the job, saying why.
    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint)), input=str(tmp_path / "in"), output=str(tmp_path / "out")
    )
    with pytest.raises(ActorDiedError) as caught:
        run(args)
    assert "reserved GPU ids [0] from Ray but torch sees no CUDA device: the installed torch is a CPU build" in str(
        caught.value
    )
    assert "--gpu-fallback cpu" in str(caught.value)
    assert not (tmp_path / "out").exists()
