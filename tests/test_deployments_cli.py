"""``sentiment serve`` and ``serve run deployments/serve.yaml``: config merging, then both for real.

The end-to-end tests start their own Ray in a subprocess (that is what the commands do), serve a
tiny checkpoint on a free loopback port, and stop with Ctrl-C (SIGINT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.cli import command_from_args
from ray_sentiment.cli import build_parser, main
from sentiment.cli import load_config_file
from sentiment.testing import free_port, popen_interruptible

# `sentiment serve` and Ray's CLIs as processes of their own: end-to-end runs, outside the fast suite.
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "deployments" / "serve.yaml"


def command(*argv: str):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["serve", *argv])
    return command_from_args(args, load_config_file(args))


def test_serve_reads_the_shipped_ray_serve_config_and_flags_win() -> None:
    plain = command("--config", str(SERVE_YAML))
    assert (plain.host, plain.port, plain.route_prefix, plain.app_name) == ("127.0.0.1", 8000, "/", "sentiment")
    assert plain.args.model.model_id == "lvwerra/bert-imdb"
    assert plain.args.ray_actor_options.num_gpus == "auto"
    assert plain.url == "http://127.0.0.1:8000/"

    flagged = command(
        "--config", str(SERVE_YAML), "--model", "./ckpt", "--port", "9001", "--host", "0.0.0.0", "--num-replicas", "2"
    )
    assert (flagged.host, flagged.port) == ("0.0.0.0", 9001)
    assert flagged.args.model.model_id == "./ckpt"
    assert flagged.args.model.long_text == "head_tail"  # the file's value, no flag given
    assert flagged.args.num_replicas == 2


def test_serve_reads_a_plain_file_of_serve_args(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model:\n  model_id: ./m\n  dtype: bf16\nmax_texts_per_request: 10\n"
        "http_options:\n  port: 8100\nautoscaling:\n  max_replicas: 8\n"
    )
    parsed = command("--config", str(config), "--route-prefix", "/sentiment")
    assert (parsed.args.model.model_id, parsed.args.model.dtype) == ("./m", "bf16")
    assert parsed.args.max_texts_per_request == 10
    assert parsed.args.autoscaling.max_replicas == 8
    assert (parsed.port, parsed.route_prefix) == (8100, "/sentiment")
    assert parsed.url == "http://127.0.0.1:8100/sentiment/"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("max_ongoing_requests: 4\n", "args: max_ongoing_requests (4) must be at least the batch size"),
        ("max_texts_per_requests: 4\n", "args.max_texts_per_requests: Extra inputs are not permitted"),
        ("model:\n  long_text: middle\n", "model.long_text"),
        ("http_options:\n  port: huge\n", "port: must be a TCP port number"),
        ("applications:\n  - {import_path: x:y}\n", "applications[0].import_path: must be deployments.app:build_app"),
        ("applications: []\n", "exactly one application"),
    ],
)
def test_bad_serve_config_exits_2_naming_the_field_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    assert main(["serve", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def _serve_until_interrupted(
    argv: list[str],
    port: int,
    prefix: str = "",
    ready_line: str = "",
    while_serving: Callable[[], None] | None = None,
) -> str:
    """Run a serving command until it prints ``ready_line`` and answers; Ctrl-C it; its output."""
    # Ctrl-C reaches it even when this test run was started in the background (SIGINT ignored).
    process = popen_interruptible(
        argv, cwd=REPO, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    # A thread drains the pipe, so the server never blocks on a full one and lines are seen as printed.
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}{prefix}"
        deadline = time.monotonic() + 240
        ready = False
        while not ready and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            try:
                answered = httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                answered = False
            ready = answered and any(ready_line in line for line in list(lines))
        assert ready, f"no answer on {base} (exit status {process.poll()}):\n{''.join(lines)[-3000:]}"
        response = httpx.post(f"{base}/v1/classify", json={"texts": ["a good film", "bad"]}, timeout=60)
        assert response.status_code == 200
        assert [p["num_tokens"] for p in response.json()["predictions"]] == [5, 3]
        if while_serving is not None:
            while_serving()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            reader.join(timeout=30)
            pytest.fail(f"still running 90 s after Ctrl-C; its output:\n{''.join(lines)[-3000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    output = "".join(lines)
    assert process.returncode == 0, output[-3000:]
    return output


def test_sentiment_serve_serves_prints_the_url_and_stops_cleanly_on_ctrl_c(tiny_checkpoint: Path) -> None:
    port = free_port()
    statuses: list[subprocess.CompletedProcess[str]] = []

    def serve_status() -> None:
        # What the printed hint tells an operator to run from another shell (Ray 2.60 token auth).
        serve_cli = str(Path(sys.executable).with_name("serve"))
        env = {**_environment(), "RAY_AUTH_MODE": "token"}
        statuses.append(subprocess.run([serve_cli, "status"], env=env, capture_output=True, text=True, timeout=60))

    output = _serve_until_interrupted(
        [sys.executable, "-m", "ray_sentiment", "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
        port,
        ready_line="Serving ",
        while_serving=serve_status,
    )
    assert f"Serving {tiny_checkpoint} at http://127.0.0.1:{port}/" in output
    assert "Ray's CLIs on this Ray, from another shell: RAY_AUTH_MODE=token serve status" in output
    (status,) = statuses
    assert status.returncode == 0, status.stderr[-2000:]
    assert "SentimentClassifier" in status.stdout
    assert "HEALTHY" in status.stdout
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_ray_serve_cli_runs_the_shipped_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(SERVE_YAML.read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["route_prefix"] = "/sentiment"
    config["applications"][0]["args"]["model"]["model_id"] = str(tiny_checkpoint)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"
    _serve_until_interrupted([str(serve_cli), "run", str(path)], port, prefix="/sentiment")


def test_a_model_that_cannot_be_fetched_fails_before_ray_starts_naming_model_and_fix() -> None:
    # HF_HUB_OFFLINE=1 stands in for a machine that cannot reach the hub: the id is not in the cache.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_sentiment",
            "serve",
            "--model",
            "someone/not-downloaded",
            "--port",
            str(free_port()),
        ],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sentiment serve: error: could not load model 'someone/not-downloaded': ")
    assert "--local-dir <dir>" in last
    assert "HF_HUB_OFFLINE=1" in last
    assert "Ray" not in done.stdout + done.stderr


def test_a_replica_that_cannot_load_fails_the_deploy_once_with_its_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The driver's check passes (config, tokenizer, a weights file); the replica's load does not."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_checkpoint.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "ray_sentiment", "serve", "--model", str(broken), "--port", str(free_port())],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sentiment serve: error: the application did not start: sentiment.errors.ModelLoadError: ")
    assert f"could not load model '{broken}'" in last


def test_operator_hints_name_the_dashboard_and_the_token_for_rays_clis() -> None:
    from deployments.cli import operator_hints

    assert operator_hints("127.0.0.1:8265", {"RAY_AUTH_MODE": "token"}) == [
        "Ray dashboard: http://127.0.0.1:8265 (its API needs the token in ~/.ray/auth_token)",
        "Ray's CLIs on this Ray, from another shell: RAY_AUTH_MODE=token serve status (or ray status)",
    ]
    assert operator_hints("http://127.0.0.1:8265", {}) == ["Ray dashboard: http://127.0.0.1:8265"]
    assert operator_hints(None, {}) == []
