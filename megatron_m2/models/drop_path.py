"""Stochastic depth (drop path) and hidden dropout on every residual branch of an M2-Encoder layer.

As BEiT-3 / torchscale (which M2-Encoder's release trains with drop_path_rate 0.1): each stack of layers draws its
rates linearly over its depth, `linspace(0, drop_path_rate, layers)`: the backbone towers over `num_layers`, the VL
layers over `num_vl_layers` (the release builds backbone_vl as its own torchscale Encoder with the same args), each
cross-modal decoder over its own layers. A branch's output (attention after its output projection, MLP after fc2,
cross-attention in the decoders; bias included) is first dropped out elementwise with megatron's hidden_dropout, then
multiplied per sample by mask / keep, mask ~ Bernoulli(keep = 1 - rate) (torchscale's drop_path):

    x = residual + drop_path(dropout(branch + bias))

`M2TransformerLayer` (megatron-core's TransformerLayer, which the layer specs build) does this in place of megatron's
bias-dropout-add while training; in eval mode megatron's own runs (no randomness).

Random state. The hidden states a mask acts on are replicated over the tensor-parallel ranks (or, under sequence
parallelism, split along the sequence), so a sample's mask must be the same on every TP peer. The default generator
is not enough: under sequence parallelism megatron's TransformerBlock runs its layers inside the model-parallel RNG
tracker's fork, whose state differs per TP rank. The masks are therefore drawn inside a fork of their own tracker state,
`DROP_PATH_RNG`, seeded alike on every rank (parallel.initialize_model_parallel). Being a tracker state, megatron's
activation recompute (tensor_parallel.checkpoint) saves and restores it around the recomputed forward, and GBA-ITC's
replay (megatron_m2/random_state.py) and the checkpoints carry it.

Hooks for tests (module attributes, replace and restore them): `mask_source(layer, branch, batch, keep, device)` gives
the [batch] 0/1 drop-path mask of one branch call, `dropout(layer, branch, x, p)` the dropped-out branch.
"""
from __future__ import annotations

import types
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer

DROP_PATH_RNG = "m2-drop-path-rng"  # the RNG tracker state of the drop-path masks (same seed on every rank)
DROP_PATH_SEED_OFFSET = 3119  # its seed is --seed + this (megatron's own states use seed, seed + 1024, seed + 2718 + tp)
BRANCHES = ("self_attn", "cross_attn", "mlp")


def drop_path_rates(drop_path_rate: float, num_layers: int) -> tuple[float, ...]:
    """Per-layer rates of a stack of `num_layers` layers: linearly from 0 (first layer) to the rate (last)."""
    return tuple(float(r) for r in np.linspace(0.0, drop_path_rate, num_layers))


def draw_mask(layer: torch.nn.Module, branch: str, batch: int, keep: float, device: torch.device) -> torch.Tensor:
    """[batch] float32 0/1, 1 with probability `keep` (torchscale: floor(keep + U[0, 1))), from DROP_PATH_RNG."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if DROP_PATH_RNG in tracker.get_states():
        with tracker.fork(DROP_PATH_RNG):
            uniform = torch.rand(batch, device=device)
    elif layer.config.sequence_parallel:
        raise RuntimeError(f"drop path under sequence parallelism needs the {DROP_PATH_RNG!r} RNG tracker state "
                           "(parallel.initialize_model_parallel adds it): the default generator differs per TP rank "
                           "inside megatron's sequence-parallel fork")
    else:  # a model built outside the trainer's seeding (one process, tests): TP-consistent as the default generator
        uniform = torch.rand(batch, device=device)
    return (keep + uniform).floor_()


def default_dropout(layer: torch.nn.Module, branch: str, x: torch.Tensor, p: float) -> torch.Tensor:
    """megatron's hidden dropout of a branch (the op its unfused bias-dropout-add runs)."""
    return F.dropout(x, p=p, training=True)


mask_source: Callable[..., torch.Tensor] = draw_mask
dropout: Callable[..., torch.Tensor] = default_dropout


def apply_drop_path(layer: torch.nn.Module, branch: str, x: torch.Tensor, rate: float) -> torch.Tensor:
    """x [s, b, h] (megatron's layout; s may be this rank's part of the sequence) -> each sample's branch kept and
    scaled by 1 / keep, or zeroed, by one mask entry per sample ([1, b, 1])."""
    if rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = mask_source(layer, branch, x.shape[1], keep, x.device)
    return x.div(keep) * mask.to(x.dtype).view(1, -1, 1)


class M2TransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer whose residual adds apply hidden dropout and drop path (module docstring).

    drop_path_rates: the rates of the layer's stack, indexed by megatron's 1-based global layer number (pipeline
    offset included); empty = no drop path. Built by the layer specs with `params={"drop_path_rates": ...}`.
    """

    def __init__(self, *args, drop_path_rates: tuple[float, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.drop_path_rate = float(drop_path_rates[self.layer_number - 1]) if drop_path_rates else 0.0
        for branch in BRANCHES:
            bda = getattr(self, f"{branch}_bda")
            if isinstance(bda, types.FunctionType):  # megatron's get_bias_dropout_add; IdentityFuncOp when absent
                setattr(self, f"{branch}_bda", self._residual_add(branch, bda))

    def _residual_add(self, branch: str, megatron_bda: Callable) -> Callable:
        """A drop-in for megatron's `get_bias_dropout_add(training, fused)`."""

        def get(training: bool, fused: bool) -> Callable:
            if not training:
                return megatron_bda(training, fused)

            def add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
                x, bias = x_with_bias
                if bias is not None:
                    x = x + bias
                residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
                if prob > 0.0:
                    x = dropout(self, branch, x, prob)
                return residual + apply_drop_path(self, branch, x, self.drop_path_rate)

            return add

        return get
