"""The KubeRay manifests carry configs that Ray's Serve schema and our own arg types accept."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.args import parse_serve_args
from ray_sentiment.cli import build_parser

KUBERAY = Path(__file__).resolve().parent.parent / "kuberay"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / name).read_text())


def test_rayservice_serve_config_passes_serve_schema_and_serve_args() -> None:
    service = load("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "deployments.app:build_app"
    args = parse_serve_args(app.args, source="serveConfigV2.args")
    assert args.ray_actor_options.num_gpus == 0.25


def test_rayservice_fits_four_replicas_per_gpu_worker() -> None:
    service = load("rayservice.yaml")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    (workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus_per_worker = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    replicas_that_fit = workers["maxReplicas"] * gpus_per_worker / args["ray_actor_options"]["num_gpus"]
    assert args["autoscaling"]["max_replicas"] == replicas_that_fit


@pytest.mark.parametrize(
    ("name", "cluster_key"), [("rayservice.yaml", "rayClusterConfig"), ("rayjob.yaml", "rayClusterSpec")]
)
def test_manifests_use_the_ray_version_ci_tests(name: str, cluster_key: str) -> None:
    assert load(name)["spec"][cluster_key]["rayVersion"] == ray.__version__


def test_rayjob_entrypoint_is_a_valid_batch_command() -> None:
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    program, *argv = shlex.split(job["spec"]["entrypoint"])
    assert program == "sentiment"
    args = build_parser().parse_args(argv)
    assert args.command == "batch"
