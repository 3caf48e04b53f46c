"""Step time with GBA-ITC batch accumulation on vs off, the trainer's own train_step on CPU (gloo).

    .venv/bin/python -m benchmarks.batch_accumulation [--steps 10] [--json out.json]

Two layouts of the tiny preset, 4 micro-batches per step each: TP1 x PP1 (1 process, micro-batch 8) and TP2 x PP2
(4 processes, micro-batch 8). On and off alternate step by step in one process group, so both see the same machine
load; the median step time of each is reported with the ratio and the planner's prediction (1 + 1/3: one extra
forward of the three forward units of forward + backward). Synthetic data (uint8 images, random tokens): the
data path is not part of the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

MICRO_BATCH, NUM_MICROBATCHES = 8, 4


def _args(tp: int, pp: int, world: int, accumulate: bool):
    from megatron_m2.config import load_config
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.batch_schedule import configure_microbatches

    flags = ["--model", "tiny", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(MICRO_BATCH * NUM_MICROBATCHES),
             "--dry-run", "--itc-batch-accumulation" if accumulate else "--no-itc-batch-accumulation"]
    args = build_parser().parse_args(flags)
    args.model_config = load_config("tiny")
    args.layout = validate_args(args, world_size=world)
    configure_microbatches(args, args.layout)
    return args


def _batches(config, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        lengths = torch.randint(3, config.max_text_length + 1, (MICRO_BATCH,), generator=g)
        yield dict(
            images=torch.randint(0, 256, (MICRO_BATCH, config.num_channels, config.image_size, config.image_size),
                                 dtype=torch.uint8, generator=g),
            text_ids=torch.randint(0, config.vocab_size, (MICRO_BATCH, config.max_text_length), generator=g),
            text_padding_mask=torch.arange(config.max_text_length)[None, :] >= lengths[:, None])


def time_steps(tp: int, pp: int, steps: int) -> dict:
    """Runs on every rank of a pool; returns median seconds per step, on and off."""
    import torch.distributed as dist

    from megatron_m2 import parallel
    from megatron_m2.models import build_model
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_step, step_config_from_args, train_step

    world = dist.get_world_size()
    parallel.initialize_model_parallel(tp, pp)
    runs = {}
    for accumulate in (True, False):
        args = _args(tp, pp, world, accumulate)
        torch.manual_seed(0)
        model = build_model(args.model_config, spec="local")
        ddp = wrap_ddp(model, args)
        optimizer, scheduler = build_optimizer(ddp, args)
        runs[accumulate] = (ddp, optimizer, scheduler, step_config_from_args(args), _batches(args.model_config, 0))
    times: dict[bool, list[float]] = {True: [], False: []}
    for step in range(steps + 2):  # 2 warm-up steps
        for accumulate, (ddp, optimizer, scheduler, config, data) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            train_step(forward_step, data, ddp, optimizer, scheduler, config)
            dist.barrier()
            if step >= 2:
                times[accumulate].append(time.perf_counter() - start)
    return {"on": statistics.median(times[True]), "off": statistics.median(times[False])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 2 warm-up steps)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    from megatron_m2.testing import run_distributed, shutdown_pools

    results = {}
    try:
        for name, world, tp, pp in (("TP1 x PP1", 1, 1, 1), ("TP2 x PP2", 4, 2, 2)):
            measured = run_distributed(world, time_steps, tp, pp, args.steps)[0]
            measured["ratio"] = measured["on"] / measured["off"]
            results[name] = measured
            print(f"tiny {name}, {NUM_MICROBATCHES} micro-batches of {MICRO_BATCH}: accumulation on "
                  f"{1000 * measured['on']:.0f} ms/step, off {1000 * measured['off']:.0f} ms/step, ratio "
                  f"{measured['ratio']:.2f} (planner: {4 / 3:.2f})", flush=True)
    finally:
        shutdown_pools()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
