"""Step time of the ways to form the contrastive batch, the trainer's own train_step on CPU (gloo).

    .venv/bin/python -m benchmarks.batch_accumulation [--steps 10] [--json out.json] [--layouts tp1]

Settings: --itc-batch-accumulation exact (GBA-ITC's two-pass method), memory (the paper's feature memory), off;
off + --itc-queue-size 4096; off + the queue + --momentum-towers 0.995 (BriVL / MoCo). Two layouts of the tiny preset,
4 micro-batches per step each: TP1 x PP1 (1 process, micro-batch 8) and TP2 x PP2 (4 processes, micro-batch 8). The
settings alternate step by step in one process group, so all see the same machine load; the median step time of each
is reported with its ratio to off and the planner's prediction (exact and momentum: 1 + 1/3, one extra forward of
the three forward units of forward + backward; memory and the queue: ~1). Synthetic data (uint8 images, random
tokens): the data path is not part of the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch

MICRO_BATCH, NUM_MICROBATCHES = 8, 4
QUEUE = 4096
SETTINGS = {  # name: flags, the planner's predicted ratio to off
    "exact": (["--itc-batch-accumulation", "exact"], 4 / 3),
    "memory": (["--itc-batch-accumulation", "memory"], 1.0),
    "off": (["--itc-batch-accumulation", "off"], 1.0),
    "off+queue": (["--itc-batch-accumulation", "off", "--itc-queue-size", str(QUEUE)], 1.0),
    "off+queue+momentum": (["--itc-batch-accumulation", "off", "--itc-queue-size", str(QUEUE), "--momentum-towers",
                            "0.995"], 4 / 3),
}


def _args(tp: int, pp: int, world: int, extra: list[str], micro_batch: int = MICRO_BATCH,
          num_microbatches: int = NUM_MICROBATCHES):
    from megatron_m2.config import load_config
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.batch_schedule import configure_microbatches

    flags = ["--model", "tiny", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch * num_microbatches),
             "--dry-run", *extra]
    args = build_parser().parse_args(flags)
    args.model_config = load_config("tiny")
    args.layout = validate_args(args, world_size=world)
    configure_microbatches(args, args.layout)
    return args


def _batches(config, seed: int, micro_batch: int = MICRO_BATCH):
    g = torch.Generator().manual_seed(seed)
    while True:
        lengths = torch.randint(3, config.max_text_length + 1, (micro_batch,), generator=g)
        yield dict(
            images=torch.randint(0, 256, (micro_batch, config.num_channels, config.image_size, config.image_size),
                                 dtype=torch.uint8, generator=g),
            text_ids=torch.randint(0, config.vocab_size, (micro_batch, config.max_text_length), generator=g),
            text_padding_mask=torch.arange(config.max_text_length)[None, :] >= lengths[:, None])


def time_steps(tp: int, pp: int, steps: int, settings: list[str], micro_batch: int = MICRO_BATCH,
               num_microbatches: int = NUM_MICROBATCHES, flags: Optional[dict[str, list[str]]] = None) -> dict:
    """Runs on every rank of a pool; returns median seconds per step of each setting (its flags from `flags`, else
    SETTINGS)."""
    import torch.distributed as dist

    from megatron_m2 import parallel
    from megatron_m2.models import build_model
    from megatron_m2.training.negatives import build_negatives_state
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_step, step_config_from_args, train_step

    world = dist.get_world_size()
    parallel.initialize_model_parallel(tp, pp)
    runs = {}
    for name in settings:
        args = _args(tp, pp, world, (flags or {}).get(name, SETTINGS.get(name, ([],))[0]), micro_batch,
                     num_microbatches)
        torch.manual_seed(0)
        model = build_model(args.model_config, spec="local")
        negatives = build_negatives_state(args, model, lambda: build_model(args.model_config, spec="local"))
        ddp = wrap_ddp(model, args)
        optimizer, scheduler = build_optimizer(ddp, args)
        runs[name] = (ddp, optimizer, scheduler, step_config_from_args(args),
                      _batches(args.model_config, 0, micro_batch),
                      negatives)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for step in range(steps + 2):  # 2 warm-up steps
        for name, (ddp, optimizer, scheduler, config, data, negatives) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            train_step(forward_step, data, ddp, optimizer, scheduler, config, negatives=negatives)
            dist.barrier()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (after 2 warm-up steps)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--layouts", nargs="+", default=["tp1", "tp2pp2"], choices=["tp1", "tp2pp2"],
                        help="which layouts to time")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="which settings to time (off is always timed: the ratios are to it)")
    args = parser.parse_args(argv)
    settings = list(dict.fromkeys(["off", *args.settings]))
    from megatron_m2.testing import run_distributed, shutdown_pools

    results = {}
    layouts = {"tp1": ("TP1 x PP1", 1, 1, 1), "tp2pp2": ("TP2 x PP2", 4, 2, 2)}
    try:
        for name, world, tp, pp in (layouts[key] for key in args.layouts):
            measured = run_distributed(world, time_steps, tp, pp, args.steps, settings)[0]
            results[name] = {setting: dict(seconds=seconds, ratio=seconds / measured["off"],
                                           planner=SETTINGS[setting][1]) for setting, seconds in measured.items()}
            print(f"tiny {name}, {NUM_MICROBATCHES} micro-batches of {MICRO_BATCH}: " + "; ".join(
                f"{setting} {1000 * r['seconds']:.0f} ms/step (x{r['ratio']:.2f}, planner x{r['planner']:.2f})"
                for setting, r in results[name].items()), flush=True)
    finally:
        shutdown_pools()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
