"""Vision tower input: conv patch embedding, a CLS token and learned absolute positions (BEiT-3 VisionEmbedding)."""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_m2.config import M2Config


class VisionEmbedding(MegatronModule):
    """images [b, C, H, W] -> tokens [1 + num_patches, b, hidden] (sequence first, CLS at position 0).

    Replicated across TP ranks (small). The position table has vision_seq_length + position_offset rows and token i
    uses row i + position_offset, as torchscale's PositionalEmbedding does.
    """

    def __init__(self, config: M2Config, transformer_config: TransformerConfig):
        super().__init__(config=transformer_config)
        h, dtype = config.hidden_size, transformer_config.params_dtype
        self.position_offset = config.position_offset
        self.patch_embed = torch.nn.Conv2d(config.num_channels, h, config.patch_size, config.patch_size, dtype=dtype)
        self.cls_token = torch.nn.Parameter(torch.empty(1, 1, h, dtype=dtype))
        self.position_embeddings = torch.nn.Embedding(config.vision_position_table_size, h, dtype=dtype)
        if transformer_config.perform_initialization:
            for weight in (self.cls_token, self.position_embeddings.weight):
                transformer_config.init_method(weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._tokens(self._patches(images))

    def forward_masked(self, images: torch.Tensor, patch_mask: torch.Tensor, mask_token: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of the images and of their masked copies (CMIM): patch_mask [b, patches] (True = masked)
        replaces those patch embeddings by mask_token [hidden] before the positions are added, as BEiT does; one
        patch convolution serves both."""
        patches = self._patches(images)
        masked = torch.where(patch_mask.T.unsqueeze(-1), mask_token.to(patches.dtype), patches)
        return self._tokens(patches), self._tokens(masked)

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2)  # [b, h, patches]
        return x.permute(2, 0, 1)  # [patches, b, h]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(1, x.shape[1], -1), x], dim=0)
        start = self.position_offset
        return x + self.position_embeddings.weight[start:start + x.shape[0]].unsqueeze(1)
