"""Sequence parallelism (--sequence-parallel) for the two token streams of an M2 stage.

Under megatron-core's sequence parallelism the activations outside attention and MLP (LayerNorms, residuals,
dropout) are split along the sequence over the TP group: [S / TP, b, h] per rank. The column-parallel linears
all-gather the sequence before their matmul and the row-parallel ones reduce-scatter after it, so a layer moves the
same bytes as with TP alone (an all-reduce is a reduce-scatter plus an all-gather) and keeps 1/TP of those
activations.

M2's streams have lengths TP does not always divide (197 image tokens, never; 52 text tokens at TP 8), so each
stream is padded at its end to a multiple of TP before it is split (config.padded_length), and the padding is masked
out of attention as keys (`padded_key_mask`). A padded token attends to the real ones and goes through the layers
like any other, but no real token attends to it and nothing reads it: the CLS token (position 0) that the heads
use, every real token and every gradient are those of the unpadded stream (tests/test_communication_flags.py). The
cost is the padded tokens' compute: 0.5% more image tokens at TP 2 (198), 1.5% at TP 4 and 8 (200), text 7.7%
more at TP 8 (56 tokens).

The LayerNorms on the split sequence are the pre-LNs and the final LNs, with weights replicated over TP: their
gradients are partial sums, all-reduced over TP by megatron's finalize_model_grads (layer_spec.TorchNorm marks them;
TE's norms mark themselves). The Sub-LNs (sub_ln.py) sit between the column- and the row-parallel linear, where the
sequence is whole again and the hidden dimension is split: sequence parallelism leaves them as they are.

Each stream is split on its own (the packed activation between pipeline stages holds the two local parts, image
then text), because each runs through its own tower and its all-gathers must rebuild that stream alone. The heads
need only the CLS token: `first_token` gathers the first local row of every TP rank (TP x b x h instead of the whole
sequence) and keeps rank 0's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    scatter_to_sequence_parallel_region)

from megatron_m2.config import padded_length


def scatter_sequence(hidden: torch.Tensor, sequence_parallel_size: int) -> torch.Tensor:
    """[S, b, h] on every TP rank -> this rank's [padded(S) / TP, b, h]; the backward all-gathers the gradient."""
    padding = padded_length(hidden.shape[0], sequence_parallel_size) - hidden.shape[0]
    if padding:
        hidden = F.pad(hidden, (0, 0, 0, 0, 0, padding))  # zeros at the end of the sequence
    return scatter_to_sequence_parallel_region(hidden)


def first_token(hidden: torch.Tensor) -> torch.Tensor:
    """The sequence's first token [b, h] from this rank's split [S / TP, b, h], on every TP rank.

    The heads and the loss after it are replicated over TP, so the backward hands each rank the gradient of its own
    row (tensor_parallel_output_grad=False: a split, not a reduce-scatter), as megatron's BERT pooler does.
    """
    return gather_from_sequence_parallel_region(hidden[:1], tensor_parallel_output_grad=False)[0]


def padded_key_mask(padding_mask: Optional[torch.Tensor], batch: int, length: int, sequence_parallel_size: int,
                    device) -> Optional[torch.Tensor]:
    """The key-padding mask [b, padded length] (True = masked) of a stream of `length` tokens, the sequence padding
    included; None when nothing is masked."""
    padding = padded_length(length, sequence_parallel_size) - length
    if padding_mask is None and not padding:
        return None
    if padding_mask is None:
        padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    return F.pad(padding_mask.to(device=device, dtype=torch.bool), (0, padding), value=True)
