"""Which way of forming the contrastive batch wins on the digits demo at equal wall time? GBA-ITC exact, memory,
off, and off + a queue filled by momentum towers (BriVL / MoCo), each trained with the demo's flags for as many steps
as exact's --iters steps take, then evaluated (zero-shot en/zh, retrieval, fine-grained).

    .venv/bin/python -m benchmarks.negatives_demo [--output-dir runs/negatives] [--iters 300] [--seeds 1234]

The step-time ratios come first, the settings alternating step by step in one process (benchmarks/
batch_accumulation.py's timing at the demo's micro-batching: 4 micro-batches of 32, TP1 x PP1, synthetic data), so
all see the same machine load; each setting then trains round(iters x exact / setting) steps with its own full
learning-rate schedule. One process per run (TP1 x PP1, --nproc for more). The queue holds 512 pairs (4 steps of
128): the demo's training set has 3,476 pairs (1,438 train digits and 300 composites, each captioned once in English
and once in Chinese), so a queue of 4,096 would hold every image at least twice, each row's own image among its
"negatives".
Prints a table (mean over seeds) and writes it with every run's numbers to OUTPUT_DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.demo_training import mean_table, train_and_evaluate

QUEUE = 512
SETTINGS = {
    "exact": ["--itc-batch-accumulation", "exact"],
    "memory": ["--itc-batch-accumulation", "memory"],
    "off": ["--itc-batch-accumulation", "off"],
    "off+queue+momentum": ["--itc-batch-accumulation", "off", "--itc-queue-size", str(QUEUE),
                           "--momentum-towers", "0.99"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/negatives", help="data, runs and results.json go here")
    parser.add_argument("--iters", type=int, default=300, help="steps of the exact run (the demo's 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234], help="one set of runs per seed")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (1 = TP1 x PP1, no torchrun)")
    parser.add_argument("--timing-steps", type=int, default=6, help="interleaved timed steps per setting")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    from benchmarks.batch_accumulation import time_steps
    from megatron_m2.demo import prepare
    from megatron_m2.testing import run_distributed, shutdown_pools

    out = Path(args.output_dir)
    prepare(out)
    settings = list(dict.fromkeys(["exact", *args.settings]))
    try:
        timing = run_distributed(1, time_steps, 1, 1, args.timing_steps, settings, 32, 4, SETTINGS)[0]
    finally:
        shutdown_pools()
    steps = {name: max(1, round(args.iters * timing["exact"] / timing[name])) for name in settings}
    print("step time, interleaved: " + ", ".join(f"{name} {1000 * timing[name]:.0f} ms ({steps[name]} steps)"
                                                 for name in settings), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for seed in args.seeds:
        for name in settings:
            result = train_and_evaluate(out, out, f"{name}-{seed}", steps[name], seed, args.nproc, SETTINGS[name])
            runs[name].append(dict(seed=seed, **result))
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
    table = mean_table(runs, "setting", ("iterations", "ms_per_step", "wall_s"))
    (out / "results.json").write_text(json.dumps({"mean": table, "runs": runs, "seeds": args.seeds,
                                                  "timing": timing, "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
