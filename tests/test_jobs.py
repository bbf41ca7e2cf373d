"""Batch jobs through Ray Jobs: `ray job submit ... -- sentiment batch ...` against a `ray start --head` cluster.

The cluster is started here (`ray start --head --block`, its own session and temp dir, HTTP on
127.0.0.1) and ended by its process group, never with `ray stop`, which would end every Ray on the
machine. The submit command is the README's, with this machine's address and paths.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sentiment.testing import free_port, write_corpus

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def ray_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    # Ray 2.60 turns token authentication on for a cluster it starts; its CLIs need the mode set.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """A one-node `ray start --head` cluster; yields its Jobs API address."""
    # Short: Ray's Unix sockets live under the temp dir, and a socket path may not exceed 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))
    dashboard_port = free_port()
    argv = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        # Its own agent port: the default (52365) is taken by any other Ray on the machine, such as the tests'
        # shared one, and a head whose agent cannot listen never takes a job ("No available agent").
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={root / 'ray'}",
    ]  # fmt: skip
    log = (root / "head.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while ray_cli("job", "list", "--address", address, timeout_s=30).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{(root / 'head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield address
    finally:
        # The whole process group this test started: raylet, GCS, dashboard, workers, job drivers.
        for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def readme_submit_command() -> list[str]:
    """The README's `ray job submit ... -- sentiment batch ...` command, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    match = re.search(r"^ray job submit .*$", text, flags=re.MULTILINE)
    assert match, "README.md shows no `ray job submit` command"
    command = match.group(0).split("#")[0]
    return shlex.split(command)


def test_the_readme_submits_the_batch_job_from_the_repository_root() -> None:
    argv = readme_submit_command()
    separator = argv.index("--")
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--working-dir") + 1] == "."
    assert argv[separator + 1 : separator + 3] == ["sentiment", "batch"]


def test_a_batch_job_submitted_through_ray_jobs_succeeds_and_logs_its_progress(
    head: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    write_corpus(tmp_path / "in", 300, files=2)
    argv = readme_submit_command()
    separator = argv.index("--")
    submit = argv[3:separator]
    submit[submit.index("--address") + 1] = head
    # The README's job, on this cluster's files: local paths instead of buckets, the tiny model, CPU actors.
    job = ["sentiment", "batch", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    deadline = time.monotonic() + 300
    while True:
        submitted = ray_cli("job", "submit", *submit, "--no-wait", "--", *job)
        # The Jobs API answers before the node's agent that runs jobs has registered: retried, bounded.
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", submitted.stdout + submitted.stderr)
    assert job_id, submitted.stdout + submitted.stderr

    deadline = time.monotonic() + 300
    status = ""
    while time.monotonic() < deadline:
        status = ray_cli("job", "status", "--address", head, job_id.group(1)).stdout
        # What `ray job status` prints for each end state (ray.dashboard.modules.job.cli._log_job_status).
        if re.search(r"Job '\S+' (succeeded|failed|was stopped)", status):
            break
        time.sleep(3)
    logs = ray_cli("job", "logs", "--address", head, job_id.group(1)).stdout
    assert re.search(r"Job '\S+' succeeded", status), status + logs[-3000:]
    assert re.search(r"scored \d+ of 300 rows", logs), logs[-3000:]
    assert re.search(r"^300 rows in .* rows/s", logs, flags=re.MULTILINE), logs[-3000:]
    assert pq.read_table(tmp_path / "out").num_rows == 300
