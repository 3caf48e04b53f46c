"""Key names: the official M2-Encoder release <-> our Hugging Face model.

What the official code does (alipay Ant-Multi-Modal-Framework, prj/M2_Encoder, vlmo/modules/vlmo_module.py and its
OpenVINO export; torchscale BEiT-3 underneath):
  infer_image/infer_text return cls_feats = itc_{image,text}_proj(backbone_out[:, 0]) and
  cls_vlffn_feats = itc_vl_{image,text}_proj(backbone_vl_out[:, 0]); the released inference (m2_encoder.py) uses
  cls_vlffn_feats and scales their similarities by logit_scale.exp(); it never reads logit_vl_scale (training's
  compute_itc paired that one with the VL features, but the release does not).
So our main heads (on the VL output) are itc_vl_*_proj, and our logit_scale is the official logit_scale, as the
release computes probabilities; the optional backbone heads are itc_*_proj and use the same logit_scale (as compute_itc
pairs them). logit_vl_scale is known-unused. backbone_vl runs with multiway_split_position=-1, i.e. only its A
weights are used.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

OFFICIAL_PREFIXES = ("_forward_module.", "module.", "model.")

# HF layer sub-key -> official layer sub-key; {m} is the multiway copy (A = vision, B = text).
LAYER_KEYS = {
    "attn_norm": "self_attn_layer_norm.{m}",
    "attn.q_proj": "self_attn.q_proj.{m}",
    "attn.k_proj": "self_attn.k_proj.{m}",
    "attn.v_proj": "self_attn.v_proj.{m}",
    "attn.inner_attn_norm": "self_attn.inner_attn_ln.{m}",
    "attn.out_proj": "self_attn.out_proj.{m}",
    "ffn_norm": "final_layer_norm.{m}",
    "fc1": "ffn.{m}.fc1",
    "ffn_inner_norm": "ffn.{m}.ffn_layernorm",
    "fc2": "ffn.{m}.fc2",
}

# Official keys that exist in released checkpoints but play no part in the image/text embeddings.
# (The backbone_vl B copies are added per layer in official_unused_keys.)
OFFICIAL_UNUSED_EXACT = (
    "backbone.vision_embed.mask_token",  # BEiT-3 masked image modelling token (pre-training only)
    "norm.weight", "norm.bias",  # VLMo module's spare LayerNorm, not called in infer_image/infer_text
    "pooler.dense.weight", "pooler.dense.bias",  # ITM pooler, not used by the contrastive heads
    "logit_vl_scale",  # never read by the released inference, which scales the VL features by logit_scale
)
OFFICIAL_UNUSED_PREFIXES = (
    "visual_tokenizer.",  # BEiT-v2 tokenizer for MIM targets, training only (the release's loader drops it)
    "itc_teacher",  # distillation teacher heads/models (itc_teacher*): the release's loader ignores them
)


def _encoder_pairs(official_prefix: str, hf_prefix: str, num_layers: int, copy: str) -> dict[str, str]:
    pairs = {}
    for n in range(num_layers):
        for hf_sub, off_sub in LAYER_KEYS.items():
            for p in ("weight", "bias"):
                pairs[f"{official_prefix}layers.{n}.{off_sub.format(m=copy)}.{p}"] = f"{hf_prefix}layers.{n}.{hf_sub}.{p}"
    return pairs


def official_to_hf_map(config: Any) -> dict[str, str]:
    """Every official key the HF model needs, mapped to its HF key (config: M2EncoderConfig or M2Config)."""
    pairs = {
        "backbone.text_embed.weight": "text_embed.token_embedding.weight",
        "backbone.vision_embed.proj.weight": "vision_embed.patch_embed.weight",
        "backbone.vision_embed.proj.bias": "vision_embed.patch_embed.bias",
        "backbone.vision_embed.cls_token": "vision_embed.cls_token",
        "backbone.encoder.embed_positions.A.weight": "vision_embed.position_embedding.weight",
        "backbone.encoder.embed_positions.B.weight": "text_embed.position_embedding.weight",
        "itc_vl_image_proj.fc.weight": "image_projection.weight",
        "itc_vl_text_proj.fc.weight": "text_projection.weight",
        "logit_scale": "logit_scale",
    }
    if config.backbone_heads:
        pairs.update({"itc_image_proj.fc.weight": "backbone_image_projection.weight",
                      "itc_text_proj.fc.weight": "backbone_text_projection.weight"})
    for copy, tower in (("A", "vision_encoder."), ("B", "text_encoder.")):
        pairs.update(_encoder_pairs("backbone.encoder.", tower, config.num_layers, copy))
        for p in ("weight", "bias"):
            pairs[f"backbone.encoder.layer_norm.{copy}.{p}"] = f"{tower}final_norm.{p}"
    pairs.update(_encoder_pairs("backbone_vl.", "vl_encoder.", config.num_vl_layers, "A"))
    for p in ("weight", "bias"):
        pairs[f"backbone_vl.layer_norm.A.{p}"] = f"vl_encoder.final_norm.{p}"
    return pairs


def official_copied_keys(config: Any) -> dict[str, str]:
    """HF keys filled from an official key that official_to_hf_map already maps elsewhere (HF key -> official key)."""
    return {"backbone_logit_scale": "logit_scale"} if config.backbone_heads else {}


def official_unused_keys(config: Any) -> set[str]:
    """The backbone_vl B copies: present in every release, never used (backbone_vl runs with split position -1)."""
    unused = set(_encoder_pairs("backbone_vl.", "", config.num_vl_layers, "B"))
    unused.update(f"backbone_vl.layer_norm.B.{p}" for p in ("weight", "bias"))
    if not config.backbone_heads:
        unused.update({"itc_image_proj.fc.weight", "itc_text_proj.fc.weight"})
    return unused


def is_official_extra(key: str) -> bool:
    """Training-only parts of the official LightningModule (see OFFICIAL_UNUSED_*)."""
    return key in OFFICIAL_UNUSED_EXACT or key.startswith(OFFICIAL_UNUSED_PREFIXES)


def strip_official_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the wrapper prefixes (_forward_module. from DeepSpeed/Lightning strategies, module./model. wrappers)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in OFFICIAL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


_LAYER_RE = re.compile(r"^(backbone\.encoder\.|backbone_vl\.)layers\.(\d+)\.")


def count_official_layers(keys: Any) -> tuple[int, int]:
    """(backbone layers, VL layers) present in an official state dict."""
    seen: dict[str, set[int]] = {"backbone.encoder.": set(), "backbone_vl.": set()}
    for key in keys:
        m = _LAYER_RE.match(key)
        if m:
            seen[m.group(1)].add(int(m.group(2)))
    return len(seen["backbone.encoder."]), len(seen["backbone_vl."])


# ---- megatron-core dist-checkpoint keys <-> HF keys ---------------------------------------------------------------
# Dist checkpoints use TransformerEngine names for both specs (layer_spec.py maps the local spec's input_layernorm /
# pre_mlp_layernorm onto them) and stack each block's layers on a leading axis: one key per parameter name.
TOWERS = ("vision_encoder", "text_encoder", "vl_encoder")  # the same block names on both sides

# HF layer sub-key -> megatron layer sub-key (fused QKV handled separately, see QKV_KEYS)
MEGATRON_LAYER_KEYS = {
    "attn_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "attn_norm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "attn.inner_attn_norm.weight": "self_attention.linear_proj.layer_norm.weight",
    "attn.inner_attn_norm.bias": "self_attention.linear_proj.layer_norm.bias",
    "attn.out_proj.weight": "self_attention.linear_proj.linear.weight",
    "attn.out_proj.bias": "self_attention.linear_proj.linear.bias",
    "ffn_norm.weight": "mlp.linear_fc1.layer_norm_weight",
    "ffn_norm.bias": "mlp.linear_fc1.layer_norm_bias",
    "fc1.weight": "mlp.linear_fc1.weight",
    "fc1.bias": "mlp.linear_fc1.bias",
    "ffn_inner_norm.weight": "mlp.linear_fc2.layer_norm.weight",
    "ffn_inner_norm.bias": "mlp.linear_fc2.layer_norm.bias",
    "fc2.weight": "mlp.linear_fc2.linear.weight",
    "fc2.bias": "mlp.linear_fc2.linear.bias",
}
# megatron fused QKV sub-key -> the HF q/k/v sub-keys it holds (layout: megatron_m2.models.state_dict.fuse_qkv)
QKV_KEYS = {
    "self_attention.linear_qkv.weight": ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"),
}
VOCAB_KEY = "text_embed.word_embeddings.weight"  # padded to padded_vocab_size(vocab, TP); HF keeps vocab_size rows


def megatron_top_keys(config: Any) -> dict[str, str]:
    """Non-layer megatron dist-checkpoint key -> HF key."""
    pairs = {
        "vision_embed.patch_embed.weight": "vision_embed.patch_embed.weight",
        "vision_embed.patch_embed.bias": "vision_embed.patch_embed.bias",
        "vision_embed.cls_token": "vision_embed.cls_token",
        "vision_embed.position_embeddings.weight": "vision_embed.position_embedding.weight",
        VOCAB_KEY: "text_embed.token_embedding.weight",
        "text_embed.position_embeddings.weight": "text_embed.position_embedding.weight",
        "image_projection.weight": "image_projection.weight",
        "text_projection.weight": "text_projection.weight",
        "logit_scale": "logit_scale",
    }
    if config.backbone_heads:
        for name in ("backbone_image_projection.weight", "backbone_text_projection.weight", "backbone_logit_scale"):
            pairs[name] = name
    for tower in TOWERS:
        for p in ("weight", "bias"):
            pairs[f"{tower}.final_layernorm.{p}"] = f"{tower}.final_norm.{p}"
    return pairs


def tower_layers(config: Any) -> dict[str, int]:
    return {"vision_encoder": config.num_layers, "text_encoder": config.num_layers,
            "vl_encoder": config.num_vl_layers}


def megatron_layer_keys() -> list[str]:
    """Every stacked per-layer megatron sub-key (without the tower prefix)."""
    return list(MEGATRON_LAYER_KEYS.values()) + list(QKV_KEYS)


def is_megatron_model_key(key: str) -> bool:
    """Model tensors of a training checkpoint (not optimizer state, also under a ChainedOptimizer's chained_N.
    prefix, not TE's _extra_state objects)."""
    return re.match(r"(chained_\d+\.)?optimizer\.", key) is None and not key.endswith("_extra_state")
