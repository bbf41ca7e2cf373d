"""The GPU decisions, tested where they are made: device, precision and memory cap for every case.

Logical GPUs in the shared Ray hide these paths (torch sees no CUDA there), so each rule takes
what it decides from as arguments and is exercised here with the values a GPU host would give.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._utils import _get_device_index

from sentiment.devices import cuda_index, gpu_memory_fraction, resolve_device, resolve_dtype
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
        # Logical GPUs: Ray reserved one, torch sees none.
        ("auto", False, [0], "0", "cpu"),
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
    device = resolve_device(requested, cuda_available=cuda_available, reserved_gpus=reserved, visible_devices=visible)
    assert device == expected
    if device.startswith("cuda"):
        # What torch.cuda.set_per_process_memory_fraction does with the device: a bare "cuda" raises
        # "Expected a torch.device with a specified index", which killed every fractional replica.
        assert _get_device_index(torch.device(device)) == int(expected.split(":")[1])


def test_a_bare_cuda_device_is_what_torch_refuses() -> None:
    # The failure the index guards against, kept visible: if torch ever accepts it, the guard is moot.
    with pytest.raises(ValueError, match="specified index"):
        _get_device_index(torch.device("cuda"))


def test_logical_gpus_fall_back_to_the_cpu_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sentiment.devices"):
        assert resolve_device("auto", cuda_available=False, reserved_gpus=[0], visible_devices="0") == "cpu"
    assert "reserved GPU ids [0] from Ray but torch sees no CUDA device" in caplog.text


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_forcing_cuda_without_a_gpu_is_a_clear_error(requested: str) -> None:
    with pytest.raises(ModelLoadError, match=f"device is '{requested}' but this process sees no CUDA GPU"):
        resolve_device(requested, cuda_available=False, reserved_gpus=None, visible_devices=None)


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
