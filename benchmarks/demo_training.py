"""One training of the tiny preset on the digits demo data with the demo's flags, evaluated at its end: what the
demo-scale comparisons (benchmarks/objectives_demo.py, benchmarks/negatives_demo.py) run per setting."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("en/top1", "zh/top1", "retrieval/t2i_R@1", "retrieval/i2t_R@1", "retrieval/MR", "fine/en/position",
           "fine/zh/position", "fine/en/count", "fine/zh/count", "fine/mean")


def train_and_evaluate(out: Path, data: Path, run: str, iters: int, seed: int, nproc: int, flags: list[str]) -> dict:
    """Train `iters` steps with examples/pretrain_m2_tiny.sh's flags (micro-batch 32, global batch 128, lr 1e-3,
    20 warm-up steps, its templates) plus `flags`, in OUT/RUN; one process, or `nproc` under torchrun. Returns the
    final evaluation (zero-shot, retrieval, fine-grained), the median ms per step and the wall time."""
    run_dir = out / run
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                   if nproc > 1 else [])
    d = data / "data"
    cmd = [*launcher, "-m", "megatron_m2.train", "--model", "tiny", "--micro-batch-size", "32",
           "--global-batch-size", "128", "--train-iters", str(iters), "--lr", "1e-3", "--min-lr", "1e-5",
           "--lr-warmup-iters", "20", "--weight-decay", "0.05", "--clip-grad", "1.0", "--no-hflip", "--seed", str(seed),
           "--data-path", str(d / "train"), "--tokenizer-model", str(data / "tokenizer.model"),
           "--eval-interval", str(iters), "--eval-batch-size", "128", "--zeroshot-data", str(d / "eval"),
           "--zeroshot-classnames", f"en={d / 'classnames_en.txt'}", f"zh={d / 'classnames_zh.txt'}",
           "--zeroshot-templates", f"en={d / 'templates_en.txt'}", f"zh={d / 'templates_zh.txt'}",
           "--retrieval-data", str(d / "retrieval.jsonl"), "--fine-grained-data", str(d / "fine_grained.jsonl"),
           "--log-interval", "10", "--metrics-file", str(run_dir / "metrics.jsonl"), *flags]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{run} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    step_ms = [float(m) for m in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", result.stdout)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    final = [r for r in records if r["kind"] == "eval"][-1]
    return dict(iterations=iters, ms_per_step=statistics.median(step_ms[1:] or step_ms),
                wall_s=time.perf_counter() - start, **{k: final[k] for k in METRICS if k in final})


COLUMNS = {"iterations": ("steps", "{:.0f}"), "ms_per_step": ("ms/step", "{:.0f}"), "wall_s": ("wall s", "{:.0f}")}


def mean_table(runs: dict[str, list[dict]], label: str, columns: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per setting, the mean over seeds of `columns` (keys of COLUMNS) and of the METRICS every run has; printed as
    a markdown table whose first column is `label`."""
    table = {name: {key: statistics.mean(r[key] for r in results) for key in (*columns, *METRICS)
                    if all(key in r for r in results)} for name, results in runs.items()}
    header = f"| {label} | {' | '.join(COLUMNS[c][0] for c in columns)} | {' | '.join(METRICS)} |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(COLUMNS[c][1].format(row[c]) for c in columns) + " | "
              + " | ".join(f"{row[k]:.1f}" for k in METRICS if k in row) + " |")
    return table
