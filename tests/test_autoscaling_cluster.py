"""Cluster autoscaling with Ray's fake multi-node provider: the autoscaler `cluster.yaml` drives,
launching local processes as nodes.

Marked slow and left out of CI: `AutoscalingCluster.start()` runs `ray stop --force`, which ends
every Ray on the machine, and node launches take minutes on two cores. Run it alone:

    python -m pytest -m slow tests/test_autoscaling_cluster.py
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.args import PipelineArgs
from pipelines.batch import run
from sentiment.config import ModelConfig
from sentiment.testing import free_port, write_corpus

pytestmark = pytest.mark.slow

SERVE_CLUSTER_YAML = Path(__file__).resolve().parents[1] / "deployments" / "serve-cluster.yaml"


# The fake provider's base config. Ray's wheel does not ship the example.yaml that
# AutoscalingCluster reads, so the test brings its own; worker types are filled in below.
FAKE_PROVIDER_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 4,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.25,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


def gpu_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0)


def local_autoscaling_cluster(max_gpu_workers: int) -> Any:
    """A fake-provider cluster like cluster.yaml: a CPU-only head, a GPU worker type that starts at 0."""
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class LocalAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources: Any, worker_node_types: Any, **kwargs: Any) -> dict[str, Any]:
            config = copy.deepcopy(FAKE_PROVIDER_CONFIG)
            config["available_node_types"] = {
                **worker_node_types,
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            }
            return config

    ray.shutdown()
    return LocalAutoscalingCluster(
        head_resources={"CPU": 2},
        worker_node_types={
            "gpu_worker": {
                "resources": {"CPU": 2, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_gpu_workers,
            }
        },
    )


def test_the_cluster_serve_config_adds_a_gpu_node_and_its_replicas_land_there_at_a_quarter_gpu(
    tiny_checkpoint: Path,
) -> None:
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from deployments.builder import build_app

    config = yaml.safe_load(SERVE_CLUSTER_YAML.read_text())
    (application,) = config["applications"]
    args = copy.deepcopy(application["args"])
    args["model"]["model_id"] = str(tiny_checkpoint)
    args["ray_actor_options"]["num_cpus"] = 0.25  # four replicas beside each other on a 2-CPU fake node
    args["autoscaling"]["min_replicas"] = 4  # one card's worth, so the test sees the packing
    cluster = local_autoscaling_cluster(max_gpu_workers=1)
    try:
        cluster.start()
        ray.init("auto", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        assert gpu_nodes() == 0
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        # Returns once the app runs: its replicas ask for GPUs the cluster lacks until a node is added.
        serve.run(build_app(args), name="sentiment", route_prefix="/")
        replicas = [
            actor
            for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if actor.class_name.startswith("ServeReplica:sentiment:")
        ]
        assert len(replicas) == 4
        gpu_node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0}
        assert len(gpu_node_ids) == 1, "the autoscaler added one GPU node for the replicas"
        assert {replica.node_id for replica in replicas} == gpu_node_ids
        assert all(replica.required_resources.get("GPU") == 0.25 for replica in replicas)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_a_gpu_batch_job_adds_gpu_workers_and_idle_ones_are_removed(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import ray

    cluster = local_autoscaling_cluster(max_gpu_workers=2)
    try:
        cluster.start()
        ray.init("auto", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        assert gpu_nodes() == 0
        write_corpus(tmp_path / "in", rows=200, files=2, seed=13)
        args = PipelineArgs(
            # The autoscaler's GPU workers are logical: torch sees no GPU behind them.
            model=ModelConfig(model_id=str(tiny_checkpoint), gpu_fallback="cpu"),
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            num_gpus=1,
            min_actors=1,
            max_actors=1,
        )
        result = run(args)
        assert result.rows == 200
        assert sorted(pq.read_table(tmp_path / "out").column("id").to_pylist()) == list(range(200))
        assert any(node["Resources"].get("GPU", 0) > 0 for node in ray.nodes()), (
            "the job ran, so the autoscaler must have added a GPU node"
        )
        deadline = time.monotonic() + 240
        while gpu_nodes() > 0:
            assert time.monotonic() < deadline, "idle GPU workers were not removed within 240 s"
            time.sleep(2)
    finally:
        ray.shutdown()
        cluster.shutdown()
