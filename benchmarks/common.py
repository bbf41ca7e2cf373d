"""Helpers the benchmarks share: what machine this is, the random-weight checkpoint they all load, ports and servers."""

from __future__ import annotations

import platform
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from sentiment.testing import make_checkpoint


def cpu_supports_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), which make bf16 fast in PyTorch."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` reports it."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def ensure_checkpoint(out: Path, size: str = "base") -> Path:
    """A random-weight checkpoint of ``size`` under ``out``, built once (no network) and reused after."""
    checkpoint = out / f"checkpoint-{size}"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, size=size)
    return checkpoint


def popen_interruptible(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **kwargs)`` for a server that Ctrl-C (SIGINT) must stop; main thread only.

    A process started in the background of a script (``cmd &``) inherits SIGINT ignored, and its
    children would too: exec keeps an ignored signal ignored but resets a handled one. The child
    is started while this process handles SIGINT, so it gets SIGINT as from a terminal.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_serve() -> int:
    """Serve's HTTP proxy on 127.0.0.1 (benchmarks listen on loopback only) at a free port; Ray must be up."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port
