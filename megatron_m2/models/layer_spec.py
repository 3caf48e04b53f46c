"""megatron-core layer specs for an M2-Encoder layer (one spec for both towers and the VL layers).

Layer (BEiT-3 / torchscale with Magneto Sub-LN, pre-LN, GELU, biases everywhere):
    x = x + linear_proj(SubLN(attention(linear_qkv(LN(x)))))
    x = x + linear_fc2(SubLN(gelu(linear_fc1(LN(x)))))
Attention is bidirectional: AttnMaskType.padding with a [b, 1, 1, s] key-padding mask (True = masked) for text and
no mask for images. `local` is pure PyTorch (runs on CPU); `te` uses TransformerEngine with the same math (its fused
LayerNorm+Linear for the pre-LNs, whose input is not TP-sharded; the Sub-LNs stay TP-aware, see sub_ln.py).

The training-only cross-modal decoders (models/decoders.py) use a decoder layer: the same layer with a
cross-attention sublayer between self-attention and FFN, as megatron-core's T5 decoder spec builds it
(CrossAttention with linear_q / linear_kv, pre_cross_attn_layernorm, cross_attn_bda), and as torchscale's
DecoderLayer (which the release ships) computes it: pre-LN, Sub-LN on the cross-attention's output projection too.
Self-attention stays bidirectional (masked modelling, not generation).
"""
from __future__ import annotations

import copy

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (CrossAttention, CrossAttentionSubmodules, SelfAttention,
                                                 SelfAttentionSubmodules)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_m2.errors import ConfigError
from megatron_m2.models.drop_path import M2TransformerLayer
from megatron_m2.models.sub_ln import SubLNRowParallelLinear

SPECS = ("auto", "local", "te")


def te_available() -> bool:
    """TransformerEngine importable and a GPU present (TE needs CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def resolve_spec(spec: str) -> str:
    """'auto' -> 'te' when TransformerEngine and CUDA are available, else 'local'."""
    if spec not in SPECS:
        raise ConfigError(f"--spec {spec!r} is not one of {SPECS}")
    if spec == "auto":
        return "te" if te_available() else "local"
    if spec == "te" and not te_available():
        raise ConfigError("--spec te needs TransformerEngine and a CUDA device; use --spec local (or auto)")
    return spec


class TorchNorm:
    """megatron-core's WrappedTorchNorm (a torch.nn.LayerNorm, the same state dict) that also runs under sequence
    parallelism: there each rank normalises its own tokens with replicated weights, so their gradients are partial
    sums over the sequence; the weights are marked `sequence_parallel`, and megatron's finalize_model_grads
    all-reduces such gradients over the TP group (what its FusedLayerNorm and TENorm do). WrappedTorchNorm refuses
    sequence parallelism only because it does not mark them."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> torch.nn.Module:
        plain = copy.copy(config)  # the same fields, without running TransformerConfig's checks again
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _sub_ln_linear(linear_cls: type) -> ModuleSpec:
    return ModuleSpec(module=SubLNRowParallelLinear, params={"linear_cls": linear_cls})


def _local_cross_attention() -> dict:
    """The cross-attention sublayer of the local decoder layer (TransformerLayerSubmodules fields)."""
    return dict(
        pre_cross_attn_layernorm=TorchNorm,
        cross_attention=ModuleSpec(
            module=CrossAttention,
            params={"attn_mask_type": AttnMaskType.padding},
            submodules=CrossAttentionSubmodules(
                linear_q=ColumnParallelLinear,
                linear_kv=ColumnParallelLinear,
                core_attention=DotProductAttention,
                linear_proj=_sub_ln_linear(RowParallelLinear),
            ),
        ),
        cross_attn_bda=get_bias_dropout_add,
    )


def _te_cross_attention() -> dict:
    """The te decoder layer's cross-attention: megatron's T5 TE decoder spec, with the Sub-LN output projection.
    TE's padding attention takes the (query, key) padding masks as a pair (models/decoders.py passes them)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    return dict(
        pre_cross_attn_layernorm=TENorm,
        cross_attention=ModuleSpec(
            module=CrossAttention,
            params={"attn_mask_type": AttnMaskType.padding},
            submodules=CrossAttentionSubmodules(
                linear_q=TEColumnParallelLinear,
                linear_kv=TEColumnParallelLinear,
                core_attention=TEDotProductAttention,
                linear_proj=_sub_ln_linear(TERowParallelLinear),
            ),
        ),
        cross_attn_bda=get_bias_dropout_add,
    )


def get_local_layer_spec(cross_attention: bool = False, drop_path_rates: tuple[float, ...] = ()) -> ModuleSpec:
    """Pure PyTorch layer: torch LayerNorm (sequence-parallel capable), megatron's Column/RowParallelLinear and
    DotProductAttention.
    cross_attention: the decoder layer (self-attention, cross-attention, FFN).
    drop_path_rates: the stochastic-depth rate of each layer of the stack (models/drop_path.py), () = none."""
    return ModuleSpec(
        module=M2TransformerLayer,
        params={"drop_path_rates": tuple(drop_path_rates)},
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=_sub_ln_linear(RowParallelLinear),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            **(_local_cross_attention() if cross_attention else {}),
            pre_mlp_layernorm=TorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         linear_fc2=_sub_ln_linear(RowParallelLinear)),
            ),
            mlp_bda=get_bias_dropout_add,
            # dist checkpoints use the te names, so local and te checkpoints are interchangeable
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_te_layer_spec(cross_attention: bool = False, drop_path_rates: tuple[float, ...] = ()) -> ModuleSpec:
    """TransformerEngine layer: fused pre-LN + QKV / fc1, TE attention, TP-aware Sub-LN + TERowParallelLinear.
    cross_attention: the decoder layer (self-attention, cross-attention, FFN).
    drop_path_rates: the stochastic-depth rate of each layer of the stack (models/drop_path.py), () = none."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=M2TransformerLayer,
        params={"drop_path_rates": tuple(drop_path_rates)},
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=_sub_ln_linear(TERowParallelLinear),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            **(_te_cross_attention() if cross_attention else {}),
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                         linear_fc2=_sub_ln_linear(TERowParallelLinear)),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_layer_spec(spec: str = "auto", drop_path_rates: tuple[float, ...] = ()) -> ModuleSpec:
    """The towers' and VL layers' layer; drop_path_rates: per layer of the stack (models/drop_path.py)."""
    te = resolve_spec(spec) == "te"
    return (get_te_layer_spec if te else get_local_layer_spec)(drop_path_rates=drop_path_rates)


def get_decoder_layer_spec(spec: str = "auto", drop_path_rates: tuple[float, ...] = ()) -> ModuleSpec:
    """The cross-modal decoders' layer (see the module docstring)."""
    te = resolve_spec(spec) == "te"
    return (get_te_layer_spec if te else get_local_layer_spec)(cross_attention=True, drop_path_rates=drop_path_rates)


def get_final_norm_spec(spec: str = "auto") -> type:
    """The LayerNorm after each tower and after the VL layers."""
    if resolve_spec(spec) == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return TorchNorm
