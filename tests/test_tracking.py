"""What researchers reach for during a run: Weights & Biases logging (offline here) and the step-range profiler.

End to end on the tiny preset (one process): a run logs to wandb and profiles two steps, stops at iteration 3, and
its resume continues the same wandb run; the profiler's trace holds the step's named phases.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_m2.errors import ConfigError
from megatron_m2.training.profiling import PHASES


def wandb_records(path: str) -> list:
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf records: a 7-byte file header,
    32 KiB blocks, each record chunk with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 /
    LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the padded end of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_history(run_dir: Path) -> tuple[set, dict, list]:
    """(run ids, config, history rows in order) of every offline run under run_dir."""
    ids, config, rows = set(), {}, []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return ids, config, rows


def _train(demo_data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [sys.executable, "-m", "megatron_m2.train", "--model", "tiny", "--micro-batch-size", "8",
           "--global-batch-size", "16", "--train-iters", "6", "--lr-warmup-iters", "2", "--log-interval", "1",
           "--seed", "3", "--num-workers", "0", "--no-hflip", "--data-path", str(demo_data / "data" / "train"),
           "--tokenizer-model", str(demo_data / "tokenizer.model"), "--save", str(run_dir / "ckpt"),
           "--load", str(run_dir / "ckpt"),
           "--metrics-file", str(run_dir / "metrics.jsonl"), "--tensorboard-dir", str(run_dir / "tb"),
           "--wandb-project", "m2-test", "--wandb-exp-name", "tiny", "--wandb-save-dir", str(run_dir), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow  # two short training runs in a subprocess (~40 s on 2 cores)
def test_wandb_logs_the_scalars_resumes_the_run_and_the_profiler_traces_the_phases(demo_data, tmp_path):
    first = _train(demo_data, tmp_path, "--exit-interval", "3", "--profile", "--profile-step-start", "1",
                   "--profile-step-end", "3", "--randaugment", "2", "7", "--min-caption-chars", "2")
    assert "wrote the profile of iterations 2-3" in first.stdout
    _train(demo_data, tmp_path)

    ids, config, rows = wandb_history(tmp_path)
    assert len(ids) == 1  # the resume continued the same run
    assert config["wandb_project"] == "m2-test" and config["global_batch_size"] == 16
    assert config["model_config"]["hidden_size"] > 0
    train_rows = [row for row in rows if "itc-loss" in row]
    assert [row["_step"] for row in train_rows] == [1, 2, 3, 4, 5, 6]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {m["iteration"]: m["itc_loss"] for m in metrics if m["kind"] == "train"}
    assert {row["_step"]: row["itc-loss"] for row in train_rows} == pytest.approx(losses, rel=1e-6)
    assert {"learning-rate", "grad-norm", "batch-size", "consumed-samples", "iteration-time"} <= set(train_rows[0])
    assert train_rows[-1]["consumed-samples"] == 6 * 16

    traces = glob.glob(str(tmp_path / "tb" / "rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(Path(traces[0]).read_text())["traceEvents"]
    names = [event.get("name") for event in events]
    for name in PHASES:  # two micro-batches per step: GBA-ITC's extra forward and loss run too
        assert names.count(name) == 2, (name, names.count(name))


def _args(*flags):
    from megatron_m2.config import load_config
    from megatron_m2.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(["--data-path", "x", "--tokenizer-model", "y", *flags])
    args.model_config = load_config(args.model)
    validate_args(args, world_size=4)
    return args


def test_tracking_flags_are_checked_before_anything_is_built(monkeypatch):
    with pytest.raises(ConfigError, match="--wandb-exp-name needs --wandb-project"):
        _args("--wandb-exp-name", "x")
    with pytest.raises(ConfigError, match="--tensorboard-dir"):
        _args("--profile")
    with pytest.raises(ConfigError, match="--profile-step-start 5 must be"):
        _args("--profile", "--tensorboard-dir", "tb", "--profile-step-start", "5", "--profile-step-end", "5")
    with pytest.raises(ConfigError, match=r"--profile-ranks \[4\]"):
        _args("--profile", "--tensorboard-dir", "tb", "--profile-ranks", "0", "4")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"megatron-m2\[wandb\]"):
        _args("--wandb-project", "p")


def test_the_package_imports_without_wandb():
    code = ("import sys; sys.modules['wandb'] = None\n"  # any `import wandb` now fails
            "import megatron_m2.training.loop, megatron_m2.training.progress, megatron_m2.train\n"
            "from megatron_m2.training.progress import MetricsLogger\n"
            "MetricsLogger(None, 1, 1.0, 1, False).close()\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
