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

from dataclasses import dataclass

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
