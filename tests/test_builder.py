"""The builder's pure part: Serve deployment options from the args; and what importing the Serve layer pulls in.

`build_app` itself needs a running Ray: `tests/test_deployments.py` deploys what it builds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from deployments import app, builder
from deployments.args import ServeArgs, parse_serve_args
from deployments.builder import deployment_options
from tests.helpers import shipped_args


def test_auto_gpus_give_four_replicas_per_gpu_on_a_gpu_cluster_and_cpu_replicas_otherwise() -> None:
    args = shipped_args()
    assert args.ray_actor_options.num_gpus == "auto"
    assert args.ray_actor_options.num_cpus == "auto"
    on_gpus = deployment_options(args, cluster_gpus=1, node_cpus=16)
    # A GPU replica tokenizes on one CPU; a CPU replica runs its forward passes on every core of a node.
    assert on_gpus["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert on_gpus["autoscaling_config"]["max_replicas"] * 0.25 == 1
    assert deployment_options(args, cluster_gpus=0, node_cpus=16)["ray_actor_options"] == {
        "num_cpus": 16,
        "num_gpus": 0.0,
    }


def test_deployment_options_come_from_the_args() -> None:
    args = parse_serve_args(
        {
            "num_replicas": 3,
            "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5},
            "max_ongoing_requests": 70,
            "max_queued_requests": 9,
        }
    )
    assert deployment_options(args, cluster_gpus=0) == {
        "name": "SentimentClassifier",
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5},
        "max_ongoing_requests": 70,
        "max_queued_requests": 9,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1.0},
        "max_constructor_retry_count": 1,
        "num_replicas": 3,
    }
    autoscaled = deployment_options(ServeArgs(), cluster_gpus=0)
    assert "num_replicas" not in autoscaled
    assert autoscaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
        "upscale_delay_s": 10,
        "downscale_delay_s": 300,
        "look_back_period_s": 30,
    }


def test_the_shipped_import_path_names_the_builder() -> None:
    # serve.yaml, serve-cluster.yaml, kuberay/rayservice.yaml and the README say deployments.app:build_app.
    assert app.build_app is builder.build_app
    assert app.application is builder.application


def test_app_module_imports_without_torch_or_starting_ray() -> None:
    code = (
        "import sys, deployments.app, ray; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), ray.is_initialized())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[] False"


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        # Plain Python: errors and the shedding decision know neither HTTP nor Ray.
        ("deployments.errors", ("ray", "torch", "fastapi", "starlette")),
        ("deployments.admission", ("ray", "torch", "fastapi", "starlette")),
        # The HTTP side imports no model and starts nothing.
        ("deployments.routes", ("torch", "transformers")),
        ("deployments.middleware", ("torch", "transformers", "fastapi")),
        ("deployments.openapi", ("torch", "transformers")),
        ("deployments.replica", ("torch", "transformers", "fastapi")),
    ],
)
def test_serve_modules_import_only_what_they_need(module: str, absent: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
