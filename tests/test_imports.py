"""The core stays light: importing it pulls in neither ray nor torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["sentiment", "sentiment.model", "sentiment.cli", "sentiment.config", "ray_sentiment.cli"]
)
def test_core_imports_without_ray_or_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
