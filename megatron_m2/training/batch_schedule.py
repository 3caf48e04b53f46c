"""The global batch of every step, as Megatron-LM sets it: megatron-core's num_microbatches_calculator, the
batch-size ramp-up (--rampup-batch-size) and sample-based training (--train-samples).

- The calculator is process-global (megatron.core.num_microbatches_calculator): `configure_microbatches` sets it
  before the model is built (Megatron-LM does it in its initialisation, right after the flags); the loop calls
  `update_num_microbatches(consumed_samples)` before every step, and get_num_microbatches() /
  get_current_global_batch_size() say what the step runs. The data loader yields micro-batches, so a step simply
  reads as many as it has, and GBA-ITC's contrastive batch is all of them: it follows the ramp.
- The ramp needs sample-based training, as in Megatron-LM: the run's length and its learning-rate schedule are in
  samples (--train-samples, --lr-warmup-samples, --lr-decay-samples); the iterations follow from the ramp
  (`iterations_for_samples`, Megatron-LM's update_train_iters).
- The learning-rate schedule (megatron-core's OptimizerParamScheduler) counts samples in sample-based training (it
  steps by the step's global batch) and iterations otherwise (it steps by 1). Megatron-LM counts samples in both;
  with a constant batch its iteration-based schedule is ours scaled by the batch size, the same learning rates, and
  checkpoints of earlier runs keep their iteration-counted schedule.
"""
from __future__ import annotations

import argparse
import os

from megatron_m2.errors import ConfigError
from megatron_m2.parallel import Layout

DEFAULT_TRAIN_ITERS = 100
DEFAULT_LR_WARMUP_ITERS = 10


def ramp_batch_sizes(rampup: list[int], global_batch_size: int) -> list[int]:
    """The global batch sizes a ramp goes through: start, start + increment, ..., global_batch_size."""
    start, increment, _ = rampup
    return list(range(start, global_batch_size + 1, increment))


def check_rampup(rampup: list[int], global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> None:
    """What megatron-core's calculator would assert (or divide by zero on), as ConfigErrors before any allocation."""
    start, increment, samples = rampup
    flag = f"--rampup-batch-size {start} {increment} {samples}"
    if start < 1 or increment < 1 or samples < 0:
        raise ConfigError(f"{flag}: the start batch size and the increment must be >= 1 and the ramp-up samples >= 0")
    if start >= global_batch_size:
        raise ConfigError(f"{flag}: the start batch size must be smaller than --global-batch-size "
                          f"{global_batch_size} (without a ramp, drop the flag)")
    if (global_batch_size - start) % increment:
        raise ConfigError(f"{flag}: --global-batch-size {global_batch_size} - start {start} = "
                          f"{global_batch_size - start} is not a multiple of the increment {increment}")
    per_step = micro_batch_size * data_parallel_size
    bad = [size for size in ramp_batch_sizes(rampup, global_batch_size) if size % per_step]
    if bad:
        raise ConfigError(f"{flag}: the global batch sizes {bad} of the ramp are not multiples of --micro-batch-size "
                          f"{micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}; choose a "
                          "start and an increment that are")


def iterations_for_samples(train_samples: int, global_batch_size: int, micro_batch_size: int,
                           data_parallel_size: int, rampup: list[int] | None) -> int:
    """Steps of a sample-based run (Megatron-LM's update_train_iters): the ramp's steps, then full batches (a last
    partial batch is dropped)."""
    if rampup is None:
        return train_samples // global_batch_size
    # imported here: validating the flags (and --dry-run, --help) should not pay for importing megatron-core
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    calculator = RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size, False, -1, *rampup)  # rank -1: no log lines
    iterations = consumed = 0
    while consumed <= rampup[2] and consumed <= train_samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // global_batch_size
    return iterations


def resolve_training_length(args: argparse.Namespace, layout: Layout) -> None:
    """Iteration- or sample-based training (exclusive, as in Megatron-LM); sets args.train_iters either way."""
    if args.train_samples is None:
        if args.rampup_batch_size is not None:
            raise ConfigError("--rampup-batch-size needs sample-based training, as in Megatron-LM: give "
                              "--train-samples (and --lr-warmup-samples / --lr-decay-samples) instead of "
                              "--train-iters")
        if args.lr_warmup_samples or args.lr_decay_samples is not None:
            raise ConfigError("--lr-warmup-samples and --lr-decay-samples go with --train-samples; with "
                              "--train-iters use --lr-warmup-iters and --lr-decay-iters")
        if args.train_iters is None:
            args.train_iters = DEFAULT_TRAIN_ITERS
        if args.lr_warmup_iters is None:
            args.lr_warmup_iters = DEFAULT_LR_WARMUP_ITERS
        return
    if args.train_iters is not None:
        raise ConfigError("--train-iters and --train-samples exclude each other (iteration- or sample-based training)")
    if args.lr_warmup_iters is not None or args.lr_decay_iters is not None:
        raise ConfigError("with --train-samples the schedule counts samples: use --lr-warmup-samples and "
                          "--lr-decay-samples instead of --lr-warmup-iters / --lr-decay-iters")
    if args.lr_warmup_samples < 0 or (args.lr_decay_samples is not None and args.lr_decay_samples < 1):
        raise ConfigError("--lr-warmup-samples must be >= 0 and --lr-decay-samples >= 1")
    if args.rampup_batch_size is not None:
        check_rampup(args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
                     layout.data_parallel_size)
    args.train_iters = iterations_for_samples(args.train_samples, args.global_batch_size, args.micro_batch_size,
                                              layout.data_parallel_size, args.rampup_batch_size)
    if args.train_iters < 1:
        raise ConfigError(f"--train-samples {args.train_samples} is less than one global batch "
                          f"({args.global_batch_size})")
    args.lr_warmup_iters, args.lr_decay_iters = 0, args.train_iters  # unused: the schedule counts samples


def configure_microbatches(args: argparse.Namespace, layout: Layout) -> None:
    """Set megatron-core's global calculator from the flags (replacing an earlier one: tools and tests validate
    several flag sets in one process)."""
    from megatron.core.num_microbatches_calculator import reconfigure_num_microbatches_calculator

    reconfigure_num_microbatches_calculator(int(os.environ.get("RANK", "0")), args.rampup_batch_size,
                                            args.global_batch_size, args.micro_batch_size, layout.data_parallel_size)


def samples_based(args: argparse.Namespace) -> bool:
    return args.train_samples is not None


def scheduler_increment(args: argparse.Namespace, global_batch_size: int) -> int:
    """What one step adds to the learning-rate schedule's count: its samples, or 1 (see the module docstring)."""
    return global_batch_size if samples_based(args) else 1
