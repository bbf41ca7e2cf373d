"""What the Serve tests share: app args, deploying, replica states, the ``main`` app's limits, answer checks;
and, for the batch tests, text columns that hold invalid UTF-8 and a `sentiment batch` killed midway.

A helper module, not a test module: test files import from here, never from one another. Generic
helpers (`sentiment.testing.free_port`, `sentiment.testing.wait_until`) live with the package.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest
import yaml

from deployments.args import ServeArgs, parse_serve_args
from sentiment.model import SentimentClassifier
from sentiment.testing import WORDS

REPO = Path(__file__).resolve().parents[1]
SERVE_YAML = REPO / "deployments" / "serve.yaml"

API_KEY = "test-key-0123456789"
MAX_TEXTS = 8
MAX_CHARS = 10_000
# The request limits and batching of tests/test_deployments.py's ``main`` app; tests/test_routes.py runs
# its routes in-process with the same.
MAIN_LIMITS: dict[str, Any] = {
    "max_texts_per_request": MAX_TEXTS,
    "max_chars_per_text": MAX_CHARS,
    "gather_wait_s": 0.05,
    "gather_max_texts": 32,
    "max_ongoing_requests": 64,
}


def shipped_args() -> ServeArgs:
    """The args of the shipped ``deployments/serve.yaml``."""
    (application,) = yaml.safe_load(SERVE_YAML.read_text())["applications"]
    return parse_serve_args(application["args"])


def tiny_args(checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    """Serve args of a one-replica app of ``checkpoint`` that asks Ray for next to nothing."""
    return {
        "model": {"model_id": str(checkpoint)},
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0},
        **overrides,
    }


def deploy(apps: dict[str, tuple[dict[str, Any], str]], wait: bool = True) -> None:
    """Deploy several apps (name: (args, route prefix)) at once, so their replicas start in parallel."""
    from ray import serve
    from ray.serve.api import RunTarget

    from deployments.builder import build_app

    targets = [RunTarget(build_app(args), name=name, route_prefix=prefix) for name, (args, prefix) in apps.items()]
    serve.run_many(targets, wait_for_applications_running=wait)


def replica_states(app: str) -> dict[str, int]:
    """How many replicas of ``app`` are in each state ({} before it exists)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    (deployment,) = status.deployments.values()
    return {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}


def review(words: int, rng: random.Random) -> str:
    """A review of ``words`` vocabulary words, each one token of the tiny checkpoints."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def assert_healthy(client: httpx.Client) -> None:
    """The app is ready and still classifies (Starlette's TestClient is an httpx client too)."""
    assert client.get("/readyz").status_code == 200
    response = client.post("/v1/classify", json={"text": "a good film"})
    assert response.status_code == 200, response.text


def expected(classifier: SentimentClassifier, texts: list[str], long_text: Any = None) -> list[dict[str, Any]]:
    """The core classifier's predictions for ``texts``, as the routes' JSON holds them."""
    return [p.to_dict() for p in classifier.predict(texts, long_text)]


def assert_same_predictions(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"]
        assert (g["num_tokens"], g["truncated"]) == (w["num_tokens"], w["truncated"])
        # Batches padded differently change float sums in the last bits only.
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)


def invalid_utf8_strings(values: list[bytes | None]) -> pa.Array:
    """A ``string`` array holding these bytes unchecked, as writers that do not validate UTF-8 leave it."""
    data = b"".join(value or b"" for value in values)
    offsets = [0]
    for value in values:
        offsets.append(offsets[-1] + len(value or b""))
    validity = pa.array([value is not None for value in values]).buffers()[1]
    buffers = [validity, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.string(), len(values), buffers, null_count=values.count(None))


def kill_batch_when(
    argv: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], timeout_s: float, what: str,
    interval_s: float,
) -> None:  # fmt: skip
    """``sentiment batch ARGV`` in a process group of its own, killed (SIGKILL, the whole group: the job and
    any local Ray it started) once ``ready()`` holds. Fails, with the run's output in ``log``, if the run
    ends first or ``what`` has not happened within ``timeout_s``."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "ray_sentiment", "batch", *argv],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"the run ended (status {process.returncode}) before it was killed:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{what} after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(interval_s)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
