"""Sub-LN under tensor parallelism equals torch.nn.LayerNorm on the gathered tensor (outputs and all gradients)."""
import pytest
import torch

from megatron_m2 import parallel
from megatron_m2.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
SEQ, BATCH, HIDDEN = 5, 3, 16


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g) * 2 + 0.5  # non-zero mean: the shard means differ
    weight, bias = torch.randn(HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
    upstream = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    return x, weight, bias, upstream


def _sharded_layer_norm(tp):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from megatron_m2.models.sub_ln import TensorParallelLayerNorm

    parallel.initialize_model_parallel(tp, 1)
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
                               tensor_model_parallel_size=tp, layernorm_epsilon=1e-5)
    x, weight, bias, upstream = _data()
    rank = ps.get_tensor_model_parallel_rank()
    local = slice(rank * HIDDEN // tp, (rank + 1) * HIDDEN // tp)
    norm = TensorParallelLayerNorm(config, HIDDEN)
    assert norm.weight.tensor_model_parallel and norm.weight.partition_dim == 0
    with torch.no_grad():
        norm.weight.copy_(weight[local])
        norm.bias.copy_(bias[local])
    x_local = x[..., local].clone().requires_grad_()
    out = norm(x_local)
    (out * upstream[..., local]).sum().backward()
    return ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), out.detach(), x_local.grad, \
        norm.weight.grad, norm.bias.grad


@pytest.mark.parametrize("tp", [1, 2])  # TP1: torch's layer_norm; TP2: the sharded statistics
def test_sub_ln_matches_unsharded_layer_norm(tp):
    results = run_distributed(4, _sharded_layer_norm, tp)
    shards = sorted((r for r in results if r[1] == 0), key=lambda r: r[0])
    out, x_grad, w_grad, b_grad = (torch.cat([s[i] for s in shards], dim=-1) for i in range(2, 6))
    x, weight, bias, upstream = _data()
    x = x.clone().requires_grad_()
    norm = torch.nn.LayerNorm(HIDDEN, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    ref = norm(x)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach(), **TOL)
    torch.testing.assert_close(x_grad, x.grad, **TOL)
    torch.testing.assert_close(w_grad, norm.weight.grad, **TOL)
    torch.testing.assert_close(b_grad, norm.bias.grad, **TOL)


def test_qkv_split_fuse_round_trip_follows_megatron_head_layout():
    from megatron_m2.models.state_dict import fuse_qkv, split_qkv

    heads, head_dim, hidden = 2, 4, 5
    fused = torch.randn(3 * heads * head_dim, hidden)
    q, k, v = split_qkv(fused, heads)
    # megatron's linear_qkv rows: per head [q_h; k_h; v_h]
    torch.testing.assert_close(q[head_dim:], fused[3 * head_dim:4 * head_dim])
    torch.testing.assert_close(v[:head_dim], fused[2 * head_dim:3 * head_dim])
    torch.testing.assert_close(fuse_qkv(q, k, v, heads), fused)
    bias = torch.randn(3 * heads * head_dim)
    torch.testing.assert_close(fuse_qkv(*split_qkv(bias, heads), heads), bias)


def test_spec_resolution_without_transformer_engine():
    from megatron_m2.errors import ConfigError
    from megatron_m2.models import resolve_spec, te_available

    if te_available():
        pytest.skip("TransformerEngine and CUDA present")
    assert resolve_spec("auto") == "local"
    with pytest.raises(ConfigError, match="--spec te"):
        resolve_spec("te")
    with pytest.raises(ConfigError, match="--spec"):
        resolve_spec("apex")
