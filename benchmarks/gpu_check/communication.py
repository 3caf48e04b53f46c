"""The communication flags of a 10B layout, on the device: each must leave the numbers as they are.

- overlap: --overlap-grad-reduce, and on CUDA --overlap-param-gather with --use-distributed-optimizer, in bf16 (the
  10B example's setting): the trainer's step (bench.build_training) from the same weights on the same batches gives
  the losses it gives without them. One GPU means DP 1, so the collectives are trivial; what runs is megatron's
  bucketed hooks, the pre-forward parameter gather and their interplay with GBA-ITC's forward-only pass.
- sequence_parallel: the trainer at TP 2, float32, with and without --sequence-parallel, on the digits data: the same
  per-step losses. TP 2 needs two devices: skipped on a one-GPU machine (the CPU suite proves the gradients equal,
  tests/test_communication_flags.py); the dry run does it on CPU with gloo.
"""
from __future__ import annotations

import os

from benchmarks.gpu_check.context import Context, _trainer_losses
from benchmarks.gpu_check.runner import check, compare_losses

OVERLAP_RTOL = 1e-5  # DP 1: the same arithmetic, only the time of the (trivial) reductions differs
SEQUENCE_PARALLEL_RTOL = 1e-4  # float32; the TP reductions sum in another order
SEQUENCE_PARALLEL_STEPS = 3


def _overlap(ctx: Context) -> tuple[dict, dict]:
    import torch

    from megatron_m2.config import load_config
    from megatron_m2.training.bench import build_training, synthetic_batches, trainer_args

    s = ctx.settings
    preset, micro_batch, bf16 = s.bf16_presets[0], s.bf16_micro_batch, s.low_precision
    # two micro-batches per step: GBA-ITC's forward-only pass runs before the overlapped backward
    batches = synthetic_batches(load_config(preset), micro_batch, count=2 * s.bf16_steps, device=ctx.device, seed=2,
                                image_dtype=torch.uint8, padding=True)
    flags = ["--overlap-grad-reduce"] + ["--overlap-param-gather"] * ctx.cuda  # the latter: distributed optimizer

    def train(extra: list[str], state=None) -> tuple[list[float], dict]:
        ctx.ensure_parallel()
        torch.manual_seed(0)
        pieces = build_training(trainer_args(preset, micro_batch, 2 * micro_batch, bf16=bf16,
                                             use_distributed_optimizer=ctx.cuda, extra=extra), state_dict=state)
        weights = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                   for k, v in pieces.model.state_dict().items()}
        losses = [pieces.step(iter(batches[2 * i:2 * i + 2]))["itc_loss"] for i in range(s.bf16_steps)]
        del pieces
        ctx.cleanup()
        return losses, weights

    plain, weights = train([])
    overlapped, _ = train(flags, weights)
    result = compare_losses(dict(enumerate(plain, 1)), dict(enumerate(overlapped, 1)), OVERLAP_RTOL)
    entry = {"preset": preset, "flags": flags, "precision": "bfloat16" if bf16 else "float32",
             "distributed_optimizer": ctx.cuda, "plain": plain, "overlapped": overlapped, "comparison": result}
    return entry, {"overlap_same_losses": check(result["passed"], result["max_rel_diff"], OVERLAP_RTOL,
                                                f"{' '.join(flags)} against without, per-step loss")}


def _sequence_parallel(ctx: Context) -> tuple[dict, dict]:
    import torch

    if ctx.cuda and torch.cuda.device_count() < 2:
        return {"skipped": f"TP 2 needs two GPUs, this machine has {torch.cuda.device_count()}"}, {}
    data, root = ctx.data_dir(), ctx.work_dir / "sequence_parallel"
    flags = ["--model", "tiny", "--spec", "local", "--tensor-model-parallel-size", "2", "--micro-batch-size", "8",
             "--global-batch-size", "16", "--train-iters", str(SEQUENCE_PARALLEL_STEPS), "--lr", "2e-3",
             "--lr-warmup-iters", "1", "--log-interval", "1", "--seed", "7", "--num-workers", "0",
             "--data-path", str(data / "data" / "train"), "--tokenizer-model", str(data / "tokenizer.model")]
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", OMP_NUM_THREADS="1")
    runs = [ctx.start_trainer(root / name, flags + extra, env, nproc=2)
            for name, extra in (("tp2", []), ("tp2_sequence_parallel", ["--sequence-parallel"]))]
    ctx.wait_trainers(runs)
    plain, split = (_trainer_losses(run_dir / "metrics.jsonl") for _, run_dir, _ in runs)
    result = compare_losses(plain, split, SEQUENCE_PARALLEL_RTOL)
    expected = list(range(1, SEQUENCE_PARALLEL_STEPS + 1))
    entry = {"layout": "TP 2", "precision": "float32", "plain": plain, "sequence_parallel": split,
             "comparison": result}
    return entry, {"sequence_parallel_same_losses": check(
        result["passed"] and result["steps"] == expected, result["max_rel_diff"], SEQUENCE_PARALLEL_RTOL,
        "--sequence-parallel against TP 2 without it, per-step loss")}


def part_communication(ctx: Context) -> dict:
    overlap, checks = _overlap(ctx)
    sequence_parallel, more = _sequence_parallel(ctx)
    checks.update(more)
    summary = [f"overlap rel diff {overlap['comparison']['max_rel_diff']:.1e}"]
    summary.append(sequence_parallel.get("skipped") or
                   f"sequence parallel rel diff {sequence_parallel['comparison']['max_rel_diff']:.1e}")
    return {"summary": "; ".join(summary), "overlap": overlap, "sequence_parallel": sequence_parallel,
            "checks": checks}
