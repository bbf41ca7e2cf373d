"""Which device, precision and memory cap a classifier runs with: the GPU decisions, each a small function.

They take what they decide from as arguments (whether torch sees CUDA, the GPUs Ray reserved, the
card's compute capability), so tests exercise every branch on a machine without a GPU; the
classifier passes in the real values. No ray import here; torch only inside `limit_threads_to_cores`.

``device: auto`` means *the device Ray reserved for this process*:

- under Ray with GPUs reserved (``ray.get_gpu_ids()`` non-empty): the first of them, as torch
  numbers it inside this process;
- under Ray with **zero** GPUs reserved: the CPU, even when CUDA is visible. Ray 2.60 no longer
  hides the GPUs from a worker that reserved none (Ray issue 54868), so "CUDA if visible" would
  put a CPU replica or a CPU batch actor on a card it never reserved, uncapped;
- under Ray with GPUs reserved but none that torch can use (a CPU build of torch, a CUDA build
  newer than the node's driver, a device plugin that exposed nothing): a `ModelLoadError` at
  start that names the cause (`gpu_unusable_cause`), since BERT on one core runs about 100x slower
  while everything reports success; ``gpu_fallback: cpu`` runs on the CPU instead, with a warning;
- outside Ray (``sentiment predict`` on a workstation): CUDA if torch sees it, else the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from sentiment.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Compute capability from which bf16 runs natively (Ampere). Below it, torch still reports bf16 as
# supported on T4 and V100, but emulates it, several times slower than fp16.
NATIVE_BF16_CAPABILITY = (8, 0)


def resolve_device(
    requested: str,
    *,
    cuda_available: bool,
    reserved_gpus: Sequence[int | str] | None,
    visible_devices: str | None,
    gpu_fallback: str,
    torch_cuda: str | None,
) -> str:
    """The torch device (``"cpu"`` or ``"cuda:N"``, always with an index) a classifier runs on.

    ``reserved_gpus`` is ``ray.get_gpu_ids()`` when running under Ray, None outside Ray;
    ``visible_devices`` is this process's ``CUDA_VISIBLE_DEVICES``; ``torch_cuda`` is
    ``torch.version.cuda`` (None for a CPU build). 'cuda' and 'cuda:N' force a GPU. A process that
    reserved GPUs torch cannot use fails, naming why, unless ``gpu_fallback`` is 'cpu'.
    """
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not cuda_available:
            raise ModelLoadError(
                f"device is {requested!r} but this process sees no CUDA GPU: "
                f"{gpu_unusable_cause(torch_cuda, visible_devices)}; use device 'auto' or 'cpu'"
            )
        if requested != "cuda":
            return requested
        return f"cuda:{cuda_index(reserved_gpus[0], visible_devices)}" if reserved_gpus else "cuda:0"
    if requested != "auto":
        raise ModelLoadError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {requested!r}")
    if reserved_gpus is None:
        return "cuda:0" if cuda_available else "cpu"
    if not reserved_gpus:
        return "cpu"
    if not cuda_available:
        cause = gpu_unusable_cause(torch_cuda, visible_devices)
        if gpu_fallback != "cpu":
            raise ModelLoadError(
                f"this process reserved GPU ids {list(reserved_gpus)} from Ray but torch sees no CUDA device: "
                f"{cause}. Fix the node, or set gpu_fallback 'cpu' (--gpu-fallback cpu) to run on the CPU "
                "instead (BERT runs about 100x slower there)"
            )
        # Logical GPUs (a test cluster) with an explicit fallback: say so, then run.
        logger.warning(
            "This process reserved GPU ids %s from Ray but torch sees no CUDA device (%s); running on the CPU "
            "(gpu_fallback cpu).",
            list(reserved_gpus),
            cause,
        )
        return "cpu"
    return f"cuda:{cuda_index(reserved_gpus[0], visible_devices)}"


def gpu_unusable_cause(torch_cuda: str | None, visible_devices: str | None) -> str:
    """Why torch sees no CUDA device, from what torch was built for and what the process was shown."""
    if visible_devices is not None and not visible_devices.strip():
        shown = "CUDA_VISIBLE_DEVICES is empty, which hides every GPU"
    elif visible_devices is None:
        shown = "CUDA_VISIBLE_DEVICES is unset"
    else:
        shown = f"CUDA_VISIBLE_DEVICES is {visible_devices!r}"
    if torch_cuda is None:
        return (
            f"the installed torch is a CPU build (torch.version.cuda is None; {shown}); install a CUDA build "
            "of torch on this node"
        )
    return (
        f"torch is built for CUDA {torch_cuda} but torch.cuda.is_available() is false ({shown}): the node's "
        f"NVIDIA driver is missing or older than CUDA {torch_cuda} needs, or its device plugin exposed no GPU "
        "to this process"
    )


def cuda_index(gpu_id: int | str, visible_devices: str | None) -> int:
    """Torch's index, inside this process, of the GPU that Ray calls ``gpu_id``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the reserved ids, so torch renumbers them from 0: Ray's
    GPU 3 is this process's ``cuda:0``. Where that variable is unset (Ray told not to set it), the
    id is the physical index.
    """
    visible = [item.strip() for item in (visible_devices or "").split(",") if item.strip()]
    if str(gpu_id) in visible:
        return visible.index(str(gpu_id))
    if visible:
        raise ModelLoadError(
            f"Ray reserved GPU {gpu_id!r} for this process but CUDA_VISIBLE_DEVICES is {visible_devices!r}"
        )
    try:
        return int(gpu_id)
    except ValueError:
        raise ModelLoadError(f"cannot tell torch's index of GPU {gpu_id!r}: CUDA_VISIBLE_DEVICES is unset") from None


def resolve_dtype(requested: str, device: str, capability: tuple[int, int] | None) -> str:
    """The precision ('fp32', 'bf16', 'fp16') to run in; ``capability`` is the GPU's, None on a CPU.

    'auto': bf16 on a GPU that runs it natively (compute capability 8.0 and up), fp16 on older
    GPUs (T4, V100: bf16 is emulated there), fp32 on a CPU.
    """
    on_gpu = device.startswith("cuda")
    if requested == "auto":
        if not on_gpu:
            return "fp32"
        return "bf16" if capability is not None and capability >= NATIVE_BF16_CAPABILITY else "fp16"
    if requested == "bf16" and on_gpu and capability is not None and capability < NATIVE_BF16_CAPABILITY:
        logger.warning(
            "dtype bf16 on a GPU of compute capability %d.%d is emulated and slow; fp16 runs natively there.",
            *capability,
        )
    return requested


def resolve_backend(requested: str, dtype: str, *, onnx_export: bool) -> str:
    """The engine that runs the forward pass: 'torch' or 'onnxruntime'.

    ``onnx_export``: the model directory was written by ``sentiment export``. 'auto' picks ONNX
    Runtime for int8 (only it runs int8) and for an export (only it can), torch otherwise. The
    config alone already refused int8 with torch (`ModelConfig`); what a directory holds is checked here.
    """
    if requested == "torch":
        if onnx_export:
            raise ModelLoadError(
                "the model directory is an ONNX export (model.onnx), which torch cannot run; use backend "
                "'onnxruntime' or 'auto', or point model_id at the torch checkpoint it was exported from"
            )
        return "torch"
    if requested == "onnxruntime" or dtype == "int8" or onnx_export:
        return "onnxruntime"
    return "torch"


def resolve_onnx_device(requested: str, reserved_gpus: Sequence[int | str] | None) -> str:
    """The device of an ONNX Runtime engine: always the CPU (the ``onnxruntime`` package runs there only).

    A process that Ray gave a GPU is refused rather than left to idle its card: a GPU wants backend torch.
    """
    if requested.startswith("cuda"):
        raise ModelLoadError(
            f"backend onnxruntime runs on the CPU, not on device {requested!r}; use device 'cpu' or 'auto', "
            "or backend torch (dtype auto) on a GPU"
        )
    if reserved_gpus:
        raise ModelLoadError(
            f"backend onnxruntime runs on the CPU, but Ray reserved GPU ids {list(reserved_gpus)} for this "
            "process; give it num_gpus 0, or run backend torch (dtype auto) on the GPU"
        )
    return "cpu"


def resolve_onnx_dtype(requested: str, exported: str | None) -> str:
    """The precision of an ONNX Runtime engine, 'fp32' or 'int8'.

    ``exported``: the precision of the ONNX export ``model_id`` names, None when it names a torch
    checkpoint (exported on demand at the precision asked). An export keeps its precision: 'auto'
    means it, another is refused.
    """
    if exported is None:
        return "int8" if requested == "int8" else "fp32"
    if requested in ("auto", exported):
        return exported
    raise ModelLoadError(
        f"the model directory is an {exported} ONNX export; use dtype 'auto' or {exported!r} with it, or export "
        f"the torch checkpoint again with `sentiment export MODEL OUT_DIR --dtype {requested}`"
    )


def gpu_memory_fraction(configured: float | None, num_gpus: float) -> float | None:
    """The CUDA memory cap of a process that reserved ``num_gpus`` from Ray.

    Ray's fractional GPUs are a scheduling fiction: nothing stops a 0.25-GPU replica from taking the
    whole card, so a process with a fraction caps itself to it. An explicit ``configured`` cap wins;
    a whole GPU or more needs none.
    """
    if configured is not None:
        return configured
    return num_gpus if 0 < num_gpus < 1 else None


def available_cpus() -> int:
    """The CPUs this process may run on (container limits set through affinity included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(wanted: int | None = None) -> int:
    """The threads a forward pass on the CPU uses: ``wanted``, else ``OMP_NUM_THREADS``, else every
    CPU this process may use; never more than those CPUs.

    Ray sets ``OMP_NUM_THREADS`` from an actor's logical CPUs, so a replica or a batch actor runs
    with the CPUs it reserved: the count torch reads from that variable too. A test or an operator
    may set it above the real cores; more threads than cores only makes a forward pass slower.
    No torch here: ONNX Runtime sessions take this count.
    """
    cpus = available_cpus()
    if wanted is None:
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        wanted = int(omp) if omp.isdigit() and int(omp) > 0 else cpus
    return max(1, min(wanted, cpus))


def limit_threads_to_cores(wanted: int | None = None) -> int:
    """Set torch's intra-op threads to ``wanted`` (default: what torch has), capped at the CPUs this
    process may use; return the count.

    Ray sets ``OMP_NUM_THREADS`` from an actor's logical CPUs, which a test or an operator may set
    above the real cores; more threads than cores only makes a forward pass slower.
    """
    import torch

    threads = cpu_threads(wanted or torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads
