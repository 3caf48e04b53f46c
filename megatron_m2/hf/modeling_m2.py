"""transformers model for M2-Encoder (BEiT-3 style multiway encoder, Magneto Sub-LN).

Self-contained (torch + transformers only): copied into converted folders as remote code, so it must never import
megatron_m2. Semantics follow the official release (torchscale BEiT-3 as used by M2-Encoder):
  layer: x = x + out_proj(inner_attn_norm(attn(attn_norm(x))));  x = x + fc2(ffn_inner_norm(gelu(fc1(ffn_norm(x)))))
  attention: q is scaled by head_dim**-0.5 before q @ k^T, softmax in float32, padded keys masked.
  positions: learned tables indexed from position_offset (2), as fairseq/torchscale do.
The vision copy (A) and text copy (B) of each backbone layer are two separate towers here; the VL layers (official
backbone_vl, A weights) are shared by both modalities. Output heads: CLS of the VL output -> bias-free projection ->
L2 normalise (official itc_vl_*_proj); logits = exp(logit_scale) * cosine, with the official logit_scale, as the
released inference computes them. Optional backbone heads project the CLS of the backbone output (official itc_*_proj).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

try:  # transformers >= 5: init helpers that respect already-loaded weights
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    init = nn.init

from .configuration_m2 import M2EncoderConfig


class M2Attention(nn.Module):
    def __init__(self, config: M2EncoderConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.inner_attn_norm = nn.LayerNorm(h, eps=config.layernorm_epsilon)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, h = x.shape
        split = lambda t: t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(self.q_proj(x) * self.scaling)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2)
        if key_padding_mask is not None:  # True = padding
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, h)
        return self.out_proj(self.inner_attn_norm(ctx))


class M2Layer(nn.Module):
    def __init__(self, config: M2EncoderConfig):
        super().__init__()
        h, f, eps = config.hidden_size, config.ffn_hidden_size, config.layernorm_epsilon
        self.attn_norm = nn.LayerNorm(h, eps=eps)
        self.attn = M2Attention(config)
        self.ffn_norm = nn.LayerNorm(h, eps=eps)
        self.fc1 = nn.Linear(h, f)
        self.ffn_inner_norm = nn.LayerNorm(f, eps=eps)
        self.fc2 = nn.Linear(f, h)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), key_padding_mask)
        return x + self.fc2(self.ffn_inner_norm(F.gelu(self.fc1(self.ffn_norm(x)))))


class M2Encoder(nn.Module):
    """A stack of layers followed by a final LayerNorm (one tower, or the shared VL layers)."""

    def __init__(self, config: M2EncoderConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(M2Layer(config) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return self.final_norm(x)


class M2VisionEmbeddings(nn.Module):
    def __init__(self, config: M2EncoderConfig):
        super().__init__()
        self.position_offset = config.position_offset
        self.patch_embed = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.vision_position_table_size, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        offset = self.position_offset
        return x + self.position_embedding.weight[offset:offset + x.shape[1]]


class M2TextEmbeddings(nn.Module):
    def __init__(self, config: M2EncoderConfig):
        super().__init__()
        self.position_offset = config.position_offset
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.text_position_table_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        offset = self.position_offset
        return self.token_embedding(input_ids) + self.position_embedding.weight[offset:offset + input_ids.shape[1]]


@dataclass
class M2EncoderOutput(ModelOutput):
    """CLIP-style output: L2-normalised embeddings and scaled cosine logits."""

    logits_per_image: Optional[torch.FloatTensor] = None
    logits_per_text: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    loss: Optional[torch.FloatTensor] = None


class M2EncoderPreTrainedModel(PreTrainedModel):
    config_class = M2EncoderConfig
    base_model_prefix = "m2_encoder"
    main_input_name = "pixel_values"
    _no_split_modules = ["M2Layer", "M2VisionEmbeddings", "M2TextEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Conv/Embedding normal(initializer_range), LayerNorm ones/zeros
        if isinstance(module, M2VisionEmbeddings):
            init.normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, M2EncoderModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init)
            if module.backbone_logit_scale is not None:
                init.constant_(module.backbone_logit_scale, self.config.logit_scale_init)


class M2EncoderModel(M2EncoderPreTrainedModel):
    def __init__(self, config: M2EncoderConfig):
        super().__init__(config)
        h = config.hidden_size
        self.vision_embed = M2VisionEmbeddings(config)
        self.text_embed = M2TextEmbeddings(config)
        self.vision_encoder = M2Encoder(config, config.num_layers)
        self.text_encoder = M2Encoder(config, config.num_layers)
        self.vl_encoder = M2Encoder(config, config.num_vl_layers)
        self.image_projection = nn.Linear(h, config.out_dim, bias=False)
        self.text_projection = nn.Linear(h, config.out_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        if config.backbone_heads:
            self.backbone_image_projection = nn.Linear(h, config.out_dim, bias=False)
            self.backbone_text_projection = nn.Linear(h, config.out_dim, bias=False)
            self.backbone_logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        else:
            self.backbone_image_projection = self.backbone_text_projection = self.backbone_logit_scale = None
        self.post_init()

    # -- towers -------------------------------------------------------------------------------------------------
    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone output, VL output) token states of the image tower."""
        x = self.vision_encoder(self.vision_embed(pixel_values.to(self.vision_embed.patch_embed.weight.dtype)))
        return x, self.vl_encoder(x)

    def text_hidden_states(self, input_ids: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone output, VL output) token states of the text tower; attention_mask: 1 = token, 0 = padding."""
        padding = None if attention_mask is None else attention_mask == 0
        x = self.text_encoder(self.text_embed(input_ids), padding)
        return x, self.vl_encoder(x, padding)

    # -- CLIP-style API -----------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.image_projection(self.vision_hidden_states(pixel_values)[1][:, 0])
        return F.normalize(features, dim=-1) if normalize else features

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          normalize: bool = True) -> torch.Tensor:
        features = self.text_projection(self.text_hidden_states(input_ids, attention_mask)[1][:, 0])
        return F.normalize(features, dim=-1) if normalize else features

    def get_backbone_features(self, pixel_values: Optional[torch.Tensor] = None,
                              input_ids: Optional[torch.Tensor] = None,
                              attention_mask: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], ...]:
        """The optional second pair of heads (official itc_{image,text}_proj) on the backbone output."""
        if self.backbone_image_projection is None:
            raise ValueError("this model has no backbone heads (config.backbone_heads=False)")
        image = text = None
        if pixel_values is not None:
            image = F.normalize(self.backbone_image_projection(self.vision_hidden_states(pixel_values)[0][:, 0]), dim=-1)
        if input_ids is not None:
            states = self.text_hidden_states(input_ids, attention_mask)[0]
            text = F.normalize(self.backbone_text_projection(states[:, 0]), dim=-1)
        return image, text

    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, return_loss: bool = False,
                **kwargs) -> M2EncoderOutput:
        image_embeds = self.get_image_features(pixel_values) if pixel_values is not None else None
        text_embeds = self.get_text_features(input_ids, attention_mask) if input_ids is not None else None
        logits_per_image = logits_per_text = loss = None
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.t()
            logits_per_text = logits_per_image.t()
            if return_loss:
                labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
                loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return M2EncoderOutput(logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                               image_embeds=image_embeds, text_embeds=text_embeds, loss=loss)
