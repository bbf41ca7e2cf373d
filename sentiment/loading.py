"""Checkpoint loading, decided once: where a model id points, and its config, tokenizer and weights.

`sentiment predict`, the Serve replicas, the batch job's planning and its tokenize and model stages
all load through here, so a wrong ``--model`` gets the same error everywhere. A directory written by
`sentiment export` (`sentiment.exported`) is read without transformers, so without torch. `fetch_checkpoint`
gets a hub checkpoint into the local cache once, before anything starts, so that ``sentiment serve``
fails in seconds on a model it cannot get and its replicas never download anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sentiment.config import ModelConfig
from sentiment.errors import ModelLoadError
from sentiment.exported import ExportedTokenizer, export_directory, read_manifest, read_model_config

if TYPE_CHECKING:
    import torch

_OFFLINE_HINT = (
    "Fix: on a machine that reaches the hub, `hf download <id> --local-dir <dir>` (or `save_pretrained`), "
    "then point model_id (--model) at that directory (config.json, tokenizer files, model.safetensors) "
    "and set HF_HUB_OFFLINE=1."
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
    """One message whose last line names the model, the cause and the fix."""
    revision = f" (revision {config.revision})" if config.revision else ""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = f"{type(exc).__name__}: {lines[0].rstrip('.') if lines else 'no detail'}"
    if len(lines) > 1:
        # The first line of a hub error is its cause ("Got: ConnectError: ..."); the rest stays above.
        return ModelLoadError(
            "\n".join(lines[1:]) + f"\ncould not load model {config.model_id!r}{revision}: {cause}. {_OFFLINE_HINT}"
        )
    return ModelLoadError(f"could not load model {config.model_id!r}{revision}: {cause}. {_OFFLINE_HINT}")


# What a sequence classifier needs from a hub repository: config, tokenizer, and one format of weights
# (safetensors when the repository has them; pickled .bin files only otherwise).
_CHECKPOINT_FILES = ("*.json", "*.txt", "*.model")
_SAFETENSORS = ("*.safetensors",)
_PICKLED = ("pytorch_model*.bin",)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def fetch_checkpoint(config: ModelConfig) -> Path:
    """The checkpoint's local directory, downloaded into the Hugging Face cache first if it is a hub id.

    Checks what loading needs (config, fast tokenizer, a weights file) without loading the weights,
    so a wrong model fails here, in seconds, with `ModelLoadError` naming the model, the cause and
    the fix. Download progress goes to the terminal (stderr). With ``HF_HUB_OFFLINE=1`` or
    ``local_files_only``, a hub id must already be in the cache.
    """
    exported = export_directory(config.model_id)
    if exported is not None:
        read_manifest(exported)
        load_model_config(config)
        load_tokenizer(config)
        return exported
    directory = local_checkpoint(config)
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(
            f"could not load model {config.model_id!r}: {directory} has no weights "
            f"({' or '.join(_WEIGHT_FILES[::2])}). {_OFFLINE_HINT}"
        )
    local = config.model_copy(update={"model_id": str(directory), "revision": None})
    load_model_config(local)
    load_tokenizer(local)
    return directory


def local_checkpoint(config: ModelConfig) -> Path:
    """The checkpoint's local directory: ``model_id`` itself, or the hub snapshot in the local cache
    (downloaded first unless offline). Checks nothing of what it holds (see `fetch_checkpoint`)."""
    source, common = _source(config)
    return Path(source) if Path(source).is_dir() else _download(config, source, common)


def checkpoint_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory that make the model: config, tokenizer and weights (sorted).

    The same patterns that decide what is downloaded, so a local directory's other files (training
    state, logs) do not count.
    """
    patterns = (*_CHECKPOINT_FILES, *_SAFETENSORS, *_PICKLED)
    found = {path for pattern in patterns for path in Path(directory).glob(pattern) if path.is_file()}
    return sorted(found)


def _download(config: ModelConfig, repo_id: str, common: dict[str, Any]) -> Path:
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    offline = bool(common["local_files_only"]) or HF_HUB_OFFLINE
    try:
        patterns = [*_CHECKPOINT_FILES, *_SAFETENSORS, *_PICKLED]
        if not offline:
            # One request (the repository's file list): the tree listing retries for half a minute offline.
            files = model_info(repo_id, revision=common["revision"]).siblings or []
            has_safetensors = any(file.rfilename.endswith(".safetensors") for file in files)
            patterns = [*_CHECKPOINT_FILES, *(_SAFETENSORS if has_safetensors else _PICKLED)]
        return Path(
            snapshot_download(repo_id, revision=common["revision"], allow_patterns=patterns, local_files_only=offline)
        )
    except Exception as exc:
        raise _failure(config, exc) from exc


def load_model_config(config: ModelConfig) -> Any:
    """The checkpoint's ``config.json`` (a transformers ``PretrainedConfig``), without weights or tokenizer.

    For an ONNX export, its ``config.json`` read without transformers (`sentiment.exported.read_model_config`).
    """
    exported = export_directory(config.model_id)
    if exported is not None:
        return read_model_config(exported)
    from transformers import AutoConfig

    source, common = _source(config)
    try:
        return AutoConfig.from_pretrained(source, **common)
    except Exception as exc:
        raise _failure(config, exc) from exc


def parameter_count(model_config: Any) -> int | None:
    """About how many parameters a BERT-shaped encoder has, from its ``config.json`` alone; None for other shapes.

    Embeddings, then per layer the attention's four projections and the feed-forward pair (biases and
    layer norms are a rounding error), then the pooler.
    """
    try:
        hidden = int(model_config.hidden_size)
        layers = int(model_config.num_hidden_layers)
        vocab = int(model_config.vocab_size)
        inner = int(getattr(model_config, "intermediate_size", None) or 4 * hidden)
        positions = int(getattr(model_config, "max_position_embeddings", None) or 0)
        types = int(getattr(model_config, "type_vocab_size", None) or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    return (vocab + positions + types) * hidden + layers * (4 * hidden * hidden + 2 * hidden * inner) + hidden * hidden


def load_tokenizer(config: ModelConfig) -> Any:
    """The checkpoint's fast tokenizer; a checkpoint without one (no tokenizer.json) is refused.

    For an ONNX export, its ``tokenizer.json`` through the tokenizers library alone (`ExportedTokenizer`).
    """
    exported = export_directory(config.model_id)
    if exported is not None:
        return ExportedTokenizer(exported)
    from transformers import AutoTokenizer

    source, common = _source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, **common)
    except Exception as exc:
        raise _failure(config, exc) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {config.model_id!r} has no fast tokenizer (tokenizer.json); one is required")
    return tokenizer


def load_model(config: ModelConfig, dtype: torch.dtype, attn_implementation: str = "sdpa") -> Any:
    """The sequence-classification model in ``dtype``, safetensors preferred, on the CPU.

    ``attn_implementation``: 'sdpa' to run it; the ONNX export traces 'eager', whose attention
    ONNX Runtime's BERT fusion recognizes.
    """
    from transformers import AutoModelForSequenceClassification

    source, common = _source(config)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            # safetensors is preferred when both exist; a .bin-only checkpoint goes through
            # torch.load(weights_only=True), which refuses arbitrary pickled objects.
            weights_only=True,
            **common,
        )
    except Exception as exc:
        raise _failure(config, exc) from exc
