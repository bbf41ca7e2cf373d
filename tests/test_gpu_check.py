"""`benchmarks.gpu_check`: its dry run end to end (so the GPU script cannot rot), and what it judges."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu_check import (
    OOM_MAX_DP,
    PRECISION_MAX_DP,
    REPLICAS,
    STEP_TIMEOUTS_S,
    STEPS,
    Setup,
    actors_rate,
    checks,
    run_in_child,
    run_steps,
)

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.mark.e2e
def test_the_dry_run_runs_every_step_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "check"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--duration", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == list(STEPS)
    assert all(step["ok"] for step in steps.values()), steps
    assert report["dry_run"] is True
    assert "ray_status" in report
    assert set(steps["precision"]["result"]["against_fp32"]) == {"bf16", "fp16"}
    model_only = steps["model_only"]["result"]
    assert model_only["tokens_per_s"] > 0
    assert {variant["forward_max_inputs"] for variant in model_only["variants"].values()} == {64, 256}
    compiled = steps["compile"]["result"]
    assert compiled["compiled"]["tokens_per_s"] > 0
    assert compiled["max_abs_dp"] <= 2e-2
    online = steps["online"]["result"]
    assert online["replicas_serving"] == REPLICAS
    assert [level["clients"] for level in online["levels"]] == [16, 64]
    assert all(level["requests"] > 0 for level in online["levels"])
    for name in ("offline", "offline_compile"):
        offline = steps[name]["result"]
        assert (offline["rows"], offline["errors"], offline["actor_rows"]) == (300, 0, 300)
        assert offline["reviews_per_s_actors"] > offline["reviews_per_s_whole_process"] > 0
        assert all(actor["device"] == "cpu" for actor in offline["actors"])
    assert steps["offline_compile"]["result"]["compile"] is True
    assert steps["oom"]["result"]["injected"] is True
    assert steps["oom"]["result"]["splits"] > 0
    assert steps["oom"]["result"]["max_abs_dp"] <= OOM_MAX_DP
    table = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in table
    assert "| oom | forced OOM (injected at _forward_batch) |" in table


def setup(tmp_path: Path, dry_run: bool) -> Setup:
    return Setup(
        out=tmp_path,
        dry_run=dry_run,
        device="cpu" if dry_run else "cuda",
        checkpoint=tmp_path,
        corpus=tmp_path,
        rows=300,
        clients=(16,),
        duration=1.0,
        gpu_total_bytes=None if dry_run else 140 * GIB,
    )


def replica(device: str, gpus: float, cap: int | None = None, peak: int | None = None) -> dict[str, Any]:
    return {
        "device": device,
        "dtype": "bf16",
        "replica_gpus": gpus,
        "gpu_memory_cap_bytes": cap,
        "gpu_memory_peak_bytes": peak,
    }


def test_the_steps_time_limits_add_up_to_at_most_8_minutes() -> None:
    assert set(STEP_TIMEOUTS_S) == set(STEPS)
    assert sum(STEP_TIMEOUTS_S.values()) <= 8 * 60


def test_on_a_gpu_a_replica_on_the_cpu_or_a_missing_one_fails_the_check(tmp_path: Path) -> None:
    quarter = 35 * GIB  # a quarter of the 140 GiB card
    replicas = {str(i): replica("cuda:0", 0.25, quarter, GIB) for i in range(REPLICAS)}
    good = {"replicas": replicas, "replicas_serving": REPLICAS, "errors": 0}
    assert checks("online", good, setup(tmp_path, dry_run=False)) == []
    on_cpu = {**good, "replicas": {**replicas, "0": replica("cpu", 0.25, quarter)}}
    assert checks("online", on_cpu, setup(tmp_path, dry_run=False)) == ["a replica did not run on the GPU"]
    three = {**good, "replicas_serving": 3}
    assert checks("online", three, setup(tmp_path, dry_run=False)) == ["3 of 4 replicas answered"]
    cpu_replicas = {**good, "replicas": {str(i): replica("cuda:0", 0.0) for i in range(REPLICAS)}}
    assert checks("online", cpu_replicas, setup(tmp_path, dry_run=False)) == [
        "replicas reserved [0.0] GPU, expected 0.25"
    ]


def test_every_fractional_replica_must_cap_its_memory_to_exactly_its_share(tmp_path: Path) -> None:
    quarter = 35 * GIB
    replicas = {str(i): replica("cuda:0", 0.25, quarter, GIB) for i in range(REPLICAS)}
    good = {"replicas": replicas, "replicas_serving": REPLICAS, "errors": 0}

    def failures(changed: dict[str, Any]) -> list[str]:
        return checks("online", {**good, "replicas": {**replicas, "2": changed}}, setup(tmp_path, dry_run=False))

    # No cap used to pass (`cap is None or peak <= cap`): a replica without one can take the whole card.
    assert failures(replica("cuda:0", 0.25, None, 50 * GIB)) == ["replica 2 holds 0.25 GPU but set no memory cap"]
    assert failures(replica("cuda:0", 0.25, 70 * GIB, GIB)) == [
        f"replica 2 capped at {70 * GIB} bytes; its 0.25 GPU share is {quarter} bytes"
    ]
    assert failures(replica("cuda:0", 0.25, quarter, quarter + 1)) == [
        f"replica 2 peaked at {quarter + 1} bytes, over its cap of {quarter}"
    ]


def test_precision_and_oom_are_judged_on_probabilities_not_labels(tmp_path: Path) -> None:
    gpu = setup(tmp_path, dry_run=False)
    resolved = {"device": "cuda:0", "dtype": "bf16"}
    # A random BERT-large labels every review the same: identical labels prove nothing, |dp| does.
    within = {"bf16": {"max_abs_dp": PRECISION_MAX_DP["bf16"], "identical_labels": 0.0}, "fp16": {"max_abs_dp": 0.0}}
    assert checks("precision", {"auto_outside_ray": resolved, "against_fp32": within}, gpu) == []
    over = {**within, "bf16": {"max_abs_dp": 0.05, "identical_labels": 1.0}}
    assert checks("precision", {"auto_outside_ray": resolved, "against_fp32": over}, gpu) == [
        "bf16: max |dp| 0.0500 against fp32, over 0.02"
    ]
    assert checks("oom", {"splits": 3, "max_abs_dp": OOM_MAX_DP}, gpu) == []
    assert checks("oom", {"splits": 3, "max_abs_dp": 1e-3}, gpu) == [
        "probabilities after splitting moved by up to 1.00e-03, over 0.0001"
    ]
    assert checks("oom", {"splits": 0, "max_abs_dp": 0.0}, gpu) == ["no forward pass was split: the cap did not bite"]
    assert checks("compile", {"max_abs_dp": 0.5}, gpu) == ["compiled: max |dp| 0.5000 against eager, over 0.02"]


def test_the_offline_rate_is_the_model_actors_own_not_the_whole_jobs(tmp_path: Path) -> None:
    actors = [
        {
            "rows": 30_000,
            "model_seconds": 12.0,
            "first_call_rows": 1024,
            "first_call_seconds": 3.0,
            "first_call_at": 100.0,
            "last_call_at": 125.0,
        },
        {
            "rows": 30_000,
            "model_seconds": 10.0,
            "first_call_rows": 1024,
            "first_call_seconds": 1.0,
            "first_call_at": 101.0,
            "last_call_at": 124.0,
        },
    ]
    rate = actors_rate(actors)
    assert rate["actor_rows"] == 60_000
    assert rate["reviews_per_s_actors"] == pytest.approx(30_000 / 12 + 30_000 / 10)
    assert rate["reviews_per_s_actors_after_first_call"] == pytest.approx(28_976 / 9 + 28_976 / 9)
    assert (rate["first_call_at"], rate["last_call_at"]) == (100.0, 125.0)
    offline = {"rows": 60_000, "errors": 0, "actor_rows": 60_000, "actors": [{"device": "cuda:0"}] * 2}
    gpu = dataclasses.replace(setup(tmp_path, dry_run=False), rows=60_000)
    assert checks("offline", offline, gpu) == []
    assert checks("offline", {**offline, "actor_rows": 59_000}, gpu) == [
        "the actor log holds 59000 rows of 60000: no steady rate"
    ]


def test_the_report_is_on_disk_after_every_step_so_a_step_that_fails_keeps_the_earlier_ones(tmp_path: Path) -> None:
    facts = {"date": "today", "gpu": "no GPU", "command": "python -m benchmarks.gpu_check", "torch": "x", "ray": "y"}
    seen: list[list[str]] = []

    results = {
        "precision": {
            "reviews": 8,
            "auto_outside_ray": {"device": "cpu", "dtype": "fp32"},
            "against_fp32": {"bf16": {"max_abs_dp": 0.001, "mean_abs_dp": 0.0005}},
        },
        "oom": {"injected": True, "splits": 2, "max_abs_dp": 0.0},
    }

    def run(name: str, setup: Setup) -> dict[str, Any]:
        seen.append([step["name"] for step in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]])
        if name == "model_only":
            raise RuntimeError("the card fell off the bus")
        return results[name]

    steps = run_steps(setup(tmp_path, dry_run=True), ["precision", "model_only", "oom"], facts, run=run)
    # Each step found the ones before it already written, the failed one included.
    assert seen == [[], ["precision"], ["precision", "model_only"]]
    written = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert [(step["name"], step["ok"]) for step in written] == [
        ("precision", True),
        ("model_only", False),
        ("oom", True),
    ]
    assert written[0]["result"] == results["precision"]
    assert written[1]["error"] == "RuntimeError: the card fell off the bus"
    assert [step.ok for step in steps] == [True, False, True]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| model_only | FAILED | RuntimeError: the card fell off the bus |" in table
    assert "| precision | bf16 vs fp32 (8 reviews) | max abs dp 0.0010, mean 0.00050 | <= 0.02 |" in table
    assert "steps done: precision ok, model_only FAILED, oom ok" in table


def test_a_step_child_that_fails_is_reported_with_its_last_line(tmp_path: Path) -> None:
    # No setup.json: the child fails at once, and says so.
    with pytest.raises(RuntimeError, match=r"exited with 1: FileNotFoundError: .*setup.json"):
        run_in_child("precision", setup(tmp_path, dry_run=True))
    assert (tmp_path / "step-precision.log").exists()
