"""Where a step's time goes, as Megatron-LM reports it: megatron-core's Timers (--timing-log-level,
--timing-log-option) and its straggler detector (--log-straggler).

Timers: megatron-core's schedules, DDP and optimizer already time their phases through the model config's `timers`
(forward-backward, forward-compute, backward-compute, the pipeline's send/recv, all-grads-sync, the optimizer's
parts); the step adds batch-generator (the data wait), optimizer, and GBA-ITC's itc-embeddings-forward (pass 1),
itc-loss (pass 2) and itc-gather. Level 0 builds no Timers at all, so it costs nothing; levels 1 and 2 synchronise
the device at every timer (and, with the default --barrier-with-L1-time, put a barrier around the level-1 ones).
Printing is collective (one all-gather over the world): every rank calls `log_timers` at the same iterations.

Straggler detector: megatron-core's StragglerDetector times each forward with CUDA events, the data wait with the
host clock, and reads power, temperature, utilisation and clock through NVML; rank 0 logs the slowest and fastest
ranks every --log-interval. It needs CUDA: on CPU megatron-core leaves it off (its start/stop do nothing, and the
report is one broadcast of its on/off state), which the trainer says at startup.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.timers import Timers
from megatron.core.utils import StragglerDetector

from megatron_m2.parallel import is_logging_rank, print_rank_0

# Megatron-LM's list (training_log), in megatron-core 0.16.1's names, then ours. A fixed list: the ranks must ask
# for the same names, whatever each one timed (a timer a rank never started counts as absent there).
TIMERS_TO_LOG = [
    "forward-backward", "forward-compute", "backward-compute", "batch-generator",
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
    "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
    "non-tensor-parallel-grads-all-reduce", "embedding-grads-all-reduce", "all-grads-sync", "params-all-gather",
    "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad",
    "optimizer-count-zeros", "optimizer-inner-step", "optimizer-copy-main-to-model-params", "optimizer",
    "itc-embeddings-forward", "itc-loss", "itc-gather",
]


def attach_timers(model: torch.nn.Module, args: argparse.Namespace) -> Optional[Timers]:
    """megatron-core Timers on the model config, where the schedules, DDP, the optimizer and the step look for them;
    None at --timing-log-level 0."""
    timers = Timers(args.timing_log_level, args.timing_log_option) if args.timing_log_level > 0 else None
    model.config.timers = timers
    model.config.barrier_with_L1_time = args.barrier_with_L1_time
    return timers


def log_timers(timers: Optional[Timers], iterations: int) -> None:
    """Print the timers' per-iteration times (ms) over the last `iterations` steps and reset them. Collective."""
    if timers is None or iterations < 1:
        return
    text = timers.get_all_timers_string(TIMERS_TO_LOG, normalizer=iterations)
    if is_logging_rank() and text is not None:
        print(text, flush=True)


def start_straggler_detector(args: argparse.Namespace) -> Optional[StragglerDetector]:
    """megatron-core's StragglerDetector as Megatron-LM configures it; None without --log-straggler."""
    if not args.log_straggler:
        return None
    detector = StragglerDetector()
    detector.configure(dist.get_world_size(), dist.get_rank(), mmcnt=args.straggler_minmax_count,
                       enabled=not args.disable_straggler_on_startup, port=args.straggler_ctrlr_port)
    if not torch.cuda.is_available():
        print_rank_0("--log-straggler: the straggler detector times CUDA events and reads NVML; without CUDA "
                     "megatron-core keeps it off")
    elif dist.get_rank() == 0:
        # megatron-core logs the report through its module logger, at INFO
        report_logger = logging.getLogger("megatron.core.utils")
        report_logger.setLevel(logging.INFO)
        if not report_logger.handlers:
            report_logger.addHandler(logging.StreamHandler(sys.stdout))
    return detector


def report_stragglers(detector: Optional[StragglerDetector], flops: float, iterations: int) -> None:
    """Rank 0 logs the min/max ranks of the last `iterations` steps (`flops`: the model FLOPs they did, all ranks
    together). Collective: every rank calls it at the same iterations."""
    if detector is not None and iterations > 0:
        detector.report(flops, iterations)
