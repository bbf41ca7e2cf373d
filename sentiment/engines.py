"""The forward pass behind one small seam: token ids and attention mask in, logits out.

`SentimentClassifier` (`sentiment.model`) tokenizes, cuts long reviews into windows, batches by
tokens, halves a pass that ran out of device memory and turns logits into labels, whatever runs the
model. An `Engine` only runs it:

- `TorchEngine`: PyTorch on the CPU or a GPU, in fp32, bf16 or fp16, eager or ``torch.compile``'d;
- `OnnxRuntimeEngine`: ONNX Runtime on the CPU, fp32 or int8, from a directory `sentiment export`
  wrote (`sentiment.exported`), or from one it exports once into a local cache (`sentiment.export`).
  It never imports torch.

`load_engine` picks one from a `ModelConfig` (the rules are `sentiment.devices.resolve_backend` and
its neighbours) and builds it; tests hand the classifier an engine of their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sentiment.config import ModelConfig
from sentiment.devices import (
    cpu_threads,
    limit_threads_to_cores,
    resolve_backend,
    resolve_device,
    resolve_dtype,
    resolve_onnx_device,
    resolve_onnx_dtype,
)
from sentiment.errors import ModelLoadError
from sentiment.exported import MODEL_FILE, export_directory, read_manifest

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """What runs the model: padded batches of token ids in, one row of logits per sequence out.

    A call of the classifier runs several passes, then reads all their logits back at once:
    `forward` may leave its logits where it computed them (on the GPU, with the pass still running:
    CUDA launches return at once, so the classifier pads the next batch meanwhile) and `to_numpy`
    brings a call's logits to the host in one copy, the call's one wait for the device.
    """

    backend: str
    """'torch' or 'onnxruntime'."""
    device: str
    """'cpu' or 'cuda:N'."""
    dtype: str
    """'fp32', 'bf16', 'fp16' or 'int8'."""
    threads: int
    """CPU threads of one forward pass."""
    memory_errors: tuple[type[BaseException], ...]
    """What a pass raises when it runs out of device memory: the classifier halves the batch and retries."""

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> Any:
        """Logits (batch x labels) for int64 ids of shape batch x longest, wherever the engine keeps them.

        ``attention_mask`` (int64, 1 = token) is None when no member is padded. Both arrays are the
        classifier's and are reused for the next pass: an engine copies what it keeps.
        """
        ...

    def to_numpy(self, logits: Sequence[Any]) -> np.ndarray:
        """The logits of several `forward` calls, in order, as one float32 host array (rows stacked)."""
        ...

    def release_memory(self) -> None:
        """Return cached device memory after a pass ran out of it."""
        ...

    def peak_memory_bytes(self) -> int | None:
        """Most device memory this process has held at once; None on a CPU."""
        ...

    def describe(self) -> dict[str, Any]:
        """What runs: backend, dtype, device, threads and the engine's memory cap."""
        ...


def backend_of(config: ModelConfig) -> str:
    """'torch' or 'onnxruntime': the engine ``config`` runs on (`sentiment.devices.resolve_backend`)."""
    return resolve_backend(config.backend, config.dtype, onnx_export=export_directory(config.model_id) is not None)


def load_engine(
    config: ModelConfig, *, reserved_gpus: Sequence[int | str] | None = None, threads: int | None = None
) -> Engine:
    """The engine ``config`` asks for, loaded.

    ``reserved_gpus``: ``ray.get_gpu_ids()`` in a Ray worker, None outside Ray (see `sentiment.devices`).
    ``threads``: CPU threads of a forward pass; None: the CPUs this process owns (`cpu_threads`).
    """
    if backend_of(config) == "torch":
        return TorchEngine(config, reserved_gpus=reserved_gpus, threads=threads)
    resolve_onnx_device(config.device, reserved_gpus)
    exported = onnx_directory(config)
    manifest = read_manifest(exported)
    resolve_onnx_dtype(config.dtype, manifest.dtype)
    return OnnxRuntimeEngine(exported, dtype=manifest.dtype, threads=cpu_threads(threads))


def onnx_directory(config: ModelConfig) -> Path:
    """The ONNX export an onnxruntime engine for ``config`` loads: ``model_id`` itself when it is one,
    else the torch checkpoint's export from the local cache, made there first if absent (`cached_export`)."""
    exported = export_directory(config.model_id)
    if exported is None:
        from sentiment.export import cached_export

        exported = cached_export(config, resolve_onnx_dtype(config.dtype, None))
    return exported


def prepare_onnx(config: ModelConfig) -> Path | None:
    """Before Ray starts: the ONNX directory ``config``'s engines will load, exported into the local cache
    now if needed (so replicas and actors on this machine find it there); None for backend torch."""
    return None if backend_of(config) == "torch" else onnx_directory(config)


