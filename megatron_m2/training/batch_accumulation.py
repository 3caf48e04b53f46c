"""GBA-ITC's batch accumulation: one contrastive loss over every micro-batch of a step, exact, on megatron's schedules.

megatron-core's 1F1B schedule runs each micro-batch's backward before later micro-batches exist, so a loss that
couples all of them needs the embedding-gradient cache of BASIC / GradCache:

1. `embed_microbatches`: megatron's forward-only schedule over the step's micro-batches, without autograd; the last
   stage keeps only the embeddings ([M x b, out_dim] per modality).
2. `itc_gradients`: the grouped ITC loss over all of them (gathered in the ITC group, chunked if asked) and its
   gradient with respect to the embeddings and the logit scale.
3. the normal forward-backward schedule with `surrogate_loss` per micro-batch: <embeddings, cached gradient> (+ the
   logit-scale term). Its gradient with respect to every parameter equals the full loss's, because the embeddings of
   pass 3 equal those of pass 1 (same weights, same micro-batches, no dropout) and the loss enters only through them.

Scaling (M micro-batches): megatron's schedule divides each returned loss by M and sums the micro-batches, so the
surrogate returns M * <e_m, g_m> + s * ds: the sum over m of (<e_m, g_m> + s * ds / M) has gradient sum_m g_m de_m
+ ds, i.e. exactly the pass-1 loss's. The loss's own DP/ITC scaling is untouched (see loss.py): each rank's rows
carry the gradient `itc_loss` gives them, and DDP's average over DP does the rest, as without accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_m2.loss import itc_loss


@dataclass
class CachedGradient:
    """What pass 3 needs for one micro-batch on the last stage: d loss / d embeddings and the logit-scale share."""

    image: torch.Tensor  # [b, out_dim], float32
    text: torch.Tensor
    logit_scale: torch.Tensor  # 0-dim: d loss / d logit_scale for the whole step
    num_microbatches: int


def embed_microbatches(forward_step_func: Callable, batches: list[dict], model: torch.nn.Module, seq_length: int,
                       micro_batch_size: int) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Pass 1: (image_embeds, text_embeds) per micro-batch on the last stage (None elsewhere), no autograd graph.

    The model stays in training mode, so pass 3 computes the same function of the same inputs.
    """
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=True, collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [(image.detach(), text.detach()) for image, text in outputs]


def itc_gradients(embeddings: list[tuple[torch.Tensor, torch.Tensor]], logit_scale: torch.Tensor,
                  group: Optional[dist.ProcessGroup], chunk_size: Optional[int], timers=None,
                  negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None, gathered_out: Optional[list] = None
                  ) -> tuple[dict[str, torch.Tensor], list[CachedGradient]]:
    """Pass 2: the ITC loss over all micro-batches of this rank (and of its ITC group) and its cached gradients.

    float32 whatever the model's dtype: the logits of a large contrastive batch need it, and the embeddings are small.
    The logit scale is a detached copy, so no gradient reaches the parameter (and DDP's hooks) before pass 3.
    timers: megatron-core Timers for the loss's gather (loss.py), or None.
    negatives, gathered_out: loss.itc_loss's (the --itc-queue-size queue's detached columns; the gathered group
    features, for the queue).
    """
    sizes = [image.shape[0] for image, _ in embeddings]
    image = torch.cat([image for image, _ in embeddings]).float().requires_grad_(True)
    text = torch.cat([text for _, text in embeddings]).float().requires_grad_(True)
    scale = logit_scale.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, metrics = itc_loss(image, text, scale, group=group, chunk_size=chunk_size, timers=timers,
                                 negatives=negatives, gathered_out=gathered_out)
        loss.backward()
    cached = [CachedGradient(grad_image, grad_text, scale.grad, len(sizes))
              for grad_image, grad_text in zip(image.grad.split(sizes), text.grad.split(sizes))]
    return metrics, cached


def surrogate_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                   cached: CachedGradient) -> torch.Tensor:
    """Pass 3, one micro-batch: a scalar whose parameter gradients, summed by the schedule, equal the full loss's."""
    embedding_term = (image_embeds.float() * cached.image).sum() + (text_embeds.float() * cached.text).sum()
    return embedding_term * cached.num_microbatches + logit_scale.float() * cached.logit_scale
