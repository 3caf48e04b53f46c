"""transformers config for M2-Encoder.

Self-contained (torch + transformers only): this file is copied into converted folders as remote code.
Field names equal megatron_m2.config.M2Config (its init_method_std is `initializer_range` here, the transformers
name); megatron_m2.hf.convert maps one to the other. The image_* fields record how images are preprocessed for this
model (image_processing_m2.M2ImageProcessor is written from them); folders without them get the "crop" default.
"""
from __future__ import annotations

import math
from typing import Sequence

from transformers import PretrainedConfig


class M2EncoderConfig(PretrainedConfig):
    model_type = "m2_encoder"

    def __init__(
        self,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        ffn_hidden_size: int = 4096,
        num_layers: int = 21,
        num_vl_layers: int = 3,
        out_dim: int = 1024,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        vocab_size: int = 115244,
        max_text_length: int = 52,
        position_offset: int = 2,
        text_position_table_size: int = 1024,
        layernorm_epsilon: float = 1e-5,
        logit_scale_init: float = math.log(1 / 0.07),
        backbone_heads: bool = False,
        initializer_range: float = 0.02,
        image_resize_mode: str = "crop",
        image_interpolation: str = "bicubic",
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.num_layers = num_layers
        self.num_vl_layers = num_vl_layers
        self.out_dim = out_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.vocab_size = vocab_size
        self.max_text_length = max_text_length
        self.position_offset = position_offset
        self.text_position_table_size = text_position_table_size
        self.layernorm_epsilon = layernorm_epsilon
        self.logit_scale_init = logit_scale_init
        self.backbone_heads = backbone_heads
        self.initializer_range = initializer_range
        self.image_resize_mode = image_resize_mode  # "crop" (shorter side + center crop) or "squash" (the release)
        self.image_interpolation = image_interpolation
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_position_table_size(self) -> int:
        return self.num_patches + 1 + self.position_offset
