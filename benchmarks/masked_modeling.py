"""Step time with the masked-modelling objectives (ITC + CMIM + CMLM) against ITC only, the trainer's own train_step
at TP2 x PP2 on CPU (4 gloo processes), and the planner's prediction.

    .venv/bin/python -m benchmarks.masked_modeling [--models tiny 0.4b] [--steps 6] [--json out.json]

Per preset, three settings alternate step by step in one process group (so all see the same machine load), each
with 2 micro-batches per step (GBA-ITC accumulation on, as in training) and synthetic data (uint8 images, random
tokens, the masks of data/masking.py's rates):
- off: ITC only (--cmlm-weight 0 --cmim-weight 0);
- on: ITC + CMIM + CMLM, the masked streams packed with the unmasked ones and each tower run once over both streams
  side by side along the batch (what the trainer does);
- on, 2 calls: the same, each tower called once per stream (the alternative to the batched call).
The median step time of each after one warm-up step is reported, with the ratio on / off and the planner's ratio of
the compute (arithmetic.model_flops_per_sample, GBA-ITC's extra forward included); then the planner's predicted step
time on / off for the 1b and 10b examples' layouts on H100s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

NUM_MICROBATCHES = 2
MICRO_BATCH = {"tiny": 8, "0.4b": 2}
SETTINGS = ("off", "on", "on, 2 calls")
OBJECTIVES = ["--cmlm-weight", "1", "--cmim-weight", "1"]


def _args(model: str, world: int, objectives: list[str], tp: int, pp: int, micro_batch: int, num_microbatches: int):
    from megatron_m2.config import load_config
    from megatron_m2.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(
        ["--model", model, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
         "--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch * num_microbatches),
         "--spec", "local", "--dry-run", *objectives])
    args.model_config = load_config(model)
    args.layout = validate_args(args, world_size=world)
    return args


def _two_calls(block, hidden, masked_hidden, mask):
    """M2PipelineStage._tower with one call per stream (the 'on, 2 calls' setting)."""
    return block(hidden, mask), (None if masked_hidden is None else block(masked_hidden, mask))


def time_steps(model: str, steps: int, tp: int = 2, pp: int = 2, micro_batch: int = 0,
               num_microbatches: int = NUM_MICROBATCHES) -> dict:
    """Runs on every rank of a pool of tp x pp processes; returns the median seconds per step of each setting
    (micro_batch 0: MICRO_BATCH[model]). benchmarks/objectives_demo.py times the demo's setting with it."""
    import torch.distributed as dist

    from megatron_m2 import parallel
    from megatron_m2.models import build_model
    from megatron_m2.models.m2_model import M2PipelineStage
    from megatron_m2.training.bench import synthetic_batches
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_step, step_config_from_args, train_step

    micro_batch = micro_batch or MICRO_BATCH[model]
    parallel.initialize_model_parallel(tp, pp)
    runs = {}
    for setting in ("off", "on"):  # "on, 2 calls" trains the "on" model (two 0.4b models per rank fit 2-core VMs)
        args = _args(model, dist.get_world_size(), [] if setting == "off" else OBJECTIVES, tp, pp, micro_batch,
                     num_microbatches)
        torch.manual_seed(0)
        stage = build_model(args.model_config, spec="local", cmlm=setting != "off", cmim=setting != "off")
        ddp = wrap_ddp(stage, args)
        optimizer, scheduler = build_optimizer(ddp, args)
        masks = {} if setting == "off" else dict(text_mask_prob=args.text_mask_prob,
                                                 image_mask_ratio=args.image_mask_ratio)
        count = num_microbatches * (steps + 1) * (1 if setting == "off" else 2)
        batches = synthetic_batches(args.model_config, micro_batch, count=count, image_dtype=torch.uint8,
                                    padding=True, **masks)
        runs[setting] = (ddp, optimizer, scheduler, step_config_from_args(args), iter(batches))
    runs["on, 2 calls"] = runs["on"]
    times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    tower = M2PipelineStage.__dict__["_tower"]  # the staticmethod object itself
    try:
        for step in range(steps + 1):  # 1 warm-up step
            for setting, (ddp, optimizer, scheduler, config, data) in runs.items():
                M2PipelineStage._tower = staticmethod(_two_calls) if setting == "on, 2 calls" else tower
                dist.barrier()
                start = time.perf_counter()
                train_step(forward_step, data, ddp, optimizer, scheduler, config)
                dist.barrier()
                if step:
                    times[setting].append(time.perf_counter() - start)
    finally:
        M2PipelineStage._tower = tower
    return {setting: statistics.median(values) for setting, values in times.items()}


def planner_ratios() -> dict:
    """The planner's step time on / off for the 1b and 10b examples' layouts (examples/pretrain_m2_{1b,10b}.sh)."""
    from megatron_m2 import planner
    from megatron_m2.arithmetic import MaskedPasses
    from megatron_m2.config import load_config

    out = {}
    for model, gpus, tp, pp, b, gb in (("1b", 8, 2, 1, 64, 8192), ("10b", 32, 8, 4, 8, 4096)):
        plans = [planner.plan_layout(load_config(model), gpus, tp, pp, 0, planner.Training(
            micro_batch_size=b, global_batch_size=gb, use_distributed_optimizer=True, masked=masked))
            for masked in (MaskedPasses(), MaskedPasses(True, True))]
        out[model] = dict(layout=f"{gpus} GPUs TP{tp} PP{pp}, micro-batch {b}, global {gb}",
                          off=plans[0].time["step"], on=plans[1].time["step"],
                          memory_off_gib=plans[0].memory["total"] / planner.GB,
                          memory_on_gib=plans[1].memory["total"] / planner.GB)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "0.4b"], choices=sorted(MICRO_BATCH))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting (after 1 warm-up step)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    from megatron_m2.arithmetic import MaskedPasses, model_flops_per_sample
    from megatron_m2.config import load_config
    from megatron_m2.testing import run_distributed, shutdown_pools

    results = {}
    try:
        for model in args.models:
            measured = run_distributed(4, time_steps, model, args.steps)[0]
            config = load_config(model)
            off = model_flops_per_sample(config)
            on = model_flops_per_sample(config, MaskedPasses(True, True))
            measured["ratio"] = measured["on"] / measured["off"]
            measured["planner_compute_ratio"] = (on + off / 3) / (off + off / 3)  # + GBA-ITC's ITC-only forward
            results[model] = measured
            print(f"{model} TP2 x PP2, {NUM_MICROBATCHES} micro-batches of {MICRO_BATCH[model]}: off "
                  f"{1000 * measured['off']:.0f} ms/step, on {1000 * measured['on']:.0f} ms/step (ratio "
                  f"{measured['ratio']:.2f}; planner's compute ratio {measured['planner_compute_ratio']:.2f}), "
                  f"on with 2 tower calls {1000 * measured['on, 2 calls']:.0f} ms/step", flush=True)
    finally:
        shutdown_pools()
    results["planner"] = planner_ratios()
    for model, plan in results["planner"].items():
        print(f"planner {model} ({plan['layout']}, H100): off {plan['off']:.2f} s/step, on {plan['on']:.2f} s/step "
              f"(ratio {plan['on'] / plan['off']:.2f}); memory {plan['memory_off_gib']:.1f} -> "
              f"{plan['memory_on_gib']:.1f} GiB on the fullest GPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
