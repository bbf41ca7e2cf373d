"""`ModelConfig`: the one typed description of which model runs and how.

The Serve app, the batch pipeline, the CLI and YAML files all build from this object, so a
knob lives here once. Nothing here imports torch, transformers or ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sentiment.devices import gpu_memory_fraction

DEFAULT_MODEL_ID = "lvwerra/bert-imdb"

LongTextStrategy = Literal["head", "tail", "head_tail", "chunks"]
DeviceName = str
DTypeName = Literal["auto", "fp32", "bf16", "fp16", "int8"]
BackendName = Literal["auto", "torch", "onnxruntime"]
GPUFallback = Literal["fail", "cpu"]


class ModelConfig(BaseModel):
    """Which checkpoint to load, on what device and precision, and how texts are fed to it."""

    # `model_id` would otherwise clash with pydantic's protected `model_` namespace.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    model_id: str = Field(
        DEFAULT_MODEL_ID,
        min_length=1,
        description="Hugging Face hub id or local directory of a sequence-classification checkpoint.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) to load; ignored for a local directory."
    )
    labels: list[str] = Field(
        default_factory=lambda: ["neg", "pos"],
        min_length=2,
        description=(
            "Label names in class-index order. Used when the checkpoint's own id2label names are "
            "generic (LABEL_0, 0, NEGATIVE, ...); specific names in the checkpoint are kept."
        ),
    )
    device: DeviceName = Field(
        "auto",
        description=(
            "'auto': the GPU Ray reserved for this process (the CPU when it reserved none, even if CUDA is "
            "visible); outside Ray, CUDA if visible, else the CPU. Or force 'cpu', 'cuda' or 'cuda:N'."
        ),
    )
    backend: BackendName = Field(
        "auto",
        description=(
            "What runs the forward pass: 'torch' (eager PyTorch, CPU or GPU) or 'onnxruntime' (ONNX Runtime on "
            "the CPU, fp32 or int8; a torch checkpoint is exported once into a local cache). 'auto': "
            "onnxruntime when dtype is int8 or the model directory is an ONNX export (sentiment export), else torch."
        ),
    )
    dtype: DTypeName = Field(
        "auto",
        description=(
            "'auto': bf16 on a GPU of compute capability 8.0 or more, fp16 on older GPUs (bf16 is emulated "
            "there), fp32 on a CPU, an ONNX export's own precision. Or force fp32, bf16 or fp16 (torch), or "
            "int8 (ONNX Runtime on the CPU: int8 weights, a little faster still, scores move slightly)."
        ),
    )
    max_length: int = Field(
        512,
        ge=8,
        description=(
            "Most tokens one model input may hold, special tokens included. Capped at what the model "
            "supports (max_position_embeddings and the tokenizer's model_max_length)."
        ),
    )
    long_text: LongTextStrategy = Field(
        "head_tail",
        description=(
            "What to do with a text longer than max_length: 'head' keeps the first tokens, 'tail' the "
            "last, 'head_tail' the first head_tokens and the rest from the end (Sun et al. 2019: best "
            "on IMDB), 'chunks' averages class probabilities over overlapping windows."
        ),
    )
    head_tokens: int = Field(
        128,
        ge=0,
        description=(
            "Tokens kept from the start of a long text under 'head_tail' (the rest come from its end), "
            "for 510 content tokens; a model or max_length with fewer keeps the same proportion."
        ),
    )
    chunk_stride: int = Field(256, ge=1, description="Tokens between the starts of consecutive windows under 'chunks'.")
    forward_max_tokens: int | Literal["auto"] = Field(
        "auto",
        description=(
            "Token budget of one forward pass: batch size times its longest member (padding included). "
            "A single input longer than the budget still runs, alone. 'auto': the budget measured best "
            "for the device and precision (see auto_max_batch_tokens)."
        ),
    )
    forward_max_inputs: int = Field(64, ge=1, description="Most inputs in one forward pass, whatever their length.")
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Cap this process's CUDA memory to this fraction of the card. Ray does not isolate fractional "
            "GPUs, so a replica given 0.25 GPU should set 0.25. None: no cap."
        ),
    )
    gpu_fallback: GPUFallback = Field(
        "fail",
        description=(
            "What a replica or batch actor that reserved a GPU from Ray does when torch cannot use one (a CPU "
            "build of torch, a driver too old for torch's CUDA, a device plugin that exposed nothing): 'fail' at "
            "start naming the cause, or 'cpu': run on the CPU with a warning, about 100x slower for BERT "
            "(logical GPUs in tests)."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "Run the torch model through torch.compile (dynamic shapes): each process compiles on its first "
            "batches, then may run faster. Off until measured on the card (python -m benchmarks.gpu_check)."
        ),
    )
    local_files_only: bool = Field(
        False, description="Never contact the hub; load from a local directory or the local cache only."
    )

    def for_gpu_share(self, num_gpus: float) -> ModelConfig:
        """This config for a process that reserved ``num_gpus`` from Ray: a fraction caps its CUDA memory.

        The one place the GPU-share rule is applied (see `sentiment.devices.gpu_memory_fraction`).
        """
        fraction = gpu_memory_fraction(self.gpu_memory_fraction, num_gpus)
        if fraction == self.gpu_memory_fraction:
            return self
        return self.model_copy(update={"gpu_memory_fraction": fraction})

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")

    @model_validator(mode="after")
    def _check_engine(self) -> ModelConfig:
        # Decided here, from the config alone, so a contradiction fails before anything loads (exit 2 on
        # the command line). What a model directory holds is checked at load (sentiment.engines).
        on_gpu = self.device.startswith("cuda")
        if self.dtype == "int8":
            if self.backend == "torch":
                raise ValueError(
                    "dtype int8 runs on ONNX Runtime only; use backend 'onnxruntime' or 'auto' with int8, "
                    "or dtype fp32, bf16 or fp16 with backend torch"
                )
            if on_gpu:
                raise ValueError(
                    f"dtype int8 runs on the CPU (ONNX Runtime), not on device {self.device!r}; use device 'cpu' "
                    "or 'auto' with int8, or dtype auto (bf16 or fp16) on a GPU"
                )
        if self.backend == "onnxruntime":
            if self.dtype in ("bf16", "fp16"):
                raise ValueError(
                    f"backend onnxruntime runs fp32 or int8, not {self.dtype}; use dtype fp32 or int8, "
                    f"or backend torch for {self.dtype}"
                )
            if on_gpu:
                raise ValueError(
                    f"backend onnxruntime runs on the CPU, not on device {self.device!r}; use device 'cpu' or "
                    "'auto', or backend torch on a GPU"
                )
        return self

    @field_validator("forward_max_tokens", mode="before")
    @classmethod
    def _check_max_batch_tokens(cls, value: Any) -> Any:
        # Checked before pydantic tries the union, so a bad value gets one error, not one per member.
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError(f"forward_max_tokens must be a positive number of tokens or 'auto', got {value!r}")

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str]) -> list[str]:
        if any(not name for name in value):
            raise ValueError("labels must be non-empty strings")
        if len(set(value)) != len(value):
            raise ValueError(f"labels must be unique, got {value}")
        return value


# Forward token budgets that 'auto' picks, by device type and precision. On a CPU, a bigger batch
# adds no arithmetic efficiency in fp32 (one review's matrices already fill the cores) while it
# costs cache misses and padding: BERT-base on 2 Xeon cores ran 1,580 tokens/s at 512 to 1,024
# tokens and 1,130 at 16,384. bf16 on AMX wants taller matrices, up to a point. GPUs want big batches.
# Measured: benchmarks/RESULTS.md, "Forward token budget by device and precision".
AUTO_MAX_BATCH_TOKENS: dict[tuple[str, str], int] = {
    ("cpu", "fp32"): 1024,
    ("cpu", "bf16"): 2048,
    ("cpu", "fp16"): 1024,
}
AUTO_MAX_BATCH_TOKENS_GPU = 16384


def auto_max_batch_tokens(device_type: str, dtype: str) -> int:
    """The forward token budget 'auto' means on ``device_type`` ('cpu', 'cuda') at ``dtype`` ('fp32', ...)."""
    if device_type == "cpu":
        return AUTO_MAX_BATCH_TOKENS.get((device_type, dtype), AUTO_MAX_BATCH_TOKENS[("cpu", "fp32")])
    return AUTO_MAX_BATCH_TOKENS_GPU


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field path, e.g. ``model.dtype: Input should be ...``."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        where = f"{prefix}{path}" if path else prefix.rstrip(".") or "config"
        lines.append(f"{where}: {item['msg']}")
    return "\n".join(lines)


SectionT = TypeVar("SectionT", bound=BaseModel)


def parse_section(cls: type[SectionT], data: SectionT | Mapping[str, Any], source: str) -> SectionT:
    """A ``cls`` from a mapping (a YAML section), with errors that name each bad field under ``source``."""
    from sentiment.errors import InvalidInputError

    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{source} must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidInputError(f"invalid {source}:\n" + format_validation_error(exc, prefix=f"{source}.")) from exc


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    from sentiment.errors import InvalidInputError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data
