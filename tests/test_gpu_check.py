"""benchmarks/gpu_check.sh (issue 15): the dry run on CPU end to end, the environment setup of the script, and the
logic that runs the parts and writes the JSON and the summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_every_part_is_recorded_and_one_failing_does_not_stop_the_others():
    calls, written = [], []

    def broken(ctx):
        calls.append("broken")
        raise RuntimeError("boom")

    def fine(ctx):
        calls.append("fine")
        return {"summary": "42 TFLOP/s", "checks": {"finite": gpu_check.check(True, [1.0], "finite", "losses")}}

    def off(ctx):
        calls.append("off")
        return {"summary": "rel 0.5", "checks": {"close": gpu_check.check(False, 0.5, 0.1, "loss difference"),
                                                 "finite": gpu_check.check(True, 1, "finite", "losses")}}

    def absent(ctx):
        calls.append("absent")
        raise gpu_check.Skip("no CUDA device")

    parts = [("broken", broken), ("fine", fine), ("off", off), ("absent", absent)]
    results = gpu_check.run_parts(parts, None, time.monotonic() + 600, on_result=lambda r: written.append(dict(r)))
    assert calls == ["broken", "fine", "off", "absent"]
    assert {name: r["status"] for name, r in results.items()} == {
        "broken": "error", "fine": "ok", "off": "failed", "absent": "skipped"}
    assert results["broken"]["error"] == "RuntimeError: boom" and 'raise RuntimeError("boom")' in results[
        "broken"]["traceback"]
    assert results["absent"]["reason"] == "no CUDA device" and results["fine"]["summary"] == "42 TFLOP/s"
    assert all(r["seconds"] >= 0 for r in results.values())
    assert [list(r) for r in written] == [["broken"], ["broken", "fine"], ["broken", "fine", "off"],
                                          list(results)]  # the JSON is rewritten after every part
    assert gpu_check.overall_status(results) == "failed"
    assert gpu_check.overall_status({k: results[k] for k in ("fine", "absent")}) == "ok"

    summary = gpu_check.format_summary({"parts": results, "dry_run": False, "status": "failed", "wall_s": 3.0,
                                        "environment": {"device": "NVIDIA H200"}})
    lines = summary.splitlines()
    assert lines[0] == "GPU check on NVIDIA H200: failed in 3 s"
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == ["broken", "fine", "off", "absent"]
    assert rows["broken"].split()[1] == "error" and rows["broken"].endswith("RuntimeError: boom")
    assert rows["off"].endswith("rel 0.5 [check failed: close]") and rows["fine"].endswith("42 TFLOP/s")
    assert rows["absent"].split()[1] == "skipped" and rows["absent"].endswith("no CUDA device")


def test_the_budget_skips_parts_that_no_longer_fit_and_stops_one_that_runs_over():
    deadline = time.monotonic() + gpu_check.GRACE_S + 1.5
    start = time.monotonic()
    results = gpu_check.run_parts([("sleeper", lambda ctx: time.sleep(60)), ("parity", lambda ctx: {})], None,
                                  deadline)
    assert time.monotonic() - start < 20
    assert results["sleeper"]["status"] == "error" and results["sleeper"]["error"].startswith("PartTimeout")
    assert results["parity"]["status"] == "skipped" and results["parity"]["reason"].startswith("time budget")


def test_compare_losses():
    cpu = {2: 3.5, 3: 3.25, 4: 3.0}
    same = gpu_check.compare_losses(cpu, {2: 3.5, 3: 3.25 * (1 + 5e-5), 4: 3.0}, 1e-4)
    assert same["passed"] and same["steps"] == [2, 3, 4] and same["max_rel_diff"] == pytest.approx(5e-5)
    assert not gpu_check.compare_losses(cpu, {2: 3.5, 3: 3.25 * (1 + 2e-4), 4: 3.0}, 1e-4)["passed"]
    assert not gpu_check.compare_losses(cpu, {2: 3.5, 3: 3.25}, 1e-4)["passed"]  # a step missing
    assert not gpu_check.compare_losses(cpu, {2: 3.5, 3: 3.25, 4: float("nan")}, 1e-4)["passed"]
    assert not gpu_check.compare_losses({}, {}, 1e-4)["passed"]


def test_the_speed_micro_batch_is_the_largest_the_planner_fits():
    from megatron_m2.config import load_config

    config = load_config("1b")
    limit = gpu_check.MEMORY_HEADROOM * gpu_check.GPU_MEMORY_GB * gpu_check.GIB
    plain, total = gpu_check.planned_micro_batch(config, recompute=False)
    assert total <= limit
    larger = gpu_check.MICRO_BATCH_CANDIDATES[gpu_check.MICRO_BATCH_CANDIDATES.index(plain) + 1]
    assert gpu_check.predicted_memory(config, larger, False, True)["total"] > limit
    recompute, _ = gpu_check.planned_micro_batch(config, recompute=True, cap=512)
    assert plain < recompute <= 512
    assert gpu_check.speed_plan(config, gpu_check.GPU_SETTINGS) == [(False, plain), (True, plain), (True, recompute)]
    # the dry run's tiny preset reaches the cap either way: the repeated run is dropped
    assert gpu_check.speed_plan(load_config("tiny"), gpu_check.DRY_RUN_SETTINGS) == [(False, 16), (True, 16)]


def _fake_wheel(directory: Path, name: str, files: dict[str, str]) -> None:
    with zipfile.ZipFile(directory / f"{name}-0.0-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_the_script_installs_only_missing_modules_from_the_carried_wheels(tmp_path):
    # an interpreter without site-packages (python -S), like the GPU machine without megatron-core, and without pip:
    # the script unpacks the wheels into M2_SITE and puts it on PYTHONPATH
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    env = dict(os.environ, PYTHON=str(python), M2_WHEELS=str(wheels), M2_SITE=str(site), OUT=str(tmp_path / "out"))
    env.pop("PYTHONPATH", None)

    def script() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    missing = script()
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "megatron_core is not installed and no megatron_core wheel is in" in missing.stderr
    _fake_wheel(wheels, "megatron_core", {"megatron/core/__init__.py": ""})
    _fake_wheel(wheels, "braceexpand", {"braceexpand.py": ""})
    _fake_wheel(wheels, "psutil", {"psutil/__init__.py": ""})
    first = script()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing into" in first.stdout and "usage: python -m benchmarks.gpu_check" in first.stdout
    assert (site / "megatron" / "core" / "__init__.py").exists() and (site / "braceexpand.py").exists()
    again = script()  # the next call finds them on PYTHONPATH: nothing to install
    assert again.returncode == 0 and "installing" not in again.stdout, again.stdout + again.stderr


@pytest.mark.slow  # about 1.5 CPU-minutes: two trainer processes, small models, the ITC loss (5 min on a busy machine)
def test_dry_run_passes_every_part_it_can_on_cpu(demo_data, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--data-dir", str(demo_data),
                             "--budget-s", "1500"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["status"] == "ok" and report["environment"]["device"] == "cpu"
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    for name in ("parity", "itc", "bf16", "speed", "memory"):
        assert parts[name]["status"] == "ok", parts[name]
        assert all(c["passed"] for c in parts[name]["checks"].values()), parts[name]["checks"]
    assert parts["profile"]["status"] == "skipped" and parts["profile"]["reason"].startswith("dry run")

    parity = parts["parity"]["comparison"]
    assert parity["passed"] and parity["steps"] == [2, 3, 4, 5, 6] and parity["max_rel_diff"] <= 1e-4
    assert parts["parity"]["devices"] == ["cpu", "cpu"]
    comparisons = parts["parity"]["comparisons"]  # the trainer runs M2's full objective: all three losses compared
    assert sorted(comparisons) == ["cmim_loss", "cmlm_loss", "itc_loss"] and all(
        c["passed"] and c["steps"] == [2, 3, 4, 5, 6] for c in comparisons.values())
    itc = parts["itc"]["rows"]
    assert {(r["dtype"], r["rows"], r["chunk"]) for r in itc} == {
        (d, b, c) for d in ("bfloat16", "float32") for b in (128, 512) for c in (None, 64)}
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in itc)
    assert len(parts["itc"]["checks"]) == 4
    bf16 = parts["bf16"]
    assert bf16["note"].startswith("dry run") and len(bf16["presets"]["tiny"]["float32"]) == 2
    runs = parts["speed"]["runs"]
    assert [(r["recompute"], r["micro_batch"]) for r in runs] == [(False, 16), (True, 16)]
    for run in runs:
        assert run["median_step_s"] > 0 and run["model_tflops"] > 0 and len(run["step_s"]) == 2
        assert run["hardware_tflops"] == pytest.approx(run["model_tflops"] * (4 / 3 if run["recompute"] else 1))
        assert run["mfu"] == pytest.approx(run["model_tflops"] / 790)
    assert [r["predicted_without_reserve_gib"] > 0 for r in parts["memory"]["rows"]] == [True, True]
    table = result.stdout[result.stdout.index("GPU check (dry run, CPU) on cpu: ok"):]
    for name in gpu_check.PARTS:
        assert f"\n{name} " in table
