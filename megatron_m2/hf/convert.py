"""megatron-core dist checkpoint <-> Hugging Face folder.

to HF: streamed. Tensors are read from the checkpoint one at a time (per layer for the stacked block tensors, see
megatron_io.DistCheckpointReader) and appended to a safetensors shard that is flushed to disk once it reaches
max_shard_size, so peak memory is about max_shard_size + twice the largest single tensor (dcp reads a stored chunk
whole, then copies the requested block out of it), whatever the model size.
from HF: the state is written through a TP=1/PP=1 megatron model's own sharded_state_dict() (so keys, layer axes and
TransformerEngine _extra_state entries are exactly what training loads); a dist checkpoint holds global tensors, so
it loads at any TP/PP (the word embedding is padded for the requested TP; megatron also accepts other paddings).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from megatron_m2.config import DECODER_FIELDS, M2Config, padded_vocab_size, validate_parallel_shapes
from megatron_m2.errors import ConfigError
from megatron_m2.hf.configuration_m2 import M2EncoderConfig
from megatron_m2.progress_line import ProgressLine, format_duration
from megatron_m2.hf.key_mapping import (MEGATRON_LAYER_KEYS, QKV_KEYS, VOCAB_KEY, is_megatron_model_key,
                                        megatron_layer_keys, megatron_top_keys, tower_layers)
from megatron_m2.hf.megatron_io import DistCheckpointReader
from megatron_m2.models.m2_model import M2PipelineStage
from megatron_m2.models.state_dict import fuse_qkv, split_qkv

M2_FIELDS = tuple(M2Config.__dataclass_fields__)


def hf_config_from_m2(config: M2Config) -> M2EncoderConfig:
    """The HF config of a model: every field but those of the training-only decoders, which the HF model lacks."""
    fields = {k: v for k, v in config.to_dict().items() if k not in DECODER_FIELDS}
    return M2EncoderConfig(initializer_range=fields.pop("init_method_std"), **fields)


def m2_config_from_hf(config: M2EncoderConfig) -> M2Config:
    """The megatron config of an HF model; decoder fields (absent in HF folders) take their defaults."""
    return M2Config(**{name: getattr(config, "initializer_range" if name == "init_method_std" else name)
                       for name in M2_FIELDS if name not in DECODER_FIELDS})


def decoder_keys(reader: DistCheckpointReader) -> list[str]:
    """The checkpoint's tensors of the training-only masked-modelling parts (decoders, heads, the image mask token),
    which a Hugging Face export leaves out."""
    return sorted(k for k in reader.shapes if is_megatron_model_key(k) and M2PipelineStage.is_decoder_parameter(k))


def parse_size(size: Union[int, str]) -> int:
    """'5GB' / '200MB' / '100KB' / bytes -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    units = {"GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--max-shard-size {size!r}: use e.g. 5GB, 500MB or a byte count")


class ShardedSafetensorsWriter:
    """Append tensors; flush a shard file whenever max_shard_size is reached; finish() names the shards and writes
    model.safetensors.index.json (or a single model.safetensors), as transformers' save_pretrained does."""

    def __init__(self, folder: Union[str, Path], max_shard_size: Union[int, str] = "5GB"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # weights from an earlier conversion into this folder would shadow or mix with ours
        for stale in (*self.folder.glob("model*.safetensors"), *self.folder.glob(".shard-*.tmp"),
                      *self.folder.glob("model.safetensors.index.json")):
            stale.unlink()
        self.max_bytes = parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, keys), name in zip(self.shards, names):
            os.replace(tmp, self.folder / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.folder / name for name in names]


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def check_megatron_keys(reader: DistCheckpointReader, config: M2Config) -> None:
    """Every needed tensor present with the config's shapes; no unknown model tensor (error lists them)."""
    expected = set(_needed_keys(config))
    present = {k for k in reader.shapes if is_megatron_model_key(k)} - set(decoder_keys(reader))
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        raise ConfigError(f"checkpoint {reader.path} does not match the model config: missing {missing}; "
                          f"unknown {unknown} (pass the right --model?)")
    for tower, n in tower_layers(config).items():
        rows = reader.shapes[f"{tower}.layers.mlp.linear_fc1.weight"][0][0]
        if rows != n:
            raise ConfigError(f"checkpoint {reader.path}: {tower} has {rows} layers, the model config {n}")
    vocab_rows, hidden = reader.shapes[VOCAB_KEY][0]
    if vocab_rows < config.vocab_size or hidden != config.hidden_size:
        raise ConfigError(f"checkpoint {reader.path}: word embedding {vocab_rows}x{hidden}, the model config has "
                          f"vocab {config.vocab_size}, hidden {config.hidden_size}")


