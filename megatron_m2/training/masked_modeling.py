"""The masked-modelling objectives (CMLM, CMIM) in the training step: from a step's batches to the loss term each
micro-batch adds to its ITC loss (or GBA-ITC surrogate), and the metrics the step logs.

The masks come with the batches (data/masking.py); the model's decoders predict (models/decoders.py); the losses and
why their scaling gives the gradient of the step's per-token mean are in megatron_m2/masked_loss.py. Here:
- `step_scale`: before the schedule runs, the step's masked token and patch counts summed over DP (one all-reduce on
  the last stage) give each objective's per-micro-batch factor weight x M x DP / N; it rides in every micro-batch.
- `masked_modeling_loss`: in the loss function, the weighted sum of this micro-batch's terms, and the metrics as
  (sum, count) pairs that `step.reduce_metrics` adds up over micro-batches and DP before dividing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASK_KEYS, MASKED_TEXT_IDS, TEXT_TARGETS
from megatron_m2.data.transforms import normalize
from megatron_m2.masked_loss import cmim_loss_sum, cmlm_loss_sum, loss_scale, patch_targets
from megatron_m2.models.decoders import MaskedInputs, MaskedPredictions

LOSS_SCALE = "masked_loss_scale"  # batch key of the step's MaskedLossScale


@dataclass(frozen=True)
class MaskedModeling:
    """The objectives' weights (--cmlm-weight beta, --cmim-weight alpha); 0 = off (no decoder, no masked stream)."""

    cmlm_weight: float = 0.0
    cmim_weight: float = 0.0

    @property
    def cmlm(self) -> bool:
        return self.cmlm_weight > 0

    @property
    def cmim(self) -> bool:
        return self.cmim_weight > 0

    @property
    def active(self) -> bool:
        return self.cmlm or self.cmim


@dataclass(frozen=True)
class MaskedLossScale:
    """Per step: what each micro-batch's summed CMLM / CMIM loss is multiplied by (weight x M x DP / N)."""

    cmlm: float
    cmim: float


def masked_inputs(batch: dict) -> Optional[MaskedInputs]:
    """The model's masked-stream inputs of a batch, or None if it carries no masks (ITC-only, evaluation, pass 1)."""
    if not any(key in batch for key in MASK_KEYS):
        return None
    return MaskedInputs(text_ids=batch.get(MASKED_TEXT_IDS), text_targets=batch.get(TEXT_TARGETS),
                        image_patches=batch.get(IMAGE_PATCH_MASK))


def without_masks(batch: dict) -> dict:
    """The batch as the ITC-only passes see it (GBA-ITC's forward-only pass 1 runs no masked stream)."""
    return {key: value for key, value in batch.items() if key not in MASK_KEYS and key != LOSS_SCALE}


def step_scale(batches: list[dict], objectives: MaskedModeling, data_parallel_group: dist.ProcessGroup
               ) -> MaskedLossScale:
    """The step's scale from its micro-batches' masks (collective over the data-parallel group: call it on the
    ranks that compute the loss, the last pipeline stage)."""
    counts = torch.zeros(2, dtype=torch.float64, device=batches[0]["text_ids"].device)
    for batch in batches:  # on the device: one synchronisation for the step, at tolist()
        if objectives.cmlm:
            counts[0] += batch[TEXT_TARGETS].sum()
        if objectives.cmim:
            counts[1] += batch[IMAGE_PATCH_MASK].sum()
    dp = dist.get_world_size(data_parallel_group)
    if dp > 1:
        dist.all_reduce(counts, group=data_parallel_group)
    tokens, patches = (int(c) for c in counts.tolist())
    m = len(batches)
    return MaskedLossScale(cmlm=loss_scale(objectives.cmlm_weight, m, dp, tokens),
                           cmim=loss_scale(objectives.cmim_weight, m, dp, patches))


def masked_modeling_loss(predictions: MaskedPredictions, batch: dict, patch_size: int
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's term of the step's loss (float32) and its metrics: cmlm_loss / cmim_loss as [sum, count]."""
    scale: MaskedLossScale = batch[LOSS_SCALE]
    total = torch.zeros((), dtype=torch.float32, device=batch["text_ids"].device)
    metrics: dict[str, torch.Tensor] = {}
    if predictions.cmlm_logits is not None:
        targets = batch[TEXT_TARGETS]
        loss = cmlm_loss_sum(predictions.cmlm_logits, batch["text_ids"][targets])
        total = total + scale.cmlm * loss
        metrics["cmlm_loss"] = torch.stack([loss.detach(), targets.sum().to(loss)])
    if predictions.cmim_pixels is not None:
        patches = batch[IMAGE_PATCH_MASK]
        images = batch["images"]
        images = images if images.is_floating_point() else normalize(images)
        loss = cmim_loss_sum(predictions.cmim_pixels, patch_targets(images, patch_size)[patches])
        total = total + scale.cmim * loss
        metrics["cmim_loss"] = torch.stack([loss.detach(), patches.sum().to(loss)])
    return total, metrics
