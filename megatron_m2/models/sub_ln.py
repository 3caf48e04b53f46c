"""Magneto Sub-LN under tensor parallelism.

Sub-LN normalises the attention context (before out_proj) and the FFN activation (before fc2). Under TP both are
sharded on the last dimension, so a LayerNorm of the local shard would be wrong: the mean and variance must cover the
full dimension. `TensorParallelLayerNorm` all-reduces the per-token sums of x and x^2 over the TP group; its weight
and bias are sharded like the input. `SubLNRowParallelLinear` is that LayerNorm followed by a row-parallel linear, and
stands in for `linear_proj` / `linear_fc2` in the layer spec (TransformerEngine's LayerNormLinear would normalise only
the local shard, so the te spec uses this module too, with TERowParallelLinear).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import RowParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def all_reduce_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over the TP group, and sum the gradients too.

    Each rank uses the reduced statistics for its own shard only, so the gradient of the statistics is the sum of the
    ranks' contributions. megatron's reduce_from_* alone has an identity backward (it assumes the consumer is
    replicated); composing it with copy_to_* (identity forward, all-reduce backward) gives all-reduce both ways.
    """
    return reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(tensor, group), group)


class TensorParallelLayerNorm(MegatronModule):
    """LayerNorm over a last dimension of size `hidden_size` that is split evenly across the TP group.

    Statistics are computed in float32 in one pass (sum and sum of squares in a single all-reduce) and match
    torch.nn.LayerNorm on the gathered tensor; weight/bias are the local shards (partition dim 0).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: Optional[float] = None,
                 tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config=config)
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        tp = self.tp_size = torch.distributed.get_world_size(self.tp_group) if self.tp_group is not None else 1
        if hidden_size % tp:
            raise ValueError(f"Sub-LN size {hidden_size} is not divisible by the tensor-parallel size {tp}")
        self.hidden_size = hidden_size
        self.eps = config.layernorm_epsilon if eps is None else eps
        local = hidden_size // tp
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(local, dtype=config.params_dtype))
        for param in (self.weight, self.bias):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        stats = torch.stack([x32.sum(-1), x32.square().sum(-1)])
        if self.tp_size > 1:
            stats = all_reduce_with_grad(stats, self.tp_group)
        mean = stats[0] / self.hidden_size
        var = (stats[1] / self.hidden_size - mean.square()).clamp_min(0.0)
        normed = (x32 - mean.unsqueeze(-1)) * torch.rsqrt(var.unsqueeze(-1) + self.eps)
        return (normed * self.weight.float() + self.bias.float()).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0, "bias": 0}, sharded_offsets,
                                                   tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


class SubLNRowParallelLinear(MegatronModule):
    """Sub-LN then a row-parallel linear; built by the layer spec with RowParallelLinear's arguments.

    `linear_cls` is RowParallelLinear (local spec) or TERowParallelLinear (te spec); select it with
    `ModuleSpec(module=SubLNRowParallelLinear, params={"linear_cls": ...})`.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig,
                 linear_cls: type = RowParallelLinear, tp_group=None, **linear_kwargs):
        super().__init__(config=config)
        self.layer_norm = TensorParallelLayerNorm(config, input_size, tp_group=tp_group)
        self.linear = linear_cls(input_size, output_size, config=config, tp_group=tp_group, **linear_kwargs)

    def forward(self, x: torch.Tensor):
        return self.linear(self.layer_norm(x))
