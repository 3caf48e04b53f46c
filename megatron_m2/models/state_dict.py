"""The full "canonical" state dict <-> the state dict of one TP rank / PP stage of M2PipelineStage.

Canonical = the local-spec model at TP=1, PP=1: our module names, global layer indices, no `_extra_state`, the token
embedding WITHOUT vocab padding (exactly config.vocab_size rows). The fused QKV follows megatron-core's layout: per
attention head h, rows [q_h; k_h; v_h] (head_dim rows each); `split_qkv` / `fuse_qkv` convert to separate q/k/v.

Sharding rules (megatron's): column-parallel linear_qkv / linear_fc1 (weight, bias) and the Sub-LN weight/bias split
dim 0; row-parallel linear_proj / linear_fc2 weights split dim 1 (their biases replicated); the token embedding is
padded to padded_vocab_size(vocab, TP) and split dim 0; everything else is replicated. PP: embeddings on the first
stage, tower layers by layers_per_stage, tower final LNs, VL layers, heads and logit scales on the last stage.
The masked-modelling parts (models/decoders.py) follow the same rules: the cross-attention's column-parallel
linear_q / linear_kv split dim 0, the CMLM output layer is padded and split like the token embedding; the decoders sit
on the last stage and the CMIM mask token on the first.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from megatron_m2.config import M2Config, layers_per_stage, padded_vocab_size

_TP_SPLIT_DIM = (
    (re.compile(r"\.linear_qkv\.(weight|bias)$"), 0),
    (re.compile(r"\.linear_fc1\.(weight|bias)$"), 0),
    (re.compile(r"\.(linear_q|linear_kv)\.(weight|bias)$"), 0),
    (re.compile(r"\.(linear_proj|linear_fc2)\.layer_norm\.(weight|bias)$"), 0),
    (re.compile(r"\.(linear_proj|linear_fc2)\.linear\.weight$"), 1),
    (re.compile(r"^text_embed\.word_embeddings\.weight$"), 0),
    (re.compile(r"^decoders\.cmlm_head\.weight$"), 0),
)
_TOWER_LAYER = re.compile(r"^(vision_encoder|text_encoder)\.layers\.(\d+)\.(.*)$")
WORD_EMBEDDINGS = "text_embed.word_embeddings.weight"
# tensors with a row per (padded) vocabulary entry
VOCAB_ROWS = (WORD_EMBEDDINGS, "decoders.cmlm_head.weight")
FIRST_STAGE_PREFIXES = ("vision_embed.", "text_embed.", "cmim_mask_token")
# local spec name -> te spec name (TE fuses the pre-LNs into the following column-parallel linear)
_TE_RENAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def tp_split_dim(key: str) -> Optional[int]:
    """The dimension a canonical tensor is split along under TP, or None if replicated."""
    for pattern, dim in _TP_SPLIT_DIM:
        if pattern.search(key):
            return dim
    return None


def _stage_ranges(config: M2Config, pp: int) -> list[tuple[int, int]]:
    counts = layers_per_stage(config, pp)
    starts = [sum(counts[:s]) for s in range(pp)]
    return [(start, start + count) for start, count in zip(starts, counts)]


def _local_key(key: str, config: M2Config, pp_rank: int, pp: int) -> Optional[str]:
    """The key of a canonical tensor in stage pp_rank's module, or None if that stage does not hold it."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    if key.startswith(FIRST_STAGE_PREFIXES):
        return key if first else None
    match = _TOWER_LAYER.match(key)
    if match:
        tower, index, rest = match.group(1), int(match.group(2)), match.group(3)
        start, end = _stage_ranges(config, pp)[pp_rank]
        return f"{tower}.layers.{index - start}.{rest}" if start <= index < end else None
    return key if last else None


def _canonical_key(local_key: str, config: M2Config, pp_rank: int, pp: int) -> str:
    match = _TOWER_LAYER.match(local_key)
    if not match:
        return local_key
    start = _stage_ranges(config, pp)[pp_rank][0]
    return f"{match.group(1)}.layers.{int(match.group(2)) + start}.{match.group(3)}"


