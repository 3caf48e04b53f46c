"""A decode-bound training step, --num-workers 0 vs 2: the trainer itself (python -m megatron_m2.train, one process).

    .venv/bin/python -m benchmarks.decode_bound_step [--repeats 3] [--shard-dir /tmp/m2-bench-shards]

The tiny preset (32 px images) at micro-batch 64 on 500x375 JPEG shards (benchmarks/data_loader.py writes them): the
model's step is small next to decoding 64 JPEGs, so the step time is the data path's. Runs alternate between the two
settings so both see the same machine load; reported: the median of iterations 3-10 of every run.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ITERATION_MS = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")


def run(workers: int, shard_dir: str, tokenizer: str) -> list[float]:
    cmd = [sys.executable, "-m", "megatron_m2.train", "--model", "tiny", "--micro-batch-size", "64",
           "--global-batch-size", "64", "--train-iters", "10", "--log-interval", "1", "--seed", "1", "--lr", "1e-4",
           "--lr-warmup-iters", "1", "--data-path", shard_dir, "--tokenizer-model", tokenizer,
           "--num-workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    return [float(ms) for ms in ITERATION_MS.findall(out)][2:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per setting")
    p.add_argument("--shard-dir", default="/tmp/m2-bench-shards", help="JPEG shards (benchmarks/data_loader.py)")
    p.add_argument("--tokenizer-dir", default="/tmp/m2-decode-bound", help="where the demo's tokenizer is made")
    args = p.parse_args(argv)
    if not list(Path(args.shard_dir).glob("*.tar")):
        from benchmarks.data_loader import make_shards

        make_shards(Path(args.shard_dir), 1536, 256)
    tokenizer = Path(args.tokenizer_dir) / "tokenizer.model"
    if not tokenizer.exists():
        from megatron_m2.demo import prepare

        prepare(Path(args.tokenizer_dir))
    times: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(args.repeats):
        for workers in times:
            times[workers] += run(workers, args.shard_dir, str(tokenizer))
    medians = {w: statistics.median(t) for w, t in times.items()}
    for workers, median in medians.items():
        print(f"--num-workers {workers}: {median:.0f} ms per step (median of {len(times[workers])} iterations)")
    print(f"speed-up with 2 workers: {medians[0] / medians[2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
