"""The GPU decisions, tested where they are made: device, precision and memory cap for every case.

Logical GPUs in the shared Ray hide these paths (torch sees no CUDA there), so each rule takes
what it decides from as arguments and is exercised here with the values a GPU host would give.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch._utils import _get_device_index

from sentiment.devices import (
    available_cpus,
    cpu_threads,
    cuda_index,
    gpu_memory_fraction,
    resolve_backend,
    resolve_device,
    resolve_dtype,
    resolve_onnx_device,
    resolve_onnx_dtype,
)
from sentiment.errors import ModelLoadError


@pytest.mark.parametrize(
    ("requested", "cuda_available", "reserved", "visible", "expected"),
    [
        # Under Ray with a GPU reserved: that GPU, renumbered as torch sees it in this process.
        ("auto", True, [0], "0", "cuda:0"),
        ("auto", True, [3], "3", "cuda:0"),
        ("auto", True, ["2", "5"], "2,5", "cuda:0"),
        ("auto", True, [5], "2,5", "cuda:1"),
        # Ray told not to set CUDA_VISIBLE_DEVICES: the id is the physical index.
        ("auto", True, [1], None, "cuda:1"),
        # Under Ray with zero GPUs reserved: the CPU, though CUDA is visible (Ray 2.60 no longer hides it).
        ("auto", True, [], "0,1", "cpu"),
        ("auto", True, [], None, "cpu"),
        # Outside Ray: CUDA if visible.
        ("auto", True, None, None, "cuda:0"),
        ("auto", False, None, None, "cpu"),
        # Forced.
        ("cpu", True, [0], "0", "cpu"),
        ("cuda", True, [3], "3", "cuda:0"),
        ("cuda", True, [], None, "cuda:0"),
        ("cuda", True, None, None, "cuda:0"),
        ("cuda:1", True, None, None, "cuda:1"),
    ],
)
def test_auto_device_is_the_gpu_ray_reserved_and_always_carries_an_index(
    requested: str, cuda_available: bool, reserved: list[int | str] | None, visible: str | None, expected: str
) -> None:
    device = resolve_device(
        requested,
        cuda_available=cuda_available,
        reserved_gpus=reserved,
        visible_devices=visible,
        gpu_fallback="fail",
        torch_cuda="12.8",
    )
    assert device == expected
    if device.startswith("cuda"):
        # What torch.cuda.set_per_process_memory_fraction does with the device: a bare "cuda" raises
        # "Expected a torch.device with a specified index", which killed every fractional replica.
        assert _get_device_index(torch.device(device)) == int(expected.split(":")[1])


def test_a_bare_cuda_device_is_what_torch_refuses() -> None:
    # The failure the index guards against, kept visible: if torch ever accepts it, the guard is moot.
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))


@pytest.mark.parametrize(
    ("torch_cuda", "visible", "says"),
    [
        (None, "0", "the installed torch is a CPU build (torch.version.cuda is None; CUDA_VISIBLE_DEVICES is '0')"),
        (
            "12.8",
            "0",
            "torch is built for CUDA 12.8 but torch.cuda.is_available() is false (CUDA_VISIBLE_DEVICES is '0'): "
            "the node's NVIDIA driver is missing or older than CUDA 12.8 needs, or its device plugin exposed no GPU",
        ),
        ("12.8", "", "CUDA_VISIBLE_DEVICES is empty, which hides every GPU"),
        ("12.8", None, "CUDA_VISIBLE_DEVICES is unset"),
    ],
)
def test_a_reserved_gpu_that_torch_cannot_use_fails_at_start_naming_the_cause(
    torch_cuda: str | None, visible: str | None, says: str
) -> None:
    # No silent CPU fallback: BERT on one core is about 100x slower while everything reports success.
    with pytest.raises(ModelLoadError) as caught:
        resolve_device(
            "auto",
            cuda_available=False,
            reserved_gpus=["0"],
            visible_devices=visible,
            gpu_fallback="fail",
            torch_cuda=torch_cuda,
        )
    message = str(caught.value)
    assert message.startswith("this process reserved GPU ids ['0'] from Ray but torch sees no CUDA device: ")
    assert says in message
    assert message.endswith(
        "set gpu_fallback 'cpu' (--gpu-fallback cpu) to run on the CPU instead (BERT runs about 100x slower there)"
    )


def test_logical_gpus_fall_back_to_the_cpu_only_when_asked_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sentiment.devices"):
        device = resolve_device(
            "auto", cuda_available=False, reserved_gpus=[0], visible_devices="0", gpu_fallback="cpu", torch_cuda=None
        )
    assert device == "cpu"
    assert (
        "reserved GPU ids [0] from Ray but torch sees no CUDA device (the installed torch is a CPU build" in caplog.text
    )
    assert "running on the CPU (gpu_fallback cpu)" in caplog.text


@pytest.mark.parametrize("gpu_fallback", ["fail", "cpu"])
def test_the_fallback_never_applies_where_no_gpu_was_reserved_or_one_is_usable(gpu_fallback: str) -> None:
    def device(cuda_available: bool, reserved: list[int] | None) -> str:
        return resolve_device(
            "auto",
            cuda_available=cuda_available,
            reserved_gpus=reserved,
            visible_devices="0",
            gpu_fallback=gpu_fallback,
            torch_cuda=None,
        )

    assert device(False, None) == device(False, []) == device(True, []) == "cpu"
    assert device(True, [0]) == device(True, None) == "cuda:0"


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
@pytest.mark.parametrize("gpu_fallback", ["fail", "cpu"])
def test_forcing_cuda_without_a_gpu_is_a_clear_error_whatever_the_fallback(requested: str, gpu_fallback: str) -> None:
    with pytest.raises(
        ModelLoadError, match=f"device is '{requested}' but this process sees no CUDA GPU: the installed torch is a CPU"
    ):
        resolve_device(
            requested,
            cuda_available=False,
            reserved_gpus=None,
            visible_devices=None,
            gpu_fallback=gpu_fallback,
            torch_cuda=None,
        )


def test_a_reserved_gpu_that_is_not_visible_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match=r"Ray reserved GPU 4 .* CUDA_VISIBLE_DEVICES is '0,1'"):
        cuda_index(4, "0,1")


@pytest.mark.parametrize(
    ("requested", "device", "capability", "expected"),
    [
        ("auto", "cuda:0", (9, 0), "bf16"),  # H100
        ("auto", "cuda:0", (8, 6), "bf16"),  # A10G
        ("auto", "cuda:0", (8, 0), "bf16"),  # A100
        ("auto", "cuda:0", (7, 5), "fp16"),  # T4: torch says bf16 is supported, but emulates it
        ("auto", "cuda:0", (7, 0), "fp16"),  # V100
        ("auto", "cpu", None, "fp32"),
        ("fp32", "cuda:0", (9, 0), "fp32"),
        ("bf16", "cpu", None, "bf16"),
    ],
)
def test_auto_dtype_is_bf16_only_where_it_is_native(
    requested: str, device: str, capability: tuple[int, int] | None, expected: str
) -> None:
    assert resolve_dtype(requested, device, capability) == expected


def test_forced_bf16_on_an_old_gpu_is_kept_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sentiment.devices"):
        assert resolve_dtype("bf16", "cuda:0", (7, 5)) == "bf16"
    assert "emulated and slow" in caplog.text


@pytest.mark.parametrize(
    ("configured", "num_gpus", "expected"),
    [(None, 0.25, 0.25), (None, 0.5, 0.5), (None, 1.0, None), (None, 2.0, None), (None, 0.0, None), (0.1, 0.25, 0.1)],
)
def test_a_fractional_gpu_caps_memory_to_its_share(configured: float | None, num_gpus: float, expected: float) -> None:
    assert gpu_memory_fraction(configured, num_gpus) == expected


# -- which engine, on what, with how many threads ----------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "dtype", "onnx_export", "expected"),
    [
        ("auto", "auto", False, "torch"),
        ("auto", "bf16", False, "torch"),
        ("auto", "int8", False, "onnxruntime"),
        ("auto", "auto", True, "onnxruntime"),
        ("onnxruntime", "fp32", False, "onnxruntime"),
        ("torch", "fp32", False, "torch"),
    ],
)
def test_auto_backend_is_onnx_runtime_for_int8_and_for_an_export(
    requested: str, dtype: str, onnx_export: bool, expected: str
) -> None:
    assert resolve_backend(requested, dtype, onnx_export=onnx_export) == expected


def test_torch_cannot_run_an_export() -> None:
    with pytest.raises(ModelLoadError, match=r"ONNX export .* use backend 'onnxruntime' or 'auto'"):
        resolve_backend("torch", "auto", onnx_export=True)


@pytest.mark.parametrize(("requested", "reserved"), [("auto", None), ("auto", []), ("cpu", [])])
def test_onnx_runtime_runs_on_the_cpu(requested: str, reserved: list[int] | None) -> None:
    assert resolve_onnx_device(requested, reserved) == "cpu"


@pytest.mark.parametrize(
    ("requested", "reserved", "says"),
    [("cuda", None, "not on device 'cuda'"), ("auto", [0], "Ray reserved GPU ids [0] for this process")],
)
def test_onnx_runtime_on_a_gpu_is_refused_saying_what_to_use(requested: str, reserved: list[int], says: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(says)):
        resolve_onnx_device(requested, reserved)


@pytest.mark.parametrize(
    ("requested", "exported", "expected"),
    [("auto", None, "fp32"), ("fp32", None, "fp32"), ("int8", None, "int8"), ("auto", "int8", "int8")],
)
def test_onnx_precision_is_the_exports_or_the_one_asked(requested: str, exported: str | None, expected: str) -> None:
    assert resolve_onnx_dtype(requested, exported) == expected


def test_an_export_of_another_precision_is_refused_naming_the_command_that_makes_one() -> None:
    with pytest.raises(ModelLoadError, match=re.escape("sentiment export MODEL OUT_DIR --dtype fp32")):
        resolve_onnx_dtype("fp32", "int8")


def test_cpu_threads_are_those_asked_else_rays_else_every_cpu_never_more(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = available_cpus()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads() == cpus
    assert cpu_threads(1) == 1
    assert cpu_threads(cpus + 7) == cpus
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cpus + 7))
    assert cpu_threads() == cpus
