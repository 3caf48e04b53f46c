"""Read a released M2-Encoder .ckpt into our HF model's state dict, refusing anything it cannot account for."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from megatron_m2.errors import ConfigError
from megatron_m2.hf.configuration_m2 import M2EncoderConfig
from megatron_m2.hf.key_mapping import (count_official_layers, is_official_extra, official_copied_keys,
                                        official_to_hf_map, official_unused_keys, strip_official_prefix)

log = logging.getLogger(__name__)

# Head counts of the official sizes (0.4B/1B/10B, arXiv 2401.15896): not recoverable from weight shapes.
HEADS_BY_HIDDEN = {768: 12, 1024: 16, 4096: 32}


def load_official_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict inside an official .ckpt (Lightning `state_dict`, or `module`/`model`, or bare)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError:  # mmap needs the new zipfile format; old files load without it
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # pickle.UnpicklingError for Lightning hparams objects
        if allow_pickle:
            raise
        raise ConfigError(f"--checkpoint {path} holds pickled objects that weights_only loading refuses ({exc}); "
                          "if you trust the file, pass --allow-pickle") from exc
    for key in ("state_dict", "module", "model"):
        if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, Mapping):
        raise ConfigError(f"--checkpoint {path}: no state dict found (top level is {type(ckpt).__name__})")
    return strip_official_prefix({k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)})


def config_from_official(state_dict: Mapping[str, torch.Tensor], num_attention_heads: Optional[int] = None,
                         max_text_length: int = 52, **overrides: Any) -> M2EncoderConfig:
    """Shapes read off the weights; the head count from the official size table unless given."""
    try:
        vocab, hidden = state_dict["backbone.text_embed.weight"].shape
        patch = state_dict["backbone.vision_embed.proj.weight"]
        vision_rows = state_dict["backbone.encoder.embed_positions.A.weight"].shape[0]
        text_rows = state_dict["backbone.encoder.embed_positions.B.weight"].shape[0]
        ffn = state_dict["backbone.encoder.layers.0.ffn.A.fc1.weight"].shape[0]
        out_dim = state_dict["itc_vl_image_proj.fc.weight"].shape[0]
    except KeyError as exc:
        raise ConfigError(f"not an M2-Encoder state dict: missing {exc}") from exc
    heads = num_attention_heads or HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise ConfigError(f"hidden size {hidden} is not an official size {sorted(HEADS_BY_HIDDEN)}; "
                          "pass --num-attention-heads")
    position_offset = overrides.pop("position_offset", 2)
    side = math.isqrt(vision_rows - 1 - position_offset)
    if side * side != vision_rows - 1 - position_offset:
        raise ConfigError(f"vision position table has {vision_rows} rows, not a square grid + CLS + "
                          f"{position_offset}")
    num_layers, num_vl_layers = count_official_layers(state_dict)
    backbone_heads = "itc_image_proj.fc.weight" in state_dict and "itc_text_proj.fc.weight" in state_dict
    fields = dict(hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn, num_layers=num_layers,
                  num_vl_layers=num_vl_layers, out_dim=out_dim, patch_size=patch.shape[-1],
                  image_size=side * patch.shape[-1], num_channels=patch.shape[1], vocab_size=vocab,
                  max_text_length=max_text_length, position_offset=position_offset,
                  text_position_table_size=text_rows, backbone_heads=backbone_heads,
                  # the release's validation transform: Resize((size, size), BICUBIC), mean/std 0.5, no crop
                  image_resize_mode="squash", image_interpolation="bicubic", image_mean=[0.5] * patch.shape[1],
                  image_std=[0.5] * patch.shape[1])
    fields.update(overrides)
    return M2EncoderConfig(**fields)


def official_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor],
                              config: M2EncoderConfig) -> dict[str, torch.Tensor]:
    """Rename every needed key; error listing missing and unknown keys; log the known-unused ones."""
    mapping = official_to_hf_map(config)
    unused = official_unused_keys(config)
    present = set(state_dict)
    missing = sorted(set(mapping) - present)
    unknown = sorted(k for k in present - set(mapping) - unused if not is_official_extra(k))
    if missing or unknown:
        raise ConfigError(f"official checkpoint does not match an M2-Encoder with {config.num_layers}+"
                          f"{config.num_vl_layers} layers: missing keys {missing}; unknown keys {unknown}")
    ignored = sorted(present - set(mapping))
    if ignored:
        log.info("known unused official keys (%d, not imported): %s", len(ignored), ", ".join(ignored))
    out = {}
    pairs = list(mapping.items()) + [(o, h) for h, o in official_copied_keys(config).items()]
    for official_key, hf_key in pairs:
        value = state_dict[official_key]
        out[hf_key] = value.reshape(()) if hf_key.endswith("logit_scale") else value
    return out
