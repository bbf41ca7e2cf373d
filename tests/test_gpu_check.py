"""`benchmarks.gpu_check`: its dry run end to end (so the GPU script cannot rot), and what it judges."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu_check import REPLICAS, Setup, checks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_the_dry_run_runs_every_step_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "check"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--duration", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == ["precision", "model_only", "online", "offline", "oom"]
    assert all(step["ok"] for step in steps.values()), steps
    assert report["dry_run"] is True
    assert set(steps["precision"]["result"]["against_fp32"]) == {"bf16", "fp16"}
    assert steps["model_only"]["result"]["tokens_per_s"] > 0
    online = steps["online"]["result"]
    assert online["replicas_serving"] == REPLICAS
    assert [level["clients"] for level in online["levels"]] == [16, 64]
    assert all(level["requests"] > 0 for level in online["levels"])
    offline = steps["offline"]["result"]
    assert (offline["rows"], offline["errors"]) == (300, 0)
    assert offline["actors"]
    assert all(actor["device"] == "cpu" for actor in offline["actors"])
    assert steps["oom"]["result"]["injected"] is True
    assert steps["oom"]["result"]["splits"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in table
    assert "| oom | forced OOM (injected at _forward_batch) |" in table


def setup(tmp_path: Path, dry_run: bool) -> Setup:
    return Setup(tmp_path, dry_run, "cpu" if dry_run else "cuda", tmp_path, tmp_path, 300, (16,), 1.0)


def replica(device: str, gpus: float, cap: int | None = None, peak: int | None = None) -> dict[str, Any]:
    return {
        "device": device,
        "dtype": "bf16",
        "replica_gpus": gpus,
        "gpu_memory_cap_bytes": cap,
        "gpu_memory_peak_bytes": peak,
    }


def test_on_a_gpu_a_replica_on_the_cpu_or_a_missing_one_fails_the_check(tmp_path: Path) -> None:
    replicas = {str(i): replica("cuda:0", 0.25, 100, 50) for i in range(REPLICAS)}
    good = {"replicas": replicas, "replicas_serving": REPLICAS, "errors": 0, "all_under_cap": True}
    assert checks("online", good, setup(tmp_path, dry_run=False)) == []
    on_cpu = {**good, "replicas": {**replicas, "0": replica("cpu", 0.25)}}
    assert checks("online", on_cpu, setup(tmp_path, dry_run=False)) == ["a replica did not run on the GPU"]
    three = {**good, "replicas_serving": 3}
    assert checks("online", three, setup(tmp_path, dry_run=False)) == ["3 of 4 replicas answered"]
    cpu_replicas = {**good, "replicas": {str(i): replica("cuda:0", 0.0) for i in range(REPLICAS)}}
    assert checks("online", cpu_replicas, setup(tmp_path, dry_run=False)) == [
        "replicas reserved [0.0] GPU, expected 0.25"
    ]


def test_an_oom_probe_that_never_split_fails_the_check(tmp_path: Path) -> None:
    result = {"splits": 0, "identical_labels": 1.0}
    assert checks("oom", result, setup(tmp_path, dry_run=False)) == ["no forward pass was split: the cap did not bite"]
