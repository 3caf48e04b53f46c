"""The masked-modelling losses of M2-Encoder's objective L = L_ITC + alpha * L_CMIM + beta * L_CMLM (arXiv 2401.15896).

- CMLM: cross-entropy of the image-to-text decoder's logits at the masked caption positions, over the vocabulary, with
  megatron-core's vocab-parallel cross-entropy (the logits stay split over TP, as megatron's language models do).
- CMIM: MAE's loss: the text-to-image decoder's pixels of each masked patch against that patch's pixels normalised by
  the patch's own mean and variance (MAE's norm_pix_loss, eps 1e-6), squared error averaged over the patch's pixels.

Semantics (Megatron-LM's per-token loss): a step's CMLM loss is the mean over ALL masked tokens of the step, across its
micro-batches and data-parallel ranks, and its CMIM loss the mean over ALL masked patches; not a mean of per-micro-batch
means. So how a step is split (TP1 with one micro-batch of 8, TP2 with two micro-batches of 4) does not change it.

Why the gradient scaling is right (notation: M micro-batches per step, DP data-parallel ranks, S_{r,m} = the sum of the
token (patch) losses of micro-batch m on DP rank r, N = sum over r, m of its masked tokens (patches)):
  * the step knows N before its schedule runs: it reads its M micro-batches first and one all-reduce over DP adds the
    counts (`loss_scale`), so each micro-batch's loss function can return  weight x S_{r,m} x M x DP / N;
  * megatron's schedule divides each returned loss by M and backpropagates the micro-batches one after another: rank r
    accumulates weight x DP / N x sum_m dS_{r,m};
  * megatron's DDP averages the gradients over DP (1/DP): the update is weight / N x sum_{r,m} dS_{r,m}, the gradient
    of weight x (the step's mean over all N). Exact for any M and DP, and additive with the ITC loss's own scaling
    (loss.py), which is why megatron's calculate_per_token_loss is not used: it would divide every gradient of the step
    by one token count, the ITC loss's included.
  * TP ranks of a replica compute the same loss (the vocab-parallel cross-entropy all-reduces inside); each owns its
    vocabulary slice's gradient.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel

PIXEL_NORM_EPS = 1e-6  # MAE's


def cmlm_loss_sum(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the cross-entropy (float32): logits [n, vocab / TP] (this TP rank's slice), targets [n]."""
    if not targets.numel():
        return vocab_parallel_logits.float().sum() * 0.0  # keeps the graph (and its TP collectives) trivially
    return tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits.float(), targets).sum()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[b, C, H, W] -> [b, patches, patch_size^2 x C]: patches in the patch embedding's (row-major) order, pixels in
    MAE's (row, column, channel) order."""
    b, c, height, width = images.shape
    p = patch_size
    x = images.reshape(b, c, height // p, p, width // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (height // p) * (width // p), p * p * c)


def patch_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MAE's normalised pixel targets [b, patches, patch_size^2 x C] (float32) of the model's input images."""
    patches = patchify(images.float(), patch_size)
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + PIXEL_NORM_EPS).sqrt()


def cmim_loss_sum(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over patches of the mean squared error over the patch's pixels (float32): both [n, patch_size^2 x C]."""
    return (predicted.float() - targets).square().mean(dim=-1).sum()


def loss_scale(weight: float, num_microbatches: int, data_parallel_size: int, total: int) -> float:
    """What a micro-batch's summed loss is multiplied by (see the module docstring): weight x M x DP / N."""
    return weight * num_microbatches * data_parallel_size / max(total, 1)
