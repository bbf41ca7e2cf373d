"""The model stage's callable class: the shared classifier on the device Ray reserved for the actor.

Ray Data constructs `ModelStage` once per actor (``map_batches(ModelStage, fn_constructor_kwargs=...)``)
and calls it on column batches. The constructor is the one place an actor learns which GPUs Ray
gave it (``ray.get_gpu_ids()``): with none it runs on the CPU even where CUDA is visible, since
Ray 2.60 no longer hides GPUs from workers that reserved none. What each actor resolved (device,
dtype, memory cap, threads) goes to an `ActorLog`, which the job reads into its run report.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from sentiment.config import ModelConfig
from sentiment.model import SentimentClassifier


class ActorLog:
    """Collects one description per model actor; run as a tiny Ray actor by the job's driver."""

    def __init__(self) -> None:
        self._entries: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        self._entries.append(entry)

    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)


class ModelStage:
    """One `SentimentClassifier` per actor; ``__call__`` scores a pyarrow column batch."""

    def __init__(self, config: ModelConfig, actor_log: Any = None) -> None:
        import ray
        import torch

        self.classifier = SentimentClassifier(config, reserved_gpus=ray.get_gpu_ids())
        if actor_log is not None:
            entry = {
                **self.classifier.describe(),
                "torch_threads": torch.get_num_threads(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(),
            }
            ray.get(actor_log.add.remote(entry))

    def __call__(self, batch: pa.Table) -> pa.Table | dict[str, Any]:
        return self.classifier(batch)
