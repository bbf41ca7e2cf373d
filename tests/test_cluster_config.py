"""cluster.yaml goes through the same preparation and schema check that `ray up` runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture
def cluster_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_up_validation(cluster_config: dict[str, Any]) -> None:
    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    assert prepared["head_node_type"] == "ray.head.cpu"


def test_gpu_workers_scale_from_zero(cluster_config: dict[str, Any]) -> None:
    workers = cluster_config["available_node_types"]["ray.worker.gpu"]
    assert workers["min_workers"] == 0
    assert workers["max_workers"] >= 1
    assert workers["resources"]["GPU"] == 1
    assert "GPU" not in cluster_config["available_node_types"]["ray.head.cpu"]["resources"]


def test_setup_pins_the_versions_ci_tests(cluster_config: dict[str, Any]) -> None:
    import ray

    setup = " ".join(cluster_config["setup_commands"])
    assert f"ray[serve,data]=={ray.__version__}" in setup
    assert cluster_config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert "pip install -q -e ~/ray-sentiment" in setup
    assert cluster_config["file_mounts"] == {"~/ray-sentiment": "."}


def test_a_typo_fails_validation(cluster_config: dict[str, Any]) -> None:
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))
