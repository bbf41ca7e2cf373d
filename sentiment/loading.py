"""Checkpoint loading, decided once: where a model id points, and its config, tokenizer and weights.

`sentiment predict`, the Serve replicas, the batch job's planning and its tokenize and model stages
all load through here, so a wrong ``--model`` gets the same error everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sentiment.config import ModelConfig
from sentiment.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

_OFFLINE_HINT = (
    "To run without network access, point model_id (--model) at a local directory holding "
    "config.json, the tokenizer files and model.safetensors (e.g. one written by "
    "`huggingface-cli download <id> --local-dir <dir>` or `save_pretrained`), and set HF_HUB_OFFLINE=1."
)


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with slashes, or rooted, is meant as a path.
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or (os.sep != "/" and os.sep in model_id)


def _source(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """What to pass ``from_pretrained``: a local directory or a hub id, and the common options."""
    source = config.model_id
    local = Path(source).expanduser()
    if local.is_dir():
        source = str(local.resolve())
    elif _looks_like_path(source):
        raise ModelLoadError(f"model directory {source} does not exist")
    return source, {
        "revision": None if local.is_dir() else config.revision,
        "local_files_only": config.local_files_only,
        # Never run code shipped with a checkpoint.
        "trust_remote_code": False,
    }


def _failure(config: ModelConfig, exc: Exception) -> ModelLoadError:
    revision = f" (revision {config.revision})" if config.revision else ""
    what = f"could not load model {config.model_id!r}{revision}"
    return ModelLoadError(f"{what}: {type(exc).__name__}: {exc}\n{_OFFLINE_HINT}")


def load_model_config(config: ModelConfig) -> Any:
    """The checkpoint's ``config.json`` (a transformers ``PretrainedConfig``), without weights or tokenizer."""
    from transformers import AutoConfig

    source, common = _source(config)
    try:
        return AutoConfig.from_pretrained(source, **common)
    except Exception as exc:
        raise _failure(config, exc) from exc


def load_tokenizer(config: ModelConfig) -> Any:
    """The checkpoint's fast tokenizer; a checkpoint without one (no tokenizer.json) is refused."""
    from transformers import AutoTokenizer

    source, common = _source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, **common)
    except Exception as exc:
        raise _failure(config, exc) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {config.model_id!r} has no fast tokenizer (tokenizer.json); one is required")
    return tokenizer


def load_model(config: ModelConfig, dtype: torch.dtype) -> Any:
    """The sequence-classification model in ``dtype``, safetensors preferred, on the CPU."""
    from transformers import AutoModelForSequenceClassification

    source, common = _source(config)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation="sdpa",
            # safetensors is preferred when both exist; a .bin-only checkpoint goes through
            # torch.load(weights_only=True), which refuses arbitrary pickled objects.
            weights_only=True,
            **common,
        )
    except Exception as exc:
        raise _failure(config, exc) from exc