def _to_te(key: str) -> str:
    for local, te in _TE_RENAMES.items():
        key = key.replace(f".{local}", f".{te}")
    return key


def _from_te(key: str) -> str:
    for local, te in _TE_RENAMES.items():
        key = key.replace(f".{te}", f".{local}")
    return key


def shard_state_dict(full: Mapping[str, torch.Tensor], config: M2Config, tp_rank: int = 0, tp: int = 1,
                     pp_rank: int = 0, pp: int = 1, spec: str = "local") -> dict[str, torch.Tensor]:
    """The part of a canonical state dict that TP rank `tp_rank` of PP stage `pp_rank` holds, under its local names.

    Load it with `model.load_state_dict(local, strict=False)` and check the returned missing keys are only
    `_extra_state` (see `load_canonical_state_dict`).
    """
    local = {}
    for key, value in full.items():
        local_key = _local_key(key, config, pp_rank, pp)
        if local_key is None:
            continue
        if key in VOCAB_ROWS:
            pad = padded_vocab_size(config.vocab_size, tp) - value.shape[0]
            value = torch.cat([value, value.new_zeros(pad, value.shape[1])]) if pad > 0 else value
        dim = tp_split_dim(key)
        if dim is not None:
            value = value.chunk(tp, dim=dim)[tp_rank]
        local[_to_te(local_key) if spec == "te" else local_key] = value.clone()
    return local


def unshard_state_dicts(locals_: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], config: M2Config,
                        tp: int = 1, pp: int = 1, spec: str = "local") -> dict[str, torch.Tensor]:
    """Inverse of shard_state_dict: {(tp_rank, pp_rank): local state dict} -> canonical state dict.

    Also works for any per-parameter dict with the same keys (e.g. gradients). `_extra_state` entries are dropped.
    """
    full: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        for key in locals_[(0, pp_rank)]:
            if key.endswith("_extra_state"):
                continue
            canonical = _canonical_key(_from_te(key) if spec == "te" else key, config, pp_rank, pp)
            parts = [locals_[(tp_rank, pp_rank)][key] for tp_rank in range(tp)]
            dim = tp_split_dim(canonical)
            value = parts[0] if dim is None else torch.cat(parts, dim=dim)
            if canonical in VOCAB_ROWS:
                value = value[:config.vocab_size]
            full[canonical] = value.detach().clone()
    return full


def canonical_state_dict(model: torch.nn.Module, config: M2Config) -> dict[str, torch.Tensor]:
    """The canonical state dict of a TP=1 / PP=1 model (drops `_extra_state` and the vocab padding)."""
    return unshard_state_dicts({(0, 0): model.state_dict()}, config, spec=getattr(model, "spec", "local"))


def load_canonical_state_dict(model: torch.nn.Module, full: Mapping[str, torch.Tensor], config: M2Config,
                              tp_rank: int = 0, tp: int = 1, pp_rank: int = 0, pp: int = 1) -> None:
    """Copy a canonical state dict into this rank's module; every parameter must be covered."""
    local = shard_state_dict(full, config, tp_rank, tp, pp_rank, pp, spec=getattr(model, "spec", "local"))
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"canonical state dict does not fit this stage: missing {missing}, unexpected {unexpected}")


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused QKV weight [3h, in] or bias [3h] -> separate q, k, v ([h, in] / [h])."""
    per_head = fused.reshape(num_heads, 3, fused.shape[0] // (3 * num_heads), *fused.shape[1:])
    return tuple(per_head[:, i].reshape(-1, *fused.shape[1:]) for i in range(3))  # type: ignore[return-value]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q, k, v weights [h, in] or biases [h] -> megatron's fused layout [3h, ...]."""
    heads = [t.reshape(num_heads, t.shape[0] // num_heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(heads, dim=1).reshape(-1, *q.shape[1:])
