"""A torch checkpoint to an ONNX Runtime directory (`sentiment.exported`), by hand or once into a local cache.

`export_checkpoint` is what ``sentiment export MODEL OUT_DIR [--dtype fp32|int8]`` runs:

1. trace the checkpoint with torch's TorchScript ONNX exporter (``dynamo=False``) from its *eager*
   attention, with dynamic batch and sequence axes. ONNX Runtime's BERT fusion recognizes that
   graph: on BERT every layer becomes Attention, SkipLayerNormalization and BiasGelu. The default
   dynamo exporter's graph, or an 'sdpa' trace, fuses no attention (measured with torch 2.13 and
   transformers 5.24);
2. apply ONNX Runtime's BERT fusions (``onnxruntime.transformers.optimizer``), then check the graph
   against torch on a padded probe batch: an export that does not reproduce the model fails here;
3. int8: quantize the weights of the fused graph (``onnxruntime.quantization.quantize_dynamic``;
   activations are quantized per pass, so no calibration data is needed);
4. copy the tokenizer and config.json beside it and write the manifest.

`cached_export` does the same into a local cache (``SENTIMENT_ONNX_CACHE``, else
``~/.cache/ray-sentiment/onnx``) keyed by the checkpoint's content, the precision, the ONNX Runtime
version and this recipe, and reuses it: ``--dtype int8`` on a torch checkpoint exports once per
machine. Exporting needs torch and the ``onnx`` package (``pip install 'ray-sentiment[onnx]'``);
finding an export in the cache needs neither.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sentiment.config import ModelConfig
from sentiment.errors import ModelLoadError
from sentiment.exported import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    export_directory,
    read_manifest,
    write_manifest,
)
from sentiment.loading import checkpoint_files, fetch_checkpoint, load_model, load_tokenizer, local_checkpoint

logger = logging.getLogger(__name__)

OPSET = 17
EXPORT_DTYPES = ("fp32", "int8")
# quantize_dynamic's settings: weights int8 (u8 activations x s8 weights, ONNX Runtime's default and fastest
# kernels), one scale per output channel, weights in 7 bits (reduce_range). ONNX Runtime documents 7-bit
# weights for AVX2 and AVX-512 without VNNI, where u8 x s8 pairs are summed in 16 bits and saturate, and
# per-channel scales for accuracy; with VNNI the 7 bits cost little. Exports move between machines, so the
# setting safe on all of them is shipped. Measured: benchmarks/RESULTS.md, "ONNX Runtime".
QUANTIZATION: dict[str, Any] = {"weight_type": "QInt8", "per_channel": True, "reduce_range": True}
# Bumped when anything above changes what an export holds: cached exports made before are not reused.
RECIPE = f"torchscript-eager-opset{OPSET}-bert-fusions-" + "-".join(f"{k}={v}" for k, v in QUANTIZATION.items())
# The probe check: fp32 fusions reorder sums, nothing more (measured: under 2e-6 on BERT-base logits).
MAX_ABS_LOGIT_DIFF = 1e-3
_INSTALL_HINT = "pip install 'ray-sentiment[onnx]' (or pip install onnx)"


def cache_root() -> Path:
    """Where `cached_export` keeps exports: ``SENTIMENT_ONNX_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``
    under ``ray-sentiment/onnx``."""
    configured = os.environ.get("SENTIMENT_ONNX_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ray-sentiment" / "onnx"


def content_sha256(files: Sequence[Path]) -> str:
    """One hash over the names and bytes of ``files``: the same weights give the same hash wherever they lie."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda item: item.name):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def cache_key(source_sha256: str, dtype: str, onnxruntime_version: str) -> str:
    """The cache entry of a checkpoint's content at ``dtype`` under this ONNX Runtime and this recipe."""
    identity = json.dumps([source_sha256, dtype, onnxruntime_version, RECIPE])
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def cached_export(config: ModelConfig, dtype: str) -> Path:
    """The export of ``config``'s torch checkpoint at ``dtype`` from the local cache, made there first if absent.

    Processes that miss together (four replicas starting at once) wait on a lock file and export once.
    """
    import onnxruntime

    source = local_checkpoint(config)
    source_sha256 = content_sha256(checkpoint_files(source))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.model_id.rstrip("/").split("/")[-1]) or "model"
    root = cache_root()
    target = root / f"{slug}-{dtype}-{cache_key(source_sha256, dtype, onnxruntime.__version__)}"
    if (target / MANIFEST_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.name}.lock"):
        if not (target / MANIFEST_FILE).is_file():
            logger.warning(
                "Exporting %s to ONNX (%s) into %s, once; later runs reuse it.", config.model_id, dtype, target
            )
            export_checkpoint(config, target, dtype, source=source, source_sha256=source_sha256, overwrite=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def export_checkpoint(
    config: ModelConfig,
    out_dir: str | Path,
    dtype: str = "fp32",
    *,
    source: Path | None = None,
    source_sha256: str | None = None,
    overwrite: bool = False,
    quantization: Mapping[str, Any] | None = None,
) -> Manifest:
    """Export ``config``'s torch checkpoint (``model_id``, ``revision``) at ``dtype`` into ``out_dir``.

    Written beside ``out_dir`` and moved into place at the end, so ``out_dir`` is either complete or
    absent. Raises `ModelLoadError` naming the model and the reason when it cannot be exported.
    ``quantization``: other `QUANTIZATION` settings for int8 (benchmarks compare them).
    """
    if dtype not in EXPORT_DTYPES:
        raise ModelLoadError(f"an ONNX export is fp32 or int8, not {dtype!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"{out} exists and is not empty; choose a new directory or pass --overwrite")
    if export_directory(config.model_id) is not None:
        raise ModelLoadError(f"{config.model_id} is an ONNX export already; export the torch checkpoint it came from")
    try:
        import onnx  # noqa: F401  (used by ONNX Runtime's optimizer and quantizer)
    except ImportError:
        raise ModelLoadError(f"exporting {config.model_id!r} to ONNX needs the onnx package: {_INSTALL_HINT}") from None
    source = source or fetch_checkpoint(config)
    local = config.model_copy(update={"model_id": str(source), "revision": None, "backend": "torch", "dtype": "fp32"})
    source_sha256 = source_sha256 or content_sha256(checkpoint_files(source))

    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _export(local, staging, dtype, {**QUANTIZATION, **(quantization or {})})
        manifest = replace(
            manifest, source=config.model_id, source_revision=config.revision, source_sha256=source_sha256
        )
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot export model {config.model_id!r} to ONNX: {exc}") from exc
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"
        raise ModelLoadError(f"cannot export model {config.model_id!r} to ONNX: {reason}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_manifest(out)


def _export(config: ModelConfig, staging: Path, dtype: str, quantization: Mapping[str, Any]) -> Manifest:
    import onnxruntime
    import torch
    import transformers

    model = load_model(config, torch.float32, attn_implementation="eager").eval()
    model_config = model.config
    raw = staging / "traced.onnx"
    fused = staging / ("fused.onnx" if dtype == "int8" else MODEL_FILE)

    ids, mask = _probe(model_config, rows=(16, 10), seed=0)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (whose graph ONNX Runtime fuses
        # less, see above) and warns while tracing shape checks that hold for every input.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(raw),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
        )
    fused_operators = _fuse(raw, fused, model_config)
    raw.unlink()

    # A probe of other shapes than the trace, with padding: catches a graph that kept the trace's shapes.
    check_ids, check_mask = _probe(model_config, rows=(37, 23, 5), seed=1)
    with torch.inference_mode():
        want = model(input_ids=torch.from_numpy(check_ids), attention_mask=torch.from_numpy(check_mask)).logits
    got = _session_logits(fused, check_ids, check_mask)
    difference = float(np.abs(got - want.float().numpy()).max())
    if not difference <= MAX_ABS_LOGIT_DIFF:
        raise ModelLoadError(
            f"the exported graph does not reproduce the torch model: max |logit difference| {difference:.3g} "
            f"on a probe batch (allowed {MAX_ABS_LOGIT_DIFF:g})"
        )

    settings = None
    if dtype == "int8":
        settings = _quantize(fused, staging / MODEL_FILE, quantization)
        fused.unlink()

    load_tokenizer(config).save_pretrained(str(staging))
    shutil.copyfile(Path(config.model_id) / "config.json", staging / "config.json")
    return Manifest(
        source=config.model_id,
        source_revision=None,
        source_sha256="",  # set by the caller, which knows the checkpoint as the user named it
        dtype=dtype,
        opset=OPSET,
        onnxruntime_version=onnxruntime.__version__,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        fused_operators=fused_operators,
        quantization=settings,
        max_abs_logit_diff=difference,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _probe(model_config: Any, rows: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of ``len(rows)`` sequences of these lengths, padded to the longest."""
    rng = np.random.default_rng(seed)
    vocab = int(getattr(model_config, "vocab_size", 1000))
    longest = max(rows)
    ids = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for row, length in enumerate(rows):
        ids[row, :length] = rng.integers(min(5, vocab - 1), vocab, length)
        mask[row, :length] = 1
    return ids, mask


def _fuse(raw: Path, out: Path, model_config: Any) -> dict[str, int]:
    """ONNX Runtime's BERT fusions on ``raw`` into ``out``; the fused operators it made, by type."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        optimizer = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(getattr(model_config, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(model_config, "hidden_size", 0) or 0),
            # The Python fusions only: ONNX Runtime applies its own graph optimizations when a session loads.
            opt_level=0,
        )
        optimizer.save_model_to_file(str(out))
        statistics = optimizer.get_fused_operator_statistics()
    return {name: int(count) for name, count in statistics.items() if count}


def _quantize(fused: Path, out: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(fused),
            str(out),
            weight_type=getattr(QuantType, settings["weight_type"]),
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
            # Shape inference stops at the fused contrib operators; their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"method": "quantize_dynamic", **settings}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's optimizer and quantizer log every step (INFO, and a generic WARNING) through the
    root logger and loggers named after their modules: silenced while they run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _session_logits(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime

    from sentiment.devices import cpu_threads

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    return np.asarray(logits, dtype=np.float32)


def describe_export(manifest: Manifest, out: Path) -> str:
    """What `sentiment export` prints when it is done."""
    fused = ", ".join(f"{name} {count}" for name, count in sorted(manifest.fused_operators.items())) or "none"
    return (
        f"Exported {manifest.source} ({manifest.dtype}) to {out}\n"
        f"  fused operators: {fused}\n"
        f"  max |logit difference| from torch fp32 (fp32 graph, probe batch): {manifest.max_abs_logit_diff:.2g}\n"
        f"  run it: sentiment predict --model {out} 'A wonderful film.'"
    )
