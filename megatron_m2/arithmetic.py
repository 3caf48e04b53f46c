"""The model's arithmetic from its shapes alone (no torch): parameter counts and training FLOPs.

One owner for these formulas: the planner, the trainer's TFLOP/s, the GPU check and the tests all read them here.
Parameter counts follow the official release's key names and shapes (hf/key_mapping.py). The official state dict
holds, besides what our model uses, the B (text) copies of the VL layers and of the VL final LayerNorm (backbone_vl
runs with only its A weights), and a second pair of heads on the backbone output (itc_*_proj + logit_scale). Our model
holds only what it uses, and pads the token embedding to a multiple of 128 x TP rows.

With the masked-modelling objectives (`MaskedPasses`: CMLM, CMIM) training adds the cross-modal decoders and their heads
on the last stage, the image mask token on the first (models/decoders.py), and the masked streams' passes through the
backbone towers and the decoders (training/step.py); none of it is part of the released model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_m2.config import M2Config, layers_per_stage, padded_vocab_size, validate_parallel_shapes


@dataclass(frozen=True)
class MaskedPasses:
    """Which masked-modelling objectives a training run has on (their weights > 0), and their mask rates."""

    cmlm: bool = False
    cmim: bool = False
    text_mask_prob: float = 0.15
    image_mask_ratio: float = 80 / 196

    @property
    def active(self) -> bool:
        return self.cmlm or self.cmim


@dataclass(frozen=True)
class StageParameters:
    """Parameters of one pipeline stage: `sharded` ones are split over TP ranks, `replicated` ones are not."""

    sharded: int
    replicated: int

    def per_gpu(self, tensor_model_parallel_size: int) -> int:
        return self.sharded // tensor_model_parallel_size + self.replicated

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


def layer_copy_parameters(config: M2Config) -> StageParameters:
    """One multiway copy of one layer (official names: q/k/v/out_proj, inner_attn_ln, self_attn_layer_norm, fc1,
    ffn_layernorm, fc2, final_layer_norm). Column-parallel qkv/fc1 (weights and biases) and row-parallel out/fc2 weights
    are split over TP, and so are the Sub-LNs, which normalise the TP-split attention context and FFN activation
    (models/sub_ln.py); the pre-LNs and the row-parallel biases are replicated."""
    h, f = config.hidden_size, config.ffn_hidden_size
    sharded = (3 * h * h + 3 * h) + h * h + 2 * h + (h * f + f) + 2 * f + f * h
    replicated = 2 * h + 2 * h + h + h  # self_attn_layer_norm, final_layer_norm, out_proj bias, fc2 bias
    return StageParameters(sharded, replicated)


def decoder_layer_parameters(config: M2Config) -> StageParameters:
    """One layer of a cross-modal decoder: a layer copy plus its cross-attention sublayer (pre-LN, column-parallel
    q and fused kv projections, Sub-LN + row-parallel output projection, models/layer_spec.py)."""
    h = config.hidden_size
    layer = layer_copy_parameters(config)
    cross_sharded = (h * h + h) + (2 * h * h + 2 * h) + 2 * h + h * h
    cross_replicated = 2 * h + h  # pre_cross_attn_layernorm, the output projection's bias
    return StageParameters(layer.sharded + cross_sharded, layer.replicated + cross_replicated)


def decoder_parameters(config: M2Config, tensor_model_parallel_size: int, masked: MaskedPasses) -> StageParameters:
    """Last stage: each decoder (its layers and final LN) and head; CMLM's output layer spans the padded vocabulary,
    split over TP, CMIM's pixel head is replicated."""
    h, p = config.hidden_size, config.patch_size
    block = decoder_layer_parameters(config)
    sharded = replicated = 0
    for on in (masked.cmlm, masked.cmim):
        if on:
            sharded += config.decoder_num_layers * block.sharded
            replicated += config.decoder_num_layers * block.replicated + 2 * h
    if masked.cmlm:
        sharded += padded_vocab_size(config.vocab_size, tensor_model_parallel_size) * h
    if masked.cmim:
        replicated += (h + 1) * p * p * config.num_channels
    return StageParameters(sharded, replicated)


def _embeddings(config: M2Config, tensor_model_parallel_size: int) -> StageParameters:
    """First stage: vocab-parallel token embedding (padded vocab); positions, patch conv and CLS replicated."""
    h, p = config.hidden_size, config.patch_size
    vocab = padded_vocab_size(config.vocab_size, tensor_model_parallel_size)
    replicated = (config.text_position_table_size * h + config.vision_position_table_size * h
                  + config.num_channels * p * p * h + h + h)
    return StageParameters(vocab * h, replicated)


