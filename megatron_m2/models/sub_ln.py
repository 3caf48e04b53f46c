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
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class _ShardedLayerNorm(torch.autograd.Function):
    """LayerNorm of x whose last dimension is this rank's shard of `hidden_size`, as one autograd node.

    Forward: per-token sum and sum of squares (float32), ONE all-reduce over the group, then normalise the shard.
    Backward: LayerNorm's gradient needs two per-token sums over the full dimension, sum(g) and sum(g * x_hat) with
    g = grad_out * weight: ONE all-reduce of both, then dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
    Written as one node because the same math as separate tensor ops made autograd record and replay a dozen
    elementwise kernels per Sub-LN: the step of a 4-layer model on CPU was 1.4x a plain PyTorch loop's
    (benchmarks/trainer_overhead.py).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, hidden_size: int, eps: float, group):
        x32 = x.float()
        stats = torch.stack([x32.sum(-1), (x32 * x32).sum(-1)])
        torch.distributed.all_reduce(stats, group=group)
        mean = stats[0] / hidden_size
        rstd = torch.rsqrt((stats[1] / hidden_size - mean * mean).clamp_min(0.0) + eps).unsqueeze(-1)
        x_hat = (x32 - mean.unsqueeze(-1)) * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.hidden_size, ctx.group, ctx.input_dtype = hidden_size, group, x.dtype
        return (x_hat * weight.float() + bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, rstd, weight = ctx.saved_tensors
        grad32 = grad_out.float()
        reduce_dims = tuple(range(grad32.dim() - 1))
        grad_weight = (grad32 * x_hat).sum(reduce_dims).to(weight.dtype)
        grad_bias = grad32.sum(reduce_dims).to(weight.dtype)
        g = grad32 * weight.float()
        sums = torch.stack([g.sum(-1), (g * x_hat).sum(-1)])
        torch.distributed.all_reduce(sums, group=ctx.group)
        sums /= ctx.hidden_size
        grad_x = rstd * (g - sums[0].unsqueeze(-1) - x_hat * sums[1].unsqueeze(-1))
        return grad_x.to(ctx.input_dtype), grad_weight, grad_bias, None, None, None


class TensorParallelLayerNorm(MegatronModule):
    """LayerNorm over a last dimension of size `hidden_size` that is split evenly across the TP group.

    Under TP, statistics are computed in float32 in one pass (sum and sum of squares in a single all-reduce; the
    backward's two sums in another) and match torch.nn.LayerNorm on the gathered tensor; weight/bias are the local
    shards (partition dim 0). Without TP it is torch's own layer_norm kernel.
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
        if self.tp_size == 1:
            return torch.nn.functional.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        return _ShardedLayerNorm.apply(x, self.weight, self.bias, self.hidden_size, self.eps, self.tp_group)

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
