"""Object storage for real: the batch job, its resume, eval and `pipelines.score` against an S3 server.

The server is moto's (``moto_server``, an S3 API on 127.0.0.1, recording every request it gets);
the job reaches it as users reach theirs, through the standard AWS variables (``AWS_ENDPOINT_URL``,
keys, region), which pyarrow's S3 filesystem reads. ``sentiment batch`` runs as a process of its own
(its own local Ray, so its workers get those variables), as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import pipelines
from sentiment.model import SentimentClassifier
from sentiment.testing import free_port, wait_until, write_corpus
from tests.helpers import kill_batch_when

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BUCKET = "reviews"


class S3Server:
    def __init__(self, endpoint: str, recording: Path) -> None:
        self.endpoint = endpoint
        self.recording = recording
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # No SDK may probe a cloud metadata address for credentials or a region.
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            scheme="http",
            allow_bucket_creation=True,
        )

    def keys(self, prefix: str) -> list[str]:
        selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File)

    def upload(self, local: Path, prefix: str) -> None:
        for path in sorted(local.iterdir()):
            pafs.copy_files(str(path), f"{BUCKET}/{prefix}/{path.name}", destination_filesystem=self.fs)

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]

    def copies(self) -> dict[str, int]:
        """Server-side copies (CopyObject, UploadPartCopy) by destination key, since the recording started."""
        counts: dict[str, int] = {}
        for request in self.requests():
            headers = {name.lower(): value for name, value in request["headers"].items()}
            if "x-amz-copy-source" in headers:
                key = request["url"].split("?")[0].split(f"/{BUCKET}/", 1)[-1]
                counts[key] = counts.get(key, 0) + 1
        return counts

    def reset_recording(self) -> None:
        self.recording.write_text("")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    recording = root / "requests.jsonl"
    env = {**os.environ, "MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)}
    moto = str(Path(sys.executable).with_name("moto_server"))
    log = (root / "moto.log").open("w")
    process = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        server = S3Server(f"http://127.0.0.1:{port}", recording)

        def up() -> bool:
            try:
                server.fs.create_dir(BUCKET)
                return True
            except OSError:
                return False

        wait_until(up, 30, "moto_server to answer")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def job_env(s3: S3Server) -> dict[str, str]:
    # A Ray of the job's own (RAY_ADDRESS=local), never one another process started on this machine:
    # its workers read the S3 variables given here.
    return {**os.environ, **s3.env, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}


def sentiment(s3: S3Server, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ray_sentiment", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=job_env(s3), cwd=REPO)


def read_rows(s3: S3Server, prefix: str) -> list[dict[str, Any]]:
    table = pq.read_table(f"{BUCKET}/{prefix}", filesystem=s3.fs)
    return table.sort_by("id").to_pylist()


def test_batch_job_on_s3_writes_every_row_once_copying_each_object_once_and_eval_reads_it(
    s3: S3Server, tiny_checkpoint: Path, classifier: SentimentClassifier, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "in", rows=300, files=3, seed=4)
    s3.upload(tmp_path / "in", "corpus")
    s3.reset_recording()

    done = sentiment(s3, "batch", f"s3://{BUCKET}/corpus/", f"s3://{BUCKET}/scored/", "--model", str(tiny_checkpoint),
                     "--rows-per-call", "64")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"300 rows in s3://{BUCKET}/scored/" in done.stdout + done.stderr

    rows = read_rows(s3, "scored")
    assert [row["id"] for row in rows] == list(range(300))
    texts = pq.read_table(tmp_path / "in").sort_by("id").column("text").to_pylist()
    assert [row["label"] for row in rows] == [p.label for p in classifier.predict(texts)]
    keys = s3.keys("")
    assert not [key for key in keys if ".staging" in key], keys
    outputs = [key for key in keys if key.startswith(f"{BUCKET}/scored/") and key.endswith(".parquet")]
    assert outputs
    assert f"{BUCKET}/scored/_SUCCESS" in keys
    # The commit moves each output object once: at most one server-side copy per object.
    copies = s3.copies()
    assert max(copies.values(), default=0) <= 1, copies
    assert sum(copies.values()) <= len(outputs) + 2  # the Parquet parts, the manifest and the report

    evaluated = sentiment(s3, "eval", f"s3://{BUCKET}/scored/", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout)
    assert report["rows"]["total"] == 300
    assert sum(sum(row) for row in report["confusion_matrix"]) == report["rows"]["evaluated"]


def test_a_killed_batch_job_on_s3_resumes_with_every_row_exactly_once(
    s3: S3Server, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    rows, rows_per_slice = 480, 4
    write_corpus(tmp_path / "in", rows=rows, files=1, seed=5)
    s3.upload(tmp_path / "in", "long")
    output, staging = f"s3://{BUCKET}/long-scored/", "long-scored.staging/"
    # Small slices and one text per forward pass: a run long enough to kill midway.
    flags = ["--model", str(tiny_checkpoint), "--rows-per-call", str(rows_per_slice), "--forward-max-inputs", "1"]
    env = job_env(s3)
    kill_batch_when(
        [f"s3://{BUCKET}/long/", output, *flags],
        env,
        tmp_path / "killed.log",
        lambda: len([key for key in s3.keys(staging) if key.endswith(".parquet")]) >= 3,
        timeout_s=240,
        what="fewer than 3 slices were staged",
        interval_s=0.2,
    )
    assert not s3.keys("long-scored/")

    resumed = sentiment(s3, "batch", f"s3://{BUCKET}/long/", output, *flags, "--resume", timeout_s=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed:" in resumed.stdout + resumed.stderr
    assert [row["id"] for row in read_rows(s3, "long-scored")] == list(range(rows))
    assert not s3.keys(staging)


def test_score_writes_a_users_dataset_to_s3(
    ray_session: Any, s3: S3Server, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    texts = ["a wonderful, moving film", "two hours I will never get back", "fine"]
    ds = ray_session.data.from_items([{"id": i, "text": text} for i, text in enumerate(texts)])
    # Credentials given as an object, as a user passes them to Ray Data's writers.
    pipelines.score(ds, str(tiny_checkpoint), num_gpus=0).write_parquet(f"{BUCKET}/from-score", filesystem=s3.fs)
    rows = read_rows(s3, "from-score")
    assert [row["label"] for row in rows] == [p.label for p in classifier.predict(texts)]