def _last_stage_extras(config: M2Config) -> StageParameters:
    """Last stage: the two towers' final LNs, the VL layers (one shared copy each), the VL final LN, heads, scale."""
    h = config.hidden_size
    layer = layer_copy_parameters(config)
    num_heads = 4 if config.backbone_heads else 2
    replicated = (2 * 2 * h + config.num_vl_layers * layer.replicated + 2 * h
                  + num_heads * h * config.out_dim + num_heads // 2)
    return StageParameters(config.num_vl_layers * layer.sharded, replicated)


def stage_parameters(config: M2Config, tensor_model_parallel_size: int = 1,
                     pipeline_model_parallel_size: int = 1, masked: MaskedPasses = MaskedPasses()
                     ) -> list[StageParameters]:
    """Parameters of every pipeline stage (whole stage, all TP ranks together); sums to the model's count (with the
    training-only decoders of `masked`'s objectives)."""
    validate_parallel_shapes(config, tensor_model_parallel_size, pipeline_model_parallel_size)
    layer = layer_copy_parameters(config)
    stages = []
    for stage, num_layers in enumerate(layers_per_stage(config, pipeline_model_parallel_size)):
        sharded, replicated = 2 * num_layers * layer.sharded, 2 * num_layers * layer.replicated
        parts = []
        if stage == 0:
            parts.append(_embeddings(config, tensor_model_parallel_size))
            if masked.cmim:
                parts.append(StageParameters(0, config.hidden_size))  # the image mask token
        if stage == pipeline_model_parallel_size - 1:
            parts.append(_last_stage_extras(config))
            if masked.active:
                parts.append(decoder_parameters(config, tensor_model_parallel_size, masked))
        stages.append(StageParameters(sharded + sum(p.sharded for p in parts),
                                      replicated + sum(p.replicated for p in parts)))
    return stages


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
    backbone = 2 * config.num_layers * layer_copy_parameters(config).total + 2 * 2 * h
    vl = 2 * config.num_vl_layers * layer_copy_parameters(config).total + 2 * 2 * h
    heads = 4 * h * config.out_dim + 2
    return embeddings + backbone + vl + heads


def official_unused_parameter_count(config: M2Config) -> int:
    """Official tensors our model does not hold: VL B copies, and the backbone heads unless backbone_heads is on."""
    h = config.hidden_size
    unused = config.num_vl_layers * layer_copy_parameters(config).total + 2 * h
    if not config.backbone_heads:
        unused += 2 * h * config.out_dim + 1
    return unused


def model_parameter_count(config: M2Config, tensor_model_parallel_size: int = 1) -> int:
    """Parameters of our full model (all TP ranks / PP stages together), vocab padding included."""
    padding = padded_vocab_size(config.vocab_size, tensor_model_parallel_size) - config.vocab_size
    return official_parameter_count(config) - official_unused_parameter_count(config) + padding * config.hidden_size


def model_flops_per_sample(config: M2Config, masked: MaskedPasses = MaskedPasses()) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one image-text pair, matmuls only.

    Per layer and token: 2 x (4h^2 + 2hf) for the projections and 4 s h for attention scores and context.
    Backbone: image tokens go through the vision copy, text tokens through the text copy; the VL layers see both.
    Masked modelling (`masked`): the masked copies of the image (CMIM) and caption (CMLM) go through the backbone
    towers again (not the VL layers); each decoder layer adds cross-attention (q and output projections per query,
    k and v per key, 4 s_q s_kv h for scores and context) to a layer; CMLM's vocabulary head runs on the masked
    tokens only (text_mask_prob of the caption), CMIM's pixel head on the masked patches.
    """
    h, f = config.hidden_size, config.ffn_hidden_size
    s_img, s_txt = config.vision_seq_length, config.max_text_length

    def layer(tokens: int) -> float:
        return tokens * (2 * (4 * h * h + 2 * h * f) + 4 * tokens * h)

    def decoder_layer(queries: int, keys: int) -> float:
        return layer(queries) + 2 * 2 * h * h * (queries + keys) + 4 * queries * keys * h

    forward = (config.num_layers + config.num_vl_layers) * (layer(s_img) + layer(s_txt))
    forward += 2 * config.num_patches * config.num_channels * config.patch_size**2 * h  # patch embedding
    if masked.cmlm:
        forward += config.num_layers * layer(s_txt) + config.decoder_num_layers * decoder_layer(s_txt, s_img)
        forward += 2 * h * config.vocab_size * masked.text_mask_prob * s_txt
    if masked.cmim:
        forward += config.num_layers * layer(s_img) + config.decoder_num_layers * decoder_layer(s_img, s_txt)
        forward += 2 * h * config.num_channels * config.patch_size**2 * masked.image_mask_ratio * config.num_patches
    return 3.0 * forward


@dataclass(frozen=True)
class Gemm:
    """`count` matrix products of [m, k] x [k, n] (forward), as one tensor-parallel rank computes them."""

    name: str
    m: int
    n: int
    k: int
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


def layer_gemms(config: M2Config, seq_length: int, micro_batch_size: int, tensor_model_parallel_size: int = 1,
                copies: int = 1) -> list[Gemm]:
    """The forward GEMMs of `copies` layer copies on one TP rank, for a micro-batch of sequences of seq_length.

    megatron-core's shapes: fused qkv and fc1 are column-parallel (output split over TP), out_proj and fc2
    row-parallel (input split); attention is batched over micro-batch x local heads. Backward runs each GEMM twice
    more with the same three dimensions (data and weight gradients), so the dimensions set its efficiency.
    """
    h, f, t = config.hidden_size, config.ffn_hidden_size, tensor_model_parallel_size
    tokens, head_dim = micro_batch_size * seq_length, h // config.num_attention_heads
    heads = micro_batch_size * config.num_attention_heads // t
    return [Gemm("qkv", tokens, 3 * h // t, h, copies),
            Gemm("attention scores", seq_length, seq_length, head_dim, copies * heads),
            Gemm("attention context", seq_length, head_dim, seq_length, copies * heads),
            Gemm("out_proj", tokens, h, h // t, copies),
            Gemm("fc1", tokens, f // t, h, copies),
            Gemm("fc2", tokens, h, f // t, copies)]


def stage_gemms(config: M2Config, micro_batch_size: int, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1, stage: int = 0,
                masked: MaskedPasses = MaskedPasses()) -> list[Gemm]:
    """Forward GEMMs of one micro-batch on one GPU of a pipeline stage (the matmuls `model_flops_per_sample`
    counts): the patch embedding on the first stage (replicated over TP), both towers' layers of the stage, the VL
    layers (each applied to both modalities) on the last. With `masked` (the forward-backward pass of CMLM / CMIM):
    a tower with a masked stream runs its backbone layers over both streams side by side along the batch (twice the
    rows, models/m2_model.py), and the last stage adds the decoders and their heads."""
    backbone = layers_per_stage(config, pipeline_model_parallel_size)[stage]
    last = stage == pipeline_model_parallel_size - 1
    vl = config.num_vl_layers if last else 0
    b, t, h = micro_batch_size, tensor_model_parallel_size, config.hidden_size
    gemms = []
    if stage == 0:
        gemms.append(Gemm("patch embedding", b * config.num_patches, h, config.num_channels * config.patch_size**2))
    for tower, seq, with_masked in (("vision", config.vision_seq_length, masked.cmim),
                                    ("text", config.max_text_length, masked.cmlm)):
        if with_masked:
            gemms += [replace(g, name=f"{tower} + masked {tower} {g.name}")
                      for g in layer_gemms(config, seq, 2 * b, t, backbone)]
            gemms += [replace(g, name=f"{tower} {g.name}") for g in layer_gemms(config, seq, b, t, vl)]
        else:
            gemms += [replace(g, name=f"{tower} {g.name}") for g in layer_gemms(config, seq, b, t, backbone + vl)]
    if last:
        gemms += decoder_gemms(config, b, t, masked)
    return [g for g in gemms if g.count]


def decoder_gemms(config: M2Config, micro_batch_size: int, tensor_model_parallel_size: int,
                  masked: MaskedPasses) -> list[Gemm]:
    """The forward GEMMs of the cross-modal decoders and heads (models/decoders.py) for one micro-batch on one TP
    rank: per decoder layer a layer's GEMMs over its queries plus cross-attention (q over the queries, k and v over
    the other tower's states, scores and context, the output projection); CMLM's vocabulary head over the expected
    masked tokens, CMIM's pixel head over the masked patches."""
    b, t, h, n = micro_batch_size, tensor_model_parallel_size, config.hidden_size, config.decoder_num_layers
    s_img, s_txt = config.vision_seq_length, config.max_text_length
    head_dim, heads = h // config.num_attention_heads, b * config.num_attention_heads // t
    gemms = []
    for name, queries, keys, on in (("CMLM", s_txt, s_img, masked.cmlm), ("CMIM", s_img, s_txt, masked.cmim)):
        if not on:
            continue
        gemms += [replace(g, name=f"{name} decoder {g.name}") for g in layer_gemms(config, queries, b, t, n)]
        gemms += [Gemm(f"{name} decoder cross q", b * queries, h // t, h, n),
                  Gemm(f"{name} decoder cross kv", b * keys, 2 * h // t, h, n),
                  Gemm(f"{name} decoder cross scores", queries, keys, head_dim, n * heads),
                  Gemm(f"{name} decoder cross context", queries, head_dim, keys, n * heads),
                  Gemm(f"{name} decoder cross out_proj", b * queries, h, h // t, n)]
    if masked.cmlm:
        gemms.append(Gemm("CMLM head", max(1, round(b * s_txt * masked.text_mask_prob)),
                          padded_vocab_size(config.vocab_size, t) // t, h))
    if masked.cmim:
        gemms.append(Gemm("CMIM head", max(1, round(b * config.num_patches * masked.image_mask_ratio)),
                          config.num_channels * config.patch_size**2, h))
    return gemms
