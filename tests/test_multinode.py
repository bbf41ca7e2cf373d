"""Several Ray nodes on this machine (`ray.cluster_utils.Cluster`): placement and faults.

A head with no GPU and two workers with one logical GPU each. These tests replace the session's
shared local Ray with the cluster, so conftest runs them after every other test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from deployments.builder import build_app
from pipelines.args import PipelineArgs
from pipelines.batch import run
from pipelines.plan import STAGING_SUFFIX
from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
from sentiment.testing import free_port, wait_until, write_corpus
from tests.helpers import replica_states

pytestmark = [pytest.mark.multinode, pytest.mark.e2e]

WORKER_CPUS = 4


@dataclass
class Nodes:
    cluster: Any
    workers: list[Any]
    worker_ids: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's single-node Ray, if a test before started it
    # A dashboard port of its own: another Ray on this machine may hold the default one (8265).
    head = {"num_cpus": 2, "num_gpus": 0, "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield Nodes(cluster, workers, {worker.node_id for worker in workers})
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def serve_port(nodes: Nodes) -> int:
    from ray import serve

    port = free_port()
    # One proxy, on the head: every node of this test cluster shares 127.0.0.1.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    return port


def replica_nodes(app: str) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [a.node_id for a in actors if a.class_name.startswith("ServeReplica:") and f":{app}:" in a.class_name]


# The workers' GPUs are logical (torch sees none here): replicas and actors may run on the CPU only when told so;
# fp32, so that on a GPU host, too, they label as the CPU reference does.
ON_LOGICAL_GPUS: dict[str, Any] = {"gpu_fallback": "cpu", "dtype": "fp32"}


def serve_args(checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "model": {"model_id": str(checkpoint), **ON_LOGICAL_GPUS},
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25},
        **overrides,
    }


def test_quarter_gpu_replicas_spread_over_the_gpu_workers_and_answer(
    nodes: Nodes, serve_port: int, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    from ray import serve

    # Eight quarter-GPU replicas fill both workers' GPUs exactly; the head has none to offer.
    serve.run(build_app(serve_args(tiny_checkpoint, num_replicas=8)), name="spread", route_prefix="/spread")
    try:
        placed = replica_nodes("spread")
        assert len(placed) == 8
        assert {node: placed.count(node) for node in set(placed)} == {node: 4 for node in nodes.worker_ids}
        texts = ["a wonderful film", "the worst movie I have ever seen", "meh"]
        response = httpx.post(f"http://127.0.0.1:{serve_port}/spread/v1/classify", json={"texts": texts}, timeout=60)
        assert response.status_code == 200
        got = [p["label"] for p in response.json()["predictions"]]
        assert got == [p.label for p in classifier.predict(texts)]
    finally:
        serve.delete("spread")


def batch_actor_nodes() -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(limit=1000, raise_on_missing_output=False)
    return {a.node_id for a in actors if "MapWorker" in a.class_name and "ModelStage" in a.class_name}


def test_batch_actors_run_on_both_workers_and_the_output_is_complete(
    nodes: Nodes, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    write_corpus(tmp_path / "in", rows=400, files=4, seed=11)
    before = batch_actor_nodes()
    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint), **ON_LOGICAL_GPUS),
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        # One whole GPU per actor: one actor per worker node.
        min_actors=2,
        max_actors=2,
        num_gpus=1,
        rows_per_call=25,
    )
    result = run(args)
    assert result.rows == 400
    ids = sorted(pq.read_table(tmp_path / "out").column("id").to_pylist())
    assert ids == list(range(400))
    assert batch_actor_nodes() - before == nodes.worker_ids


def test_losing_a_worker_node_mid_job_still_writes_every_row_once(
    nodes: Nodes, tmp_path: Path, tiny_checkpoint: Path, classifier: SentimentClassifier
) -> None:
    files, rows_per_file = 12, 50
    write_corpus(tmp_path / "in", rows=files * rows_per_file, files=files, seed=12)
    out = tmp_path / "out"
    args = PipelineArgs(
        model=ModelConfig(model_id=str(tiny_checkpoint), forward_max_inputs=1, **ON_LOGICAL_GPUS),
        input=str(tmp_path / "in"),
        output=str(out),
        min_actors=1,
        max_actors=2,
        num_gpus=1,
        rows_per_call=5,
    )
    outcome: dict[str, Any] = {}

    def job() -> None:
        try:
            outcome["result"] = run(args)
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    staging = tmp_path / ("out" + STAGING_SUFFIX)
    wait_until(lambda: len(list(staging.glob("*/*.parquet"))) >= 2, timeout_s=180, what="the first output files")
    doomed = nodes.workers.pop()
    nodes.cluster.remove_node(doomed, allow_graceful=False)
    nodes.worker_ids.discard(doomed.node_id)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the batch job did not finish within 300 s of losing a node"
    assert "error" not in outcome, f"the batch job failed: {outcome.get('error')!r}"
    table = pq.read_table(out).sort_by("id")
    assert table.column("id").to_pylist() == list(range(files * rows_per_file))
    texts = pq.read_table(tmp_path / "in").sort_by("id").column("text").to_pylist()
    assert table.column("label").to_pylist() == [p.label for p in classifier.predict(texts)]
    # Put a worker back for the tests that follow.
    nodes.workers.append(nodes.cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=1))
    nodes.cluster.wait_for_nodes()
    nodes.worker_ids.add(nodes.workers[-1].node_id)


def run_load(url: str, texts: list[str], stop: threading.Event, max_requests: int, deadline_s: float) -> list[int]:
    """Closed-loop requests from one client until stopped, bounded in count and time; status codes (0: no answer)."""
    codes: list[int] = []
    deadline = time.monotonic() + deadline_s
    with httpx.Client(timeout=30) as client:
        while not stop.is_set() and len(codes) < max_requests and time.monotonic() < deadline:
            try:
                codes.append(client.post(url, json={"texts": texts}).status_code)
            except httpx.HTTPError:
                codes.append(0)
    return codes


def test_killing_a_replica_under_load_fails_only_its_requests_in_flight(
    nodes: Nodes, serve_port: int, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from ray import serve
    from ray.util.state import list_actors

    serve.run(
        build_app(serve_args(tiny_checkpoint, num_replicas=2, max_ongoing_requests=16, gather_max_texts=8)),
        name="faulty",
        route_prefix="/faulty",
    )
    try:
        url = f"http://127.0.0.1:{serve_port}/faulty/v1/classify"
        clients = 4
        stop = threading.Event()
        results: list[list[int]] = [[] for _ in range(clients)]

        def client(index: int) -> None:
            results[index] = run_load(url, ["a fine film", "a dull movie"], stop, max_requests=2000, deadline_s=120)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        (victim, *_) = [
            a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if ":faulty:" in a.class_name
        ]
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)

        def replica_ids() -> set[str]:
            alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            return {a.actor_id for a in alive if ":faulty:" in a.class_name}

        def replaced() -> bool:
            return replica_states("faulty").get("RUNNING", 0) == 2 and victim.actor_id not in replica_ids()

        wait_until(replaced, timeout_s=120, what="Serve to replace the killed replica")
        time.sleep(2)  # keep the load on the replacement for a moment
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        codes = [code for result in results for code in result]
        failed = sum(code != 200 for code in codes)
        with capsys.disabled():
            print(f"\nreplica killed under load: {failed} of {len(codes)} requests failed")
        # Only requests in flight on the killed replica may fail: at most its max_ongoing_requests,
        # and never more than the clients had outstanding at once.
        assert failed <= clients
        assert len(codes) - failed > 20
        response = httpx.post(url, json={"texts": ["still here"]}, timeout=30)
        assert response.status_code == 200
    finally:
        serve.delete("faulty")
