"""The training-only cross-modal decoders of M2-Encoder's masked-modelling objectives (arXiv 2401.15896, after SyCoCa,
arXiv 2401.02137). The released weights hold none of this; the Hugging Face export leaves it out.

- CMLM (image-to-text decoder): queries = the text tower's states of the MASKED caption, keys/values = the vision
  tower's states of the (unmasked) image. A bias-free output layer over the vocabulary scores the masked positions only
  (torchscale's Decoder.output_projection, normal init with std hidden^-1/2; untied from the token embedding, as the
  MLM head of VLMo, the release's training code base). It is a ColumnParallelLinear over the padded vocabulary, so the
  logits stay split over TP for megatron's vocab-parallel cross-entropy (megatron_m2/masked_loss.py).
- CMIM (text-to-image decoder): queries = the vision tower's states of the MASKED image (a learned mask token in place
  of the masked patch embeddings, `M2PipelineStage.cmim_mask_token` on the first stage), keys/values = the text tower's
  states of the (unmasked) caption, padding masked. A linear head predicts each masked patch's pixels (MAE's
  decoder_pred), replicated over TP (it is small).

Each decoder is a megatron TransformerBlock of `config.decoder_num_layers` decoder layers (layer_spec.py:
self-attention, cross-attention, FFN, Sub-LN), with a final LayerNorm, at the towers' width; tower states enter after
the towers' final LayerNorms. Both sit on the last pipeline stage, beside the VL layers and the ITC heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from megatron_m2.config import M2Config, padded_vocab_size
from megatron_m2.models.drop_path import drop_path_rates
from megatron_m2.models.layer_spec import get_decoder_layer_spec, get_final_norm_spec

Mask = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None]


@dataclass
class MaskedInputs:
    """What the masked streams need (data/masking.py draws them per sample); either objective may be absent."""

    text_ids: Optional[torch.Tensor] = None  # [b, L] the caption with its masked tokens replaced (CMLM)
    text_targets: Optional[torch.Tensor] = None  # [b, L] bool: the positions CMLM predicts
    image_patches: Optional[torch.Tensor] = None  # [b, patches] bool: the patches CMIM masks and predicts

    @property
    def cmlm(self) -> bool:
        return self.text_ids is not None

    @property
    def cmim(self) -> bool:
        return self.image_patches is not None


@dataclass
class MaskedPredictions:
    """The last stage's masked-modelling outputs, in (sample, position) order of the masks' True entries."""

    cmlm_logits: Optional[torch.Tensor] = None  # [masked tokens, padded vocab / TP]: this TP rank's vocabulary slice
    cmim_pixels: Optional[torch.Tensor] = None  # [masked patches, patch_size^2 x channels]


def select(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [s, b, h], mask [b, s] -> the rows where mask is True, [n, h], in (sample, position) order."""
    return hidden.transpose(0, 1)[mask]


def decoder_block(config: M2Config, transformer_config: TransformerConfig, spec: str,
                  drop_path_rate: float = 0.0) -> TransformerBlock:
    """One cross-modal decoder: `decoder_num_layers` decoder layers and a final LayerNorm, numbered from 0 (it is
    never split over pipeline stages); stochastic depth over its own depth, as torchscale's Decoder."""
    import dataclasses

    n = config.decoder_num_layers
    block_config = dataclasses.replace(transformer_config, num_layers=n, pipeline_model_parallel_size=1,
                                       num_layers_in_first_pipeline_stage=None,
                                       num_layers_in_last_pipeline_stage=None)
    layer = get_decoder_layer_spec(spec, drop_path_rates(drop_path_rate, n))
    return TransformerBlock(block_config, TransformerBlockSubmodules([layer] * n, get_final_norm_spec(spec)),
                            post_layer_norm=True, pre_process=True, post_process=True)


class CrossModalDecoders(MegatronModule):
    """The CMLM and/or CMIM decoder with its head (see the module docstring); on the last pipeline stage."""

    def __init__(self, config: M2Config, transformer_config: TransformerConfig, spec: str, cmlm: bool, cmim: bool,
                 drop_path_rate: float = 0.0):
        super().__init__(config=transformer_config)
        if not (cmlm or cmim):
            raise ValueError("CrossModalDecoders needs CMLM, CMIM or both")
        tc, h = transformer_config, config.hidden_size
        self.spec = spec
        if cmlm:
            self.cmlm_decoder = decoder_block(config, tc, spec, drop_path_rate)
            self.cmlm_head = ColumnParallelLinear(
                h, padded_vocab_size(config.vocab_size, tc.tensor_model_parallel_size), config=tc,
                init_method=init_method_normal(h ** -0.5), bias=False, gather_output=False)
        if cmim:
            self.cmim_decoder = decoder_block(config, tc, spec, drop_path_rate)
            self.cmim_head = torch.nn.Linear(h, config.patch_size ** 2 * config.num_channels, dtype=tc.params_dtype)
            if tc.perform_initialization:
                tc.init_method(self.cmim_head.weight)
                torch.nn.init.zeros_(self.cmim_head.bias)

    def _masks(self, query_padding: Optional[torch.Tensor], key_padding: Optional[torch.Tensor], batch: int,
               query_length: int, key_length: int, device) -> tuple[Mask, Mask]:
        """(self-attention mask, cross-attention mask), key-padding style ([b, 1, 1, s], True = masked).

        The local attention takes the keys' mask (None: nothing masked); TE's padding attention wants explicit masks,
        and for cross-attention the (query, key) pair."""
        def as_mask(padding: Optional[torch.Tensor], length: int) -> Optional[torch.Tensor]:
            if padding is not None:
                return padding.to(device=device, dtype=torch.bool)[:, None, None, :]
            if self.spec == "te":
                return torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
            return None

        queries, keys = as_mask(query_padding, query_length), as_mask(key_padding, key_length)
        return queries, ((queries, keys) if self.spec == "te" else keys)

    def forward(self, image_h: torch.Tensor, text_h: torch.Tensor, text_padding_mask: Optional[torch.Tensor],
                masked_image_h: Optional[torch.Tensor], masked_text_h: Optional[torch.Tensor],
                masked: MaskedInputs) -> MaskedPredictions:
        """image_h / text_h: the towers' states of the unmasked streams ([S, b, h], after their final LayerNorms);
        masked_*_h: those of the masked streams; text_padding_mask [b, L] (True = padding) or None."""
        predictions = MaskedPredictions()
        batch = image_h.shape[1]
        if masked.cmlm:
            self_mask, cross_mask = self._masks(text_padding_mask, None, batch, text_h.shape[0], image_h.shape[0],
                                                text_h.device)
            decoded = self.cmlm_decoder(masked_text_h, self_mask, context=image_h, context_mask=cross_mask)
            logits, _ = self.cmlm_head(select(decoded, masked.text_targets).unsqueeze(1))
            predictions.cmlm_logits = logits.squeeze(1)
        if masked.cmim:
            self_mask, cross_mask = self._masks(None, text_padding_mask, batch, image_h.shape[0], text_h.shape[0],
                                                image_h.device)
            decoded = self.cmim_decoder(masked_image_h, self_mask, context=text_h, context_mask=cross_mask)
            predictions.cmim_pixels = self.cmim_head(select(decoded[1:], masked.image_patches))  # no CLS
        return predictions
