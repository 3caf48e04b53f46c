"""Parameter counts computed from the official release's key names and shapes (DESIGN.md section 1).

The official state dict holds, besides what our model uses, the B (text) copies of the VL layers and of the VL final
LayerNorm (backbone_vl runs with only its A weights), and a second pair of heads on the backbone output (itc_*_proj +
logit_scale). Our model holds only what it uses, and pads the token embedding to a multiple of 128 x TP rows.
"""
from __future__ import annotations

from megatron_m2.config import M2Config, padded_vocab_size


def _layer_copy(config: M2Config) -> int:
    """One multiway copy of one layer: q/k/v/out_proj, inner_attn_ln, self_attn_layer_norm, fc1, ffn_layernorm, fc2,
    final_layer_norm."""
    h, f = config.hidden_size, config.ffn_hidden_size
    attention = 4 * (h * h + h) + 2 * h + 2 * h
    ffn = (h * f + f) + 2 * f + (f * h + h) + 2 * h
    return attention + ffn


def official_parameter_count(config: M2Config) -> int:
    """All tensors of an official checkpoint that belong to the model (not the training-only extras).

    backbone.text_embed, backbone.vision_embed.{proj,cls_token}, encoder.embed_positions.{A,B}, backbone layers
    (A + B), encoder.layer_norm.{A,B}, backbone_vl layers (A + B), backbone_vl.layer_norm.{A,B}, the four
    itc_*_proj heads (bias-free), logit_scale and logit_vl_scale.
    """
    h, p = config.hidden_size, config.patch_size
    embeddings = (config.vocab_size * h
                  + h * config.num_channels * p * p + h + h  # conv proj weight + bias, cls_token
                  + config.vision_position_table_size * h + config.text_position_table_size * h)
    backbone = 2 * config.num_layers * _layer_copy(config) + 2 * 2 * h
    vl = 2 * config.num_vl_layers * _layer_copy(config) + 2 * 2 * h
    heads = 4 * h * config.out_dim + 2
    return embeddings + backbone + vl + heads


def official_unused_parameter_count(config: M2Config) -> int:
    """Official tensors our model does not hold: VL B copies, and the backbone heads unless backbone_heads is on."""
    h = config.hidden_size
    unused = config.num_vl_layers * _layer_copy(config) + 2 * h
    if not config.backbone_heads:
        unused += 2 * h * config.out_dim + 1
    return unused


def model_parameter_count(config: M2Config, tensor_model_parallel_size: int = 1) -> int:
    """Parameters of our full model (all TP ranks / PP stages together), vocab padding included."""
    padding = padded_vocab_size(config.vocab_size, tensor_model_parallel_size) - config.vocab_size
    return official_parameter_count(config) - official_unused_parameter_count(config) + padding * config.hidden_size
