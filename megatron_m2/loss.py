"""Grouped-aggregation image-text contrastive (ITC) loss: symmetric InfoNCE with a learnable temperature.

Features are all-gathered inside the ITC group that the caller hands in (a sub-group of `--itc-group-size`
data-parallel ranks, built by `parallel.initialize_model_parallel`; TP peers are never in the same group, so nothing
is gathered twice). This module looks up no global state. Rank r of a
group of g ranks with b rows each owns rows r*b..(r+1)*b-1 of the (g*b x g*b) group logits; positives are the
diagonal of the group batch.

Why the gradient scaling is right (notation: N = g*b, x_s = the features of rank s, l_r = this module's loss on rank
r = mean over its b rows of (CE_i2t + CE_t2i)/2):
  * The CLIP loss of group G is L_G = (1/N) sum over its N rows = (1/g) sum_{r in G} l_r.
  * The gather is megatron-core's gather_from_sequence_parallel_region over the ITC group: all-gather along dim 0,
    its backward a SUM reduce-scatter, so the feature gradient that rank s backpropagates into its model is
    grad_s = sum_{r in G} dl_r/dx_s = g * dL_G/dx_s.
  * megatron-core's DDP averages parameter gradients over the DP group (1/DP), so the update is
    (1/DP) sum_s grad_s dx_s/dtheta = d/dtheta [(1/DP) sum_r l_r] = d/dtheta [mean over groups of L_G].
    With one group (g = DP) that is exactly the CLIP loss of the global batch; the pipeline schedule's
    1/num_microbatches then averages micro-batches on top, as for any loss.
  * logit_scale is replicated: each rank's local gradient is dl_r/ds and DDP's mean gives d(mean_r l_r)/ds.
So every rank returns its own l_r; nothing is rescaled here. With local_loss=False (open_clip's default) every rank
builds the full N x N logits and returns L_G; its gradient through the gather is again g * dL_G/dx_s, so both modes
train identically and differ only in cost.

Negatives beyond the step's pairs (`negatives`, training/negatives.py): detached (image, text) feature columns appended
to the group's columns in both directions: an i2t row scores against the group's texts + the negative texts, a t2i
row against the group's images + the negative images; the positives stay the diagonal of the group batch. They carry
no gradient, so the argument above holds unchanged: the loss of rank r is still a function of the gathered group
features (and the scale) alone, each row's softmax just has more terms in its denominator. What the trainer passes,
per --itc-batch-accumulation mode (x_m = micro-batch m's group features, b rows per rank, g ranks, M micro-batches,
Q = the --itc-queue-size queue of earlier steps' features, sg = stop-gradient):
  * exact (GBA-ITC, batch_accumulation.py): one loss over the step, rows and positives = all M x g x b pairs,
    columns = [x_1..x_M (with gradient); sg(Q)]: (g M b - 1) + |Q| negatives per row;
  * memory (the paper's GBA-ITC figure, panel c): micro-batch m's loss, rows and positives = x_m's g x b pairs,
    columns = [x_m (with gradient); sg(x_1..x_{m-1}); sg(Q)]: (g b - 1) + (m - 1) g b + |Q| negatives per row; the
    schedule averages the M losses (1/M, as for any loss). No extra forward: the earlier micro-batches' features are
    the ones their own losses gathered;
  * off: micro-batch m's loss with columns [x_m; sg(Q)]: (g b - 1) + |Q| negatives per row.
Gradients flow into x_m (exact: all x) through the gather's reduce-scatter exactly as without negatives; with
--momentum-towers Q holds the momentum (EMA) towers' features (BriVL / MoCo), still detached.

`chunk_size` bounds the logit memory (Inf-CL style): the logsumexp of each local row over the gathered columns is
computed chunk by chunk with an online logsumexp, and the backward recomputes each chunk's logits, so the extra memory
is O(b x chunk) instead of O(b x N), with the same loss and gradients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_m2.errors import ConfigError

MAX_LOG_SCALE = math.log(100.0)

# Bytes this process sent by the ITC gather (forward + backward), as a ring collective moves them: the benchmark reads
# and resets it. Counted, not measured here: each ring step of an all-gather / reduce-scatter sends 1/g of the
# tensor, (g-1) steps in all (the benchmark checks it against the bytes gloo's sockets actually wrote).
comm_bytes_sent = 0


def _account(numel: int, element_size: int, group_size: int) -> None:
    global comm_bytes_sent
    comm_bytes_sent += (group_size - 1) * numel * element_size


def _gather_rows(local: torch.Tensor, group: dist.ProcessGroup, timers=None) -> torch.Tensor:
    """All-gather along dim 0 in `group`; the backward is a SUM reduce-scatter. Counts both directions in
    `comm_bytes_sent`. On CPU this relies on parallel.initialize_distributed's patches of megatron's mappings (their
    buffers on the CPU, and a reduce-scatter that moves a ring's bytes over gloo)."""
    size = dist.get_world_size(group)
    if timers is not None:
        timers("itc-gather", log_level=2).start()
    gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=group)
    if timers is not None:
        timers("itc-gather").stop()
    _account(local.numel(), local.element_size(), size)
    if gathered.requires_grad:
        gathered.register_hook(lambda grad: _account(grad.numel() // size, grad.element_size(), size))
    return gathered


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp_j(scale * rows_i . cols_j) over column chunks, and the argmax over j (for the accuracy metric,
    not differentiable); the backward recomputes each chunk's logits instead of keeping them."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, chunk: int):
        lse = rows.new_full((rows.shape[0],), -math.inf)
        best = rows.new_full((rows.shape[0],), -math.inf)
        best_index = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        for start in range(0, cols.shape[0], chunk):
            logits = scale * (rows @ cols[start : start + chunk].T)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            value, index = logits.max(dim=1)
            better = value > best  # strict: ties keep the first column, as argmax does
            best = torch.where(better, value, best)
            best_index = torch.where(better, index + start, best_index)
        ctx.save_for_backward(rows, cols, scale, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(best_index)
        return lse, best_index

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor, _grad_index):
        rows, cols, scale, lse = ctx.saved_tensors
        grad_rows = torch.zeros_like(rows)
        grad_cols = torch.empty_like(cols)
        grad_scale = torch.zeros_like(scale)
        for start in range(0, cols.shape[0], ctx.chunk):
            block = cols[start : start + ctx.chunk]
            dots = rows @ block.T
            # d lse_i / d logit_ij = softmax_ij; weighted by the incoming gradient of each row
            weights = torch.exp(scale * dots - lse[:, None]) * grad_lse[:, None]
            grad_rows += scale * (weights @ block)
            grad_cols[start : start + ctx.chunk] = scale * (weights.T @ rows)
            grad_scale += (weights * dots).sum()
        return grad_rows, grad_cols, grad_scale, None


def _row_loss(rows, cols, scale, labels, chunk_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `rows` against all `cols` (positive of row i = column labels[i]), and its accuracy
    (a negative column scored above the positive counts as a miss)."""
    if chunk_size is None:
        logits = scale * (rows @ cols.T)
        correct = (logits.argmax(dim=1) == labels).float().mean()
        return F.cross_entropy(logits, labels), correct
    positives = scale * (rows * cols[labels]).sum(dim=1)
    lse, predicted = _ChunkedLogSumExp.apply(rows, cols, scale, chunk_size)
    return (lse - positives).mean(), (predicted == labels).float().mean()


def _check_inputs(image_embeds, text_embeds, logit_scale, group, chunk_size, local_loss) -> None:
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ConfigError(
            f"itc_loss needs image and text embeddings of the same shape [b, d]; got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    if logit_scale.dim() != 0:
        raise ConfigError(f"itc_loss needs a 0-dim logit_scale, got shape {tuple(logit_scale.shape)}")
    if chunk_size is not None and (chunk_size < 1 or not local_loss):
        raise ConfigError(
            f"--itc-chunk-size {chunk_size}: needs a positive size and the local loss (local_loss=True)"
        )
    if group is not None and dist.get_world_size(group) > 1:
        # the gather needs equal shapes on every rank; a mismatch would otherwise hang or corrupt rows
        # one small collective: max of (shape, -shape) gives the group's max and min
        shape = torch.tensor(image_embeds.shape, dtype=torch.int64, device=image_embeds.device)
        bounds = torch.cat([shape, -shape])
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
        hi, lo = bounds[:2], -bounds[2:]
        if not torch.equal(lo, hi):
            raise ConfigError(
                f"itc_loss needs the same local batch [b, d] on every rank of the ITC group; this rank has "
                f"{list(shape.tolist())}, the group ranges from {lo.tolist()} to {hi.tolist()}: use the same "
                f"--micro-batch-size everywhere and drop the last incomplete batch"
            )


def itc_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    local_loss: bool = True,
    timers=None,
    negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    gathered_out: Optional[list] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's symmetric InfoNCE loss over its rows of the group logits, and detached metrics.

    image_embeds, text_embeds: [b, d], already L2-normalised, any float dtype (the math runs in float32).
    logit_scale: the learnable LOG scale (0-dim); the logits use exp(min(logit_scale, log 100)) as in CLIP.
    group: the ITC group to gather over (the trainer passes `parallel.get_itc_group()`); None or a group of size 1
    gives the local CLIP loss of these rows.
    chunk_size: tile the softmax over this many columns.
    local_loss=False: every rank builds the full group logits and returns the group loss (same gradients).
    timers: megatron-core Timers (the model config's `timers`); the gather is timed as `itc-gather` (log level 2).
    negatives: (image [n, d], text [n, d]) extra columns, detached here whatever the caller passes (see the module
    docstring); n may be 0.
    gathered_out: a list to which the group's gathered (image, text) features are appended, detached float32
    ([g*b, d] each, rank-major), so the caller can keep them as later negatives without gathering again.
    """
    _check_inputs(image_embeds, text_embeds, logit_scale, group, chunk_size, local_loss)
    # float32 whatever the model's dtype, in every mode (batch accumulation's pass 2 upcasts too): the logits of a
    # large contrastive batch and their softmax lose the positives' margin in bf16; the embeddings are small, so the
    # gather and its reduce-scatter move float32 too. The gradients flow back in the inputs' dtype.
    image_embeds, text_embeds, logit_scale = image_embeds.float(), text_embeds.float(), logit_scale.float()
    scale = logit_scale.clamp(max=MAX_LOG_SCALE).exp()
    b = image_embeds.shape[0]
    if group is None or dist.get_world_size(group) == 1:
        rank = 0
        all_image, all_text = image_embeds, text_embeds
    else:
        rank = dist.get_rank(group)
        # one collective for both modalities
        gathered = _gather_rows(torch.cat([image_embeds, text_embeds], dim=1), group, timers)
        all_image, all_text = gathered.split(image_embeds.shape[1], dim=1)
    if gathered_out is not None:
        gathered_out.append((all_image.detach(), all_text.detach()))
    columns_image, columns_text = all_image, all_text
    if negatives is not None and negatives[0].shape[0]:
        neg_image, neg_text = (t.detach().float() for t in negatives)
        columns_image, columns_text = torch.cat([all_image, neg_image]), torch.cat([all_text, neg_text])
    if local_loss:
        rows_image, rows_text = image_embeds, text_embeds
        labels = torch.arange(rank * b, (rank + 1) * b, device=image_embeds.device)
    else:
        rows_image, rows_text = all_image, all_text
        labels = torch.arange(all_image.shape[0], device=image_embeds.device)
    loss_i2t, acc_i2t = _row_loss(rows_image, columns_text, scale, labels, chunk_size)
    loss_t2i, acc_t2i = _row_loss(rows_text, columns_image, scale, labels, chunk_size)
    loss = (loss_i2t + loss_t2i) / 2
    metrics = {
        # a copy: megatron-core's schedule divides the returned loss by num_microbatches in place
        "itc_loss": loss.detach().clone(),
        "logit_scale": scale.detach(),
        "i2t_acc": acc_i2t.detach(),
        "t2i_acc": acc_t2i.detach(),
    }
    return loss, metrics