def _needed_keys(config: M2Config) -> list[str]:
    return list(megatron_top_keys(config)) + [f"{tower}.layers.{sub}" for tower, n in tower_layers(config).items()
                                              if n for sub in megatron_layer_keys()]


def select_weights(reader: DistCheckpointReader, config: M2Config, from_master_weights: Optional[bool] = None
                   ) -> tuple[dict[str, str], str]:
    """Which stored tensor to export for each model tensor, and a sentence saying which weights that is.

    from_master_weights: None (the default) = the fp32 master weights where the checkpoint has them (a bf16 run's
    optimizer state), else the model weights; True = the same, but an error when a reduced-precision checkpoint has
    no readable master weights; False = the model weights as stored."""
    needed = _needed_keys(config)
    dtypes = sorted({str(reader.shapes[k][1]).removeprefix("torch.") for k in needed if k in reader.shapes})
    stored = "/".join(dtypes)
    if from_master_weights is False:
        return {}, f"the checkpoint's {stored} model weights (--no-from-master-weights)"
    reduced = [k for k in needed if k in reader.shapes and reader.shapes[k][1] != torch.float32]
    if not reduced:
        return {}, f"the checkpoint's {stored} model weights (a float32 run: they are the master weights)"
    masters = reader.master_weight_keys()
    chosen = {k: masters[k] for k in needed if k in masters}
    if not chosen:
        if reader.has_bucketed_optimizer_state:
            why = ("its fp32 master weights are in the distributed optimizer's bucket buffers (dp_reshardable), "
                   "which cannot be mapped to tensors without the training layout")
        else:
            why = "it holds no fp32 master weights (saved without optimizer state?)"
        if from_master_weights:
            raise ConfigError(f"--from-master-weights: checkpoint {reader.path}: {why}; pass --no-from-master-weights "
                              f"to export its {stored} model weights")
        return {}, f"the checkpoint's {stored} model weights: {why}"
    without = [k for k in reduced if k not in chosen]
    note = (f"; {len(without)} tensor(s) have no master copy (not trained, e.g. --freeze-vision) and keep their "
            f"{stored} weights: {', '.join(without[:4])}{' ...' if len(without) > 4 else ''}" if without else "")
    return chosen, f"the fp32 master weights from the optimizer state of this {stored} checkpoint{note}"


def megatron_to_hf_tensors(reader: DistCheckpointReader, config: M2Config,
                           dtype: Optional[torch.dtype] = None, progress: Optional[Callable[[int], None]] = None,
                           weight_keys: Optional[dict[str, str]] = None):
    """Yield (hf_key, tensor) streaming from the checkpoint; `progress(n)` after each megatron tensor read.

    weight_keys: model tensor key -> the stored tensor to read instead (select_weights: its fp32 master copy)."""
    check_megatron_keys(reader, config)
    weight_keys = weight_keys or {}

    def load(key: str, index: Optional[int] = None) -> torch.Tensor:
        return reader.load(weight_keys.get(key, key), index=index)

    for mkey, hkey in megatron_top_keys(config).items():
        tensor = load(mkey)
        if mkey == VOCAB_KEY:
            tensor = tensor[:config.vocab_size]
        yield hkey, _cast(tensor, dtype)
        if progress:
            progress(1)
    for tower, n in tower_layers(config).items():
        for i in range(n):
            prefix = f"{tower}.layers.{i}."
            for hsub, msub in MEGATRON_LAYER_KEYS.items():
                yield prefix + hsub, _cast(load(f"{tower}.layers.{msub}", index=i), dtype)
            for msub, hsubs in QKV_KEYS.items():
                parts = split_qkv(load(f"{tower}.layers.{msub}", index=i), config.num_attention_heads)
                for hsub, part in zip(hsubs, parts):
                    yield prefix + hsub, _cast(part.clone(), dtype)
            if progress:
                progress(1)


def count_read_steps(config: M2Config) -> int:
    return len(megatron_top_keys(config)) + sum(tower_layers(config).values())


