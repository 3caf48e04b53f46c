"""--rampup-batch-size end to end: the per-step global batches follow megatron-core's calculator, the learning-rate
schedule counts samples, and a run stopped mid-ramp resumes on the same batches, learning rates and losses.

One rank (CPU, on the worker pool), the tiny preset on the digits data, micro-batches of 4: the ramp 4 -> 16 by 4
over 24 samples (8 samples per increment) gives the global batches 4, 4, 8, 12, then 16 (6 steps for 60 samples).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_m2.testing import run_trainer

pytestmark = pytest.mark.slow

BATCHES = [4, 4, 8, 12, 16, 16]
WARMUP_SAMPLES, PEAK_LR = 16, 5e-4


def _train(data: Path, run_dir: Path, *extra: str) -> str:
    argv = ["--model", "tiny", "--micro-batch-size", "4", "--global-batch-size", "16", "--train-samples", "60",
            "--rampup-batch-size", "4", "4", "24", "--lr", str(PEAK_LR), "--lr-warmup-samples", str(WARMUP_SAMPLES),
            "--log-interval", "1", "--seed", "5", "--num-workers", "0", "--data-path", str(data / "data" / "train"),
            "--tokenizer-model", str(data / "tokenizer.model"), "--metrics-file", str(run_dir / "metrics.jsonl"),
            *extra]
    result = run_trainer(1, argv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _steps(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["iteration"]: r for r in records if r["kind"] == "train"}


def test_ramp_up_batches_schedule_and_resume_mid_ramp(demo_data, tmp_path):
    straight, split, ckpt = tmp_path / "straight", tmp_path / "split", tmp_path / "ckpt"
    straight.mkdir()
    split.mkdir()
    log = _train(demo_data, straight)
    steps = _steps(straight)
    assert sorted(steps) == list(range(1, len(BATCHES) + 1))
    consumed = [sum(BATCHES[:i + 1]) for i in range(len(BATCHES))]
    assert [steps[i + 1]["consumed_samples"] for i in range(len(BATCHES))] == consumed
    assert "global batch 4 = 1 micro-batches of 4" in log and "contrastive batch 4 pairs" in log
    assert "ramping up the global batch from 8 to 12 samples at 16 consumed samples (contrastive batch 12 pairs" \
        in log, log[-3000:]
    # the schedule counts samples: linear warmup over the first 16 samples
    for i in range(3):
        assert steps[i + 1]["lr"] == pytest.approx(PEAK_LR * consumed[i] / WARMUP_SAMPLES), i

    # stop mid-ramp (after the first step of 8), resume: the same batches, learning rates and losses
    _train(demo_data, split, "--save", str(ckpt), "--load", str(ckpt), "--exit-interval", "3")
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(ckpt / "iter_0000003"))
    assert common["consumed_train_samples"] == consumed[2]
    resumed_log = _train(demo_data, split, "--save", str(ckpt), "--load", str(ckpt))
    assert "resumed from" in resumed_log
    resumed = _steps(split)
    assert sorted(resumed) == sorted(steps)
    for iteration, want in steps.items():
        got = resumed[iteration]
        assert got["consumed_samples"] == want["consumed_samples"], iteration
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), iteration
        assert got["itc_loss"] == pytest.approx(want["itc_loss"], rel=1e-5, abs=1e-6), iteration