# -- torch ---------------------------------------------------------------------------------------

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchEngine:
    """Eager PyTorch (or ``torch.compile``'d): the checkpoint on the device and precision that
    `sentiment.devices` resolves."""

    backend = "torch"

    def __init__(
        self, config: ModelConfig, *, reserved_gpus: Sequence[int | str] | None = None, threads: int | None = None
    ) -> None:
        import torch

        from sentiment.loading import load_model

        self.torch_device = torch.device(
            resolve_device(
                config.device,
                cuda_available=torch.cuda.is_available(),
                reserved_gpus=reserved_gpus,
                visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                gpu_fallback=config.gpu_fallback,
                torch_cuda=torch.version.cuda,
            )
        )
        self.device = str(self.torch_device)
        self.on_gpu = self.torch_device.type == "cuda"
        capability = torch.cuda.get_device_capability(self.torch_device) if self.on_gpu else None
        self.dtype = resolve_dtype(config.dtype, self.device, capability)
        self.gpu_memory_fraction = config.gpu_memory_fraction if self.on_gpu else None
        self.gpu_memory_cap_bytes: int | None = None
        if self.on_gpu:
            torch.cuda.set_device(self.torch_device)
            if config.gpu_memory_fraction is not None:
                # The device carries its index: torch refuses a bare "cuda" here.
                torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, self.torch_device)
                total = torch.cuda.get_device_properties(self.torch_device).total_memory
                self.gpu_memory_cap_bytes = int(total * config.gpu_memory_fraction)
        self.threads = limit_threads_to_cores(threads)
        self.memory_errors: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
        self.model = load_model(config, getattr(torch, _TORCH_DTYPES[self.dtype]))
        self.model.to(self.torch_device)
        self.model.eval()
        self.compiled = config.compile
        # dynamic=True: one graph for every batch shape, instead of a compile per new length.
        self._run = torch.compile(self.model, dynamic=True) if config.compile else self.model
        self._attention = getattr(self.model.config, "_attn_implementation", None)
        self._mask_value = torch.finfo(self.model.dtype).min

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> Any:
        import torch

        with torch.inference_mode():
            logits = self._run(input_ids=self._to_device(input_ids), attention_mask=self._mask(attention_mask)).logits
            # Still on the device, the pass perhaps still running: `to_numpy` waits once per call.
            return logits.float()

    def to_numpy(self, logits: Sequence[Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            stacked = logits[0] if len(logits) == 1 else torch.cat(list(logits))
            return np.asarray(stacked.cpu().numpy(), dtype=np.float32)

    def _to_device(self, array: np.ndarray) -> Any:
        import torch

        tensor = torch.from_numpy(array)
        if not self.on_gpu:
            return tensor
        # A pinned copy lets the upload run asynchronously; torch's pinned-memory cache keeps the block
        # until the copy has run, so the classifier may refill its own array at once.
        return tensor.pin_memory().to(self.torch_device, non_blocking=True)

    def _mask(self, attention_mask: np.ndarray | None) -> Any:
        """The mask as the model's attention takes it prepared, or None when nothing is padded.

        Given a 2-D mask, transformers' SDPA path checks ``mask.all()`` to skip it: a host sync per
        pass. A 4-D mask is used as it is, so a padded batch is masked without that check, and an
        unpadded one runs without a mask (and may use the flash kernel).
        """
        if attention_mask is None:
            return None
        mask = self._to_device(attention_mask)
        if self._attention == "sdpa":
            return mask[:, None, None, :].bool()
        if self._attention == "eager":
            return (1.0 - mask[:, None, None, :].to(self.model.dtype)) * self._mask_value
        return mask

    def release_memory(self) -> None:
        if self.on_gpu:
            import torch

            torch.cuda.empty_cache()

    def peak_memory_bytes(self) -> int | None:
        if not self.on_gpu:
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(self.torch_device))

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "dtype": self.dtype,
            "device": self.device,
            "threads": self.threads,
            "compile": self.compiled,
            "gpu_memory_fraction": self.gpu_memory_fraction,
            "gpu_memory_cap_bytes": self.gpu_memory_cap_bytes,
        }


# -- ONNX Runtime --------------------------------------------------------------------------------


class OnnxRuntimeEngine:
    """ONNX Runtime on the CPU over an export's ``model.onnx``: one session, ``threads`` intra-op threads."""

    backend = "onnxruntime"
    device = "cpu"
    # No device memory to run out of: a CPU pass that cannot allocate is an ordinary failure.
    memory_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, directory: Path, *, dtype: str, threads: int) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.dtype = dtype
        self.threads = threads
        path = self.directory / MODEL_FILE
        options = ort.SessionOptions()
        # Exactly the CPUs this replica or actor owns, in one pool: operators run one after the other
        # (a BERT layer is a chain), each across the intra-op threads.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            detail = str(exc).strip().splitlines()
            raise ModelLoadError(
                f"cannot load the ONNX model {path}: {type(exc).__name__}: {detail[0] if detail else 'no detail'}"
            ) from exc
        inputs = {item.name for item in self.session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= inputs:
            raise ModelLoadError(f"the ONNX model {path} takes {sorted(inputs)}; input_ids and attention_mask needed")
        self._token_type_ids = "token_type_ids" in inputs
        self._output = self.session.get_outputs()[0].name

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        # The exported graph always takes a mask.
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if self._token_type_ids:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (logits,) = self.session.run([self._output], feeds)
        return np.asarray(logits, dtype=np.float32)

    def to_numpy(self, logits: Sequence[Any]) -> np.ndarray:
        return np.concatenate(list(logits)) if len(logits) != 1 else np.asarray(logits[0])

    def release_memory(self) -> None:
        return None

    def peak_memory_bytes(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "dtype": self.dtype,
            "device": self.device,
            "threads": self.threads,
            "compile": False,
            "gpu_memory_fraction": None,
            "gpu_memory_cap_bytes": None,
        }
