"""Does M2's full objective help at the demo's scale? ITC only against ITC + CMIM + CMLM on the digits demo data,
at equal iterations and at equal wall time: zero-shot, retrieval and the fine-grained retrieval.

    .venv/bin/python -m benchmarks.objectives_demo [--output-dir runs/objectives] [--iters 300] [--seeds 7 8]

Per seed, three trainings of the tiny preset with the demo's flags (examples/pretrain_m2_tiny.sh: micro-batch 32,
global batch 128, lr 1e-3, 20 warm-up steps, no flip; one process by default, --nproc for more), each evaluated at its
end on the held-out digits (zero-shot en/zh, retrieval, fine-grained: composites against hard negatives that swap
positions or counts, chance 50%):
1. ITC only, --iters steps;
2. ITC + CMIM + CMLM (--cmim-weight / --cmlm-weight, 1 each by default), --iters steps (equal iterations);
3. the same objective for as many steps as fit in run 1's training time, with its own full learning-rate schedule
   (equal wall time). The time ratio is measured first, the two settings alternating step by step in one process
   (benchmarks/masked_modeling.py's timing at the demo's micro-batching, synthetic data): two runs timed one after
   the other on a shared machine can see different loads (we saw the ITC run slower per step than the full one).
Prints a table (mean over seeds) and writes it with every run's numbers to OUTPUT_DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.demo_training import mean_table, train_and_evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/objectives", help="data, runs and results.json go here")
    parser.add_argument("--iters", type=int, default=300, help="steps of the equal-iterations runs (the demo's 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234],
                        help="one set of three runs per seed (1234: the demo's, so run 1 is the demo's training)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (1 = TP1 x PP1, no torchrun)")
    parser.add_argument("--cmlm-weight", default="1", help="beta of the full objective")
    parser.add_argument("--cmim-weight", default="1", help="alpha of the full objective")
    parser.add_argument("--timing-steps", type=int, default=8,
                        help="interleaved steps per setting that measure the step-time ratio")
    args = parser.parse_args(argv)
    from megatron_m2.demo import prepare

    out = Path(args.output_dir)
    prepare(out)
    objectives = ["--cmlm-weight", args.cmlm_weight, "--cmim-weight", args.cmim_weight]
    from benchmarks.masked_modeling import time_steps
    from megatron_m2.testing import run_distributed, shutdown_pools

    try:  # the demo's micro-batching at TP1 x PP1: 4 micro-batches of 32
        timing = run_distributed(1, time_steps, "tiny", args.timing_steps, 1, 1, 32, 4)[0]
    finally:
        shutdown_pools()
    ratio = timing["on"] / timing["off"]
    iters = max(1, round(args.iters / ratio))
    print(f"step time, interleaved: ITC only {1000 * timing['off']:.0f} ms, full {1000 * timing['on']:.0f} ms "
          f"(x{ratio:.2f}): equal wall time = {iters} steps of the full objective", flush=True)
    runs: dict[str, list[dict]] = {"itc": [], "full, equal iterations": [], "full, equal wall time": []}
    for seed in args.seeds:
        itc = train_and_evaluate(out, out, f"itc-{seed}", args.iters, seed, args.nproc, [])
        full = train_and_evaluate(out, out, f"full-{seed}", args.iters, seed, args.nproc, objectives)
        equal_time = train_and_evaluate(out, out, f"full-{iters}-{seed}", iters, seed, args.nproc, objectives)
        for name, result in zip(runs, (itc, full, equal_time)):
            runs[name].append(dict(seed=seed, **result))
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
    table = mean_table(runs, "run", ("iterations", "ms_per_step"))
    (out / "results.json").write_text(json.dumps({"mean": table, "runs": runs, "seeds": args.seeds,
                                                  "timing": timing, "equal_time_steps": iters}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
