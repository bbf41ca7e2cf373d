"""Shared fixtures: tiny real checkpoints (built once per session) and one local Ray.

No test touches the network: checkpoints are random-weight BERTs written here and loaded through
the same ``from_pretrained`` path as a hub model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier
from sentiment.testing import make_checkpoint

# The shared helpers assert too: rewrite them as pytest does test modules, so their failures explain themselves.
pytest.register_assert_rewrite("tests.helpers")

# Tests never reach the hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoints: Path) -> Path:
    """A two-class tiny BERT whose id2label is the generic LABEL_0/LABEL_1."""
    return make_checkpoint(checkpoints / "tiny")


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where exports made on demand (backend onnxruntime on a torch checkpoint) go: never ~/.cache.

    Set before the shared Ray starts, and passed to its workers, so replicas and actors look here too.
    """
    path = tmp_path_factory.mktemp("onnx-cache")
    os.environ["SENTIMENT_ONNX_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, checkpoints: Path) -> Path:
    """The tiny checkpoint exported to ONNX in fp32 (`sentiment export`)."""
    from sentiment.export import export_checkpoint

    export_checkpoint(ModelConfig(model_id=str(tiny_checkpoint)), checkpoints / "tiny-onnx-fp32", "fp32")
    return checkpoints / "tiny-onnx-fp32"


@pytest.fixture(scope="session")
def tiny_onnx_int8(tiny_checkpoint: Path, checkpoints: Path) -> Path:
    """The tiny checkpoint exported to ONNX with int8 weights."""
    from sentiment.export import export_checkpoint

    export_checkpoint(ModelConfig(model_id=str(tiny_checkpoint)), checkpoints / "tiny-onnx-int8", "int8")
    return checkpoints / "tiny-onnx-int8"


@pytest.fixture(scope="session")
def classifier(tiny_checkpoint: Path) -> SentimentClassifier:
    """On the CPU whatever the host has: the tests that use it assert CPU budgets and fp32 results."""
    return SentimentClassifier(ModelConfig(model_id=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="session")
def ray_session(onnx_cache: Path) -> Iterator[Any]:
    """One local Ray for the whole test session: 8 logical CPUs and 1 logical GPU.

    The GPU is a scheduling resource only (torch sees none here), which is what the fractional-GPU
    tests need: four 0.25-GPU replicas fit, a fifth does not.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            num_gpus=1,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "SENTIMENT_ONNX_CACHE": str(onnx_cache),
                }
            },
        )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _shared_ray_stays_up(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that shuts down the shared Ray fails, by name: the next one would start a default Ray (Ray
    Data starts one by itself) without the logical GPU, where a GPU actor waits for ever."""
    yield
    if "ray_session" in request.fixturenames:
        import ray

        assert ray.is_initialized(), f"{request.node.nodeid} shut down the tests' shared Ray"


@pytest.fixture
def uncapped_cuda() -> Iterator[None]:
    """For GPU tests that cap this process's CUDA memory (a cap holds for the whole process): lifted afterwards."""
    yield
    import torch

    torch.cuda.empty_cache()
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu`` tests where torch sees no CUDA device (logical GPUs do not count); run the
    several-node tests last: they shut the shared single-node Ray down for good."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_tests:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none here")
            for item in gpu_tests:
                item.add_marker(skip)
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)