def megatron_config_from_checkpoint(reader: DistCheckpointReader, model: Optional[str] = None) -> M2Config:
    """The model config saved in the checkpoint (common state), or --model (a preset or JSON) when given."""
    from megatron_m2.config import load_config

    if model is not None:
        return load_config(model)
    saved = reader.common().get("model_config")
    if not saved:
        raise ConfigError(f"checkpoint {reader.path} holds no model_config: pass --model (preset or JSON)")
    return M2Config(**saved)


# ---- HF -> megatron -------------------------------------------------------------------------------------------------

def hf_to_megatron_sharded_state(hf_state: dict[str, torch.Tensor], config: M2Config,
                                 tensor_model_parallel_size: int = 1) -> dict[str, Any]:
    """Fill a TP=1/PP=1 megatron model (needs initialize_model_parallel(1, 1)) and return its sharded state dict,
    with the word embedding padded for the requested TP. Every HF tensor must be consumed (else error)."""
    import dataclasses

    from megatron_m2.models import build_model

    model = build_model(config, spec="local", perform_initialization=False)  # every tensor is filled below
    sharded = model.sharded_state_dict()
    top = megatron_top_keys(config)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise ConfigError(f"HF state dict lacks {key}")
        used.add(key)
        return hf_state[key]

    out = {}
    progress = ProgressLine("HF -> megatron: filling the model", len(sharded), "tensors")
    for name, st in sharded.items():
        progress.update()
        if not hasattr(st, "key") or not hasattr(st, "data") or not is_megatron_model_key(st.key):
            out[name] = st
            continue
        with torch.no_grad():
            if st.key in top:
                value = take(top[st.key])
                if st.key == VOCAB_KEY:
                    rows = padded_vocab_size(config.vocab_size, tensor_model_parallel_size)
                    padded = torch.zeros(rows, value.shape[1], dtype=st.data.dtype)
                    padded[:config.vocab_size] = value
                    st = dataclasses.replace(st, data=padded, local_shape=tuple(padded.shape),
                                             global_shape=tuple(padded.shape))
                else:
                    st.data.copy_(value.reshape(st.data.shape))
            else:
                tower, sub = st.key.split(".layers.", 1)
                layer = st.global_offset[0]  # the stacked layer axis (prepend_axis_num=1)
                prefix = f"{tower}.layers.{layer}."
                if sub in QKV_KEYS:
                    q, k, v = (take(prefix + h) for h in QKV_KEYS[sub])
                    st.data.copy_(fuse_qkv(q, k, v, config.num_attention_heads))
                else:
                    hsub = {m: h for h, m in MEGATRON_LAYER_KEYS.items()}[sub]
                    st.data.copy_(take(prefix + hsub))
        out[name] = st
    progress.close()
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ConfigError(f"HF tensors with no place in the megatron model: {unused}")
    return out


def save_megatron_checkpoint(sharded_state: dict[str, Any], config: M2Config, root: Union[str, Path],
                             iteration: int = 0) -> Path:
    """Write ROOT/iter_NNNNNNN in the training loop's layout (complete marker + tracker), single process."""
    from megatron.core import dist_checkpointing

    from megatron_m2.checkpoint_layout import checkpoint_dir, publish, staging_dir

    final = checkpoint_dir(str(root), iteration)
    if final.exists():
        raise ConfigError(f"--save {root}: {final} already exists")
    tmp = staging_dir(root, iteration)
    tmp.mkdir(parents=True)
    state = {"model": sharded_state, "iteration": iteration, "model_config": config.to_dict(),
             "converted_from_hf": True}
    start = time.perf_counter()
    print(f"writing the megatron checkpoint {final} ...", flush=True)
    dist_checkpointing.save(state, str(tmp))
    path = publish(root, iteration)
    print(f"wrote {path} in {format_duration(time.perf_counter() - start)}", flush=True)
    return path


def hf_to_megatron(hf_state: dict[str, torch.Tensor], config: M2Config, root: Union[str, Path],
                   tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> Path:
    """HF state dict -> megatron dist checkpoint under root (iteration 0) loadable at the given TP/PP."""
    from megatron_m2 import parallel

    validate_parallel_shapes(config, tensor_model_parallel_size, pipeline_model_parallel_size)
    parallel.initialize_model_parallel(1, 1)
    return save_megatron_checkpoint(hf_to_megatron_sharded_state(hf_state, config, tensor_model_parallel_size),
                                    config, root)
