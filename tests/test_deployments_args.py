"""`ServeArgs` and the shipped Serve configs, without starting Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import SecretStr

from deployments.args import ServeArgs, parse_serve_args
from deployments.builder import deployment_options
from sentiment.config import ModelConfig
from sentiment.errors import InvalidInputError
from tests.helpers import REPO, SERVE_YAML, shipped_args

SERVE_CLUSTER_YAML = REPO / "deployments" / "serve-cluster.yaml"


def test_defaults_follow_the_issue() -> None:
    args = ServeArgs()
    assert args.max_texts_per_request == 64
    assert args.max_chars_per_text == 100_000
    assert args.effective_gather_max_texts == 64
    assert args.effective_gather_max_tokens == 16384
    assert args.max_ongoing_requests >= args.effective_gather_max_texts
    assert args.api_key is None


def test_gathered_batch_holds_at_least_one_forward_pass() -> None:
    # A small forward budget (a CPU's) still gathers many requests; a big one raises the gathered budget.
    assert parse_serve_args({"model": {"forward_max_tokens": 1024}}).effective_gather_max_tokens == 16384
    assert parse_serve_args({"model": {"forward_max_tokens": 65536}}).effective_gather_max_tokens == 65536
    assert parse_serve_args({"gather_max_tokens": 4000}).effective_gather_max_tokens == 4000


def test_max_ongoing_requests_below_the_batch_size_is_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"max_ongoing_requests \(16\) must be at least the batch size \(32"):
        parse_serve_args({"max_ongoing_requests": 16, "gather_max_texts": 32})
    # The model's forward batch size is the default gathered batch size.
    with pytest.raises(InvalidInputError, match="batch size"):
        parse_serve_args({"max_ongoing_requests": 8, "model": {"forward_max_inputs": 16}})
    assert parse_serve_args({"max_ongoing_requests": 8, "model": {"forward_max_inputs": 8}}).max_ongoing_requests == 8


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"dtype": "int3"}}, "args.model.dtype"),
        ({"max_texts_per_request": 0}, "args.max_texts_per_request"),
        ({"ray_actor_options": {"num_gpus": "half"}}, "args.ray_actor_options.num_gpus"),
        ({"autoscaling": {"min_replicas": 5, "max_replicas": 2}}, "min_replicas (5) exceeds max_replicas (2)"),
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "either num_replicas"),
        ({"max_ongoing_request": 10}, "args.max_ongoing_request: Extra inputs are not permitted"),
    ],
)
def test_bad_args_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        parse_serve_args(data)
    assert field in str(error.value)


def test_api_key_comes_from_the_config_or_the_environment() -> None:
    assert ServeArgs().resolve_api_key({}) is None
    assert ServeArgs().resolve_api_key({"SENTIMENT_API_KEY": "from-env"}) == "from-env"
    assert ServeArgs().resolve_api_key({"SENTIMENT_API_KEY": ""}) is None
    assert ServeArgs(api_key_env="MY_KEY").resolve_api_key({"MY_KEY": "k2", "SENTIMENT_API_KEY": "x"}) == "k2"
    configured = ServeArgs(api_key=SecretStr("from-config"))
    assert configured.resolve_api_key({"SENTIMENT_API_KEY": "from-env"}) == "from-config"
    # A secret never shows in reprs or logs of the args.
    assert "from-config" not in repr(configured)


def test_shipped_serve_yaml_is_a_valid_ray_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (application,) = config.applications
    assert application.import_path == "deployments.app:build_app"
    assert config.http_options.host == "127.0.0.1"
    args = shipped_args()
    assert args.model.model_id == "lvwerra/bert-imdb"
    assert args.max_ongoing_requests >= args.effective_gather_max_texts


def test_the_cluster_serve_config_asks_for_a_quarter_gpu_even_while_no_gpu_node_is_up() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CLUSTER_YAML.read_text()))
    (application,) = config.applications
    assert application.import_path == "deployments.app:build_app"
    assert config.http_options.host == "127.0.0.1"
    args = parse_serve_args(application.args)
    # cluster.yaml's GPU workers start at zero: at deploy time the cluster has no GPU at all.
    options = deployment_options(args, cluster_gpus=0)
    assert options["ray_actor_options"]["num_gpus"] == 0.25
    # Apart from the GPU share, the replica bound and the start retries (nodes download the model
    # themselves), the same app as serve.yaml.
    local = shipped_args()
    assert args.model == local.model
    differing = {name for name in ServeArgs.model_fields if getattr(args, name) != getattr(local, name)}
    assert differing == {"ray_actor_options", "autoscaling", "max_constructor_retry_count"}
    assert args.autoscaling.model_copy(update={"max_replicas": 4}) == local.autoscaling
    # Where cluster users are told to deploy it: the README and cluster.yaml's own header.
    for document in (REPO / "README.md", REPO / "cluster.yaml"):
        text = document.read_text()
        assert "serve deploy deployments/serve-cluster.yaml --address http://localhost:8265" in text
        assert "serve deploy deployments/serve.yaml --address" not in text


def test_a_gpu_share_caps_memory_to_the_fraction_and_an_explicit_cap_wins() -> None:
    model = ModelConfig(model_id="x")
    assert model.for_gpu_share(0.25).gpu_memory_fraction == 0.25
    assert model.for_gpu_share(0.0) is model
    assert model.for_gpu_share(1.0) is model
    assert model.for_gpu_share(2.0).gpu_memory_fraction is None
    assert ModelConfig(model_id="x", gpu_memory_fraction=0.1).for_gpu_share(0.25).gpu_memory_fraction == 0.1


@pytest.mark.parametrize("module", ["deployments.args", "deployments.cli", "deployments.schemas"])
def test_config_modules_import_without_ray_or_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
