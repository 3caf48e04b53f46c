"""A step-range profiler, as Megatron-LM's --profile with --use-pytorch-profiler: torch.profiler over a few steps on
chosen ranks, one Chrome/Perfetto trace per profiled rank under --tensorboard-dir, where TensorBoard's profile plugin
finds it (`rank<R>.<time>.pt.trace.json`; open it in Perfetto, chrome://tracing or `tensorboard --logdir`).

The step marks its phases with `phase(name)` (a torch.profiler.record_function range, nearly free when no profiler
runs): PHASES lists them.
"""
from __future__ import annotations

from typing import Optional

import torch

# The named ranges of one training step (training/step.py, training/batch_accumulation.py).
DATA_WAIT = "m2/data-wait"  # reading the step's micro-batches and moving them to the device
PASS1_FORWARD = "m2/pass1-forward"  # GBA-ITC batch accumulation: the forward-only pass for the embeddings
ITC_LOSS = "m2/itc-loss"  # the grouped contrastive loss (with the ITC gather)
FORWARD_BACKWARD = "m2/pass2-forward-backward"  # megatron's forward-backward schedule
OPTIMIZER = "m2/optimizer"  # the optimizer step (gradient clipping included)
# --momentum-towers: the EMA model's forward-only pass (not in PHASES: a default run has none)
MOMENTUM_FORWARD = "m2/momentum-forward"
PHASES = (DATA_WAIT, PASS1_FORWARD, ITC_LOSS, FORWARD_BACKWARD, OPTIMIZER)


def phase(name: str):
    """A named range in the profiler's trace (a no-op context when profiling is off)."""
    return torch.profiler.record_function(name)


class StepProfiler:
    """Profiles the steps logged as iterations start+1 .. end on the ranks in `ranks`, as Megatron-LM counts them
    (completed iterations): the trace starts before the step that follows `start` completed iterations and stops
    after the step that completes `end`.
    """

    def __init__(self, start: int, end: int, ranks: list[int], rank: int, trace_dir: str) -> None:
        self.start, self.end = start, end
        self.enabled = rank in ranks
        self.rank, self.trace_dir = rank, trace_dir
        self._profiler: Optional[torch.profiler.profile] = None

    def before_step(self, completed: int) -> None:
        if self.enabled and self._profiler is None and self.start <= completed < self.end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir,
                                                                        worker_name=f"rank{self.rank}"))
            self._profiler.start()

    def after_step(self, completed: int) -> None:
        if completed >= self.end:
            self.stop()

    def stop(self) -> None:
        """Writes the trace (also when training ends before `end`)."""
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.stop()
            print(f"[rank {self.rank}] wrote the profile of iterations {self.start + 1}-{self.end} to "
                  f"{self.trace_dir}", flush=True)


def build_profiler(args, rank: int) -> Optional[StepProfiler]:
    """The profiler the flags ask for (--profile ...), or None."""
    if not args.profile:
        return None
    return StepProfiler(args.profile_step_start, args.profile_step_end, args.profile_ranks, rank,
                        args.tensorboard_dir)
