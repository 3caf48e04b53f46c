"""How many pairs and negatives each contrastive loss of a step scores: one count for the trainer's start line,
--dry-run and tools/plan.py (no torch here, so the planner can import it).

The three --itc-batch-accumulation modes (loss.py's docstring gives their formulas):
- exact: one loss over the step's M micro-batches: g x M x b pairs per ITC group, each row against the other
  g M b - 1 pairs' features;
- memory: one loss per micro-batch: g x b pairs; micro-batch m's rows also score against the detached features of
  the step's m - 1 earlier micro-batches, so from g b - 1 (the first) up to g M b - 1 (the last) negatives per row;
- off: one loss per micro-batch, g x b pairs, g b - 1 negatives per row.
--itc-queue-size K adds K queued negatives (earlier steps' features) to every row in every mode, once the queue has
filled (it starts empty).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_m2.errors import ConfigError

ACCUMULATION_MODES = ("exact", "memory", "off")


@dataclass(frozen=True)
class ContrastiveBatch:
    mode: str
    pairs: int  # positives each loss scores, per ITC group (the rows of one loss over the group)
    negatives: int  # in-step negatives per row (memory: of the step's first micro-batch)
    max_negatives: int  # memory: of the step's last micro-batch; the same as `negatives` otherwise
    queued: int  # --itc-queue-size: negatives from earlier steps, once the queue is full
    per_microbatch: bool  # one loss per micro-batch (memory, off) rather than one per step

    def describe(self) -> str:
        """e.g. '256 pairs per ITC group, 255 negatives per row (+ 4096 queued)'."""
        text = f"{self.pairs} pairs per ITC group"
        if self.max_negatives != self.negatives:
            text += (f" per micro-batch, {self.negatives} to {self.max_negatives} negatives per row (the step's "
                     "earlier micro-batches' features, detached)")
        else:
            text += f", {self.negatives} negatives per row"
        if self.queued:
            text += f" (+ {self.queued} queued)"
        return text


def contrastive_batch(itc_group_size: int, micro_batch_size: int, num_microbatches: int, mode: str = "exact",
                      queue_size: int = 0) -> ContrastiveBatch:
    """The contrastive batch of a step of `num_microbatches` micro-batches of `micro_batch_size` per DP rank."""
    if mode not in ACCUMULATION_MODES:
        raise ValueError(f"unknown --itc-batch-accumulation mode {mode!r}: one of {ACCUMULATION_MODES}")
    g, b, m = itc_group_size, micro_batch_size, num_microbatches
    if mode == "exact" or m == 1:
        return ContrastiveBatch(mode, g * m * b, g * m * b - 1, g * m * b - 1, queue_size, False)
    if mode == "memory":
        return ContrastiveBatch(mode, g * b, g * b - 1, g * m * b - 1, queue_size, True)
    return ContrastiveBatch(mode, g * b, g * b - 1, g * b - 1, queue_size, True)


def describe_mode(mode: str, num_microbatches: int, queue_size: int = 0, momentum_towers: float = 0.0) -> str:
    """How a step forms its contrastive batch, in words: the training start line, --dry-run and tools/plan.py."""
    how = ("one micro-batch per step" if num_microbatches == 1 else
           f"batch accumulation over {num_microbatches} micro-batches, one extra forward" if mode == "exact" else
           "one loss per micro-batch, the step's earlier micro-batches' features as detached negatives "
           "(--itc-batch-accumulation memory)" if mode == "memory" else
           "one loss per micro-batch (--itc-batch-accumulation off)")
    if queue_size:
        how += f"; a queue of {queue_size} earlier pairs per ITC group, " + (
            f"encoded by momentum towers (EMA {momentum_towers:g}): one more forward-only pass and a copy of the model"
            if momentum_towers else "the online model's features")
    return how


def add_negatives_arguments(g) -> None:
    """--itc-batch-accumulation MODE, --itc-queue-size, --momentum-towers (the trainer's and tools/plan.py's)."""
    g.add_argument("--itc-batch-accumulation", nargs="?", const="exact", default="exact", choices=ACCUMULATION_MODES,
                   help="how a step with several micro-batches forms its contrastive batch (GBA-ITC). exact: one "
                   "loss over ALL micro-batches of a step, so each ITC group scores itc-group-size x "
                   "global-batch-size / DP pairs against each other (the global batch with the default group), at "
                   "the cost of one extra forward pass (the bare flag means exact); memory: the paper's GBA-ITC "
                   "figure (panel c): one loss per micro-batch whose negatives also include the DETACHED group "
                   "features of the step's earlier micro-batches, no extra forward; off: one loss per micro-batch "
                   "(itc-group-size x micro-batch-size pairs)")
    g.add_argument("--no-itc-batch-accumulation", dest="itc_batch_accumulation", action="store_const", const="off",
                   help="the same as --itc-batch-accumulation off")
    g.add_argument("--itc-queue-size", type=int, default=0,
                   help="a FIFO of the detached features of the last K pairs of EARLIER steps, per ITC group, added "
                   "to every contrastive loss's negatives in both directions (a memory bank; with "
                   "--momentum-towers BriVL's / MoCo's queue). Filled at the end of each applied step, held in the "
                   "checkpoint; 0 = off")
    g.add_argument("--momentum-towers", type=float, default=0.0,
                   help="BriVL / MoCo: keep an EMA copy of the whole model (theta_m = M theta_m + (1 - M) theta after "
                   "each applied step, e.g. 0.995) and fill the --itc-queue-size queue with ITS features of each "
                   "step's batches (one extra forward-only pass) instead of the online ones; needs "
                   "--itc-queue-size > 0. 0 = off")


def check_negatives_arguments(args: argparse.Namespace) -> None:
    if args.itc_queue_size < 0:
        raise ConfigError(f"--itc-queue-size must be >= 0 (0 = no queue), got {args.itc_queue_size}")
    if not 0.0 <= args.momentum_towers < 1.0:
        raise ConfigError(f"--momentum-towers must be in [0, 1) (an EMA coefficient such as 0.995; 0 = off), got "
                          f"{args.momentum_towers}")
    if args.momentum_towers and not args.itc_queue_size:
        raise ConfigError("--momentum-towers encodes the negatives of the --itc-queue-size queue: it needs "
                          "--itc-queue-size > 0 (e.g. --itc-queue-size 4096), or drop --momentum-towers")
