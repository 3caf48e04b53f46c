"""Streaming access to megatron-core dist checkpoints.

A torch_dist checkpoint stores every tensor as ONE global tensor (the TP shards and PP stages it was saved from are
only sharding metadata), so reading it needs neither the model nor the original layout: `DistCheckpointReader`
loads one global tensor at a time with torch.distributed.checkpoint, which bounds memory to the largest tensor
(plus the HF tensors derived from it) whatever TP/PP wrote the checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_m2.checkpoint_layout import TRACKER, checkpoint_dir, latest_iteration
from megatron_m2.errors import ConfigError


def resolve_checkpoint_dir(path: str | Path, iteration: Optional[int] = None) -> Path:
    """A checkpoint root (with the tracker file / iter_NNNNNNN dirs) or one iteration directory -> that directory."""
    path = Path(path)
    if (path / "metadata.json").exists() or (path / ".metadata").exists():
        return path
    if iteration is None:
        iteration = latest_iteration(path)
        if iteration is None:
            raise ConfigError(f"--load {path}: neither a dist checkpoint directory (no .metadata) nor a checkpoint "
                              f"root (no {TRACKER} and no complete iter_NNNNNNN directory)")
    out = checkpoint_dir(path, iteration)
    if not (out / ".metadata").exists():
        raise ConfigError(f"--load {path}: {out} is not a complete torch_dist checkpoint")
    return out


def _slice_planner(offsets: dict[str, tuple[int, ...]]):
    """A load planner that reads a sub-block (at `offsets`, of the destination tensor's shape) of a global tensor."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            requests = []
            for fqn, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=tensor.size())
                requests += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(requests)

        def lookup_tensor(self, index):
            # dest_index carries the block's global offset; our destination is a plain tensor holding just the block
            return self.state_dict[index.fqn]

    return SlicePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


# megatron-core's mixed-precision optimizer (Float16OptimizerWithFloat16Params.sharded_state_dict, and the distributed
# optimizer's model-space formats) saves the fp32 master copy of model tensor K as this prefix + K, sharded like K;
# a ChainedOptimizer of several optimizers puts chained_N. in front.
MASTER_WEIGHT_KEY = re.compile(r"(chained_\d+\.)?optimizer\.state\.fp32_param\.(?P<model_key>.+)")
# the distributed optimizer's dp_reshardable format (the trainer's, checkpointing.DISTRIB_OPTIM_SHARDING_TYPE) keeps
# its fp32 master weights in flat per-bucket buffers instead
BUCKETED_OPTIMIZER_KEY = re.compile(r"(chained_\d+\.)?optimizer\.distributed\.")


class DistCheckpointReader:
    """Global tensors of a megatron-core torch_dist checkpoint, read without process groups.

    megatron-core stores a transformer block's per-layer tensors stacked on a leading layer axis (one global tensor
    [num_layers, ...] per parameter name); `load(key, index=i)` reads only layer i, which is what keeps a conversion's
    memory near one layer.
    """

    def __init__(self, path: str | Path, iteration: Optional[int] = None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self._dcp = dcp
        self.path = resolve_checkpoint_dir(path, iteration)
        metadata = dcp.FileSystemReader(str(self.path)).read_metadata()
        self.shapes = {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
                       if isinstance(m, TensorStorageMetadata)}

    def master_weight_keys(self) -> dict[str, str]:
        """model tensor key -> the key of its fp32 master copy, for every model tensor the checkpoint has one of."""
        out = {}
        for key in self.shapes:
            match = MASTER_WEIGHT_KEY.fullmatch(key)
            if match and match["model_key"] in self.shapes:
                out[match["model_key"]] = key
        return out

    @property
    def has_bucketed_optimizer_state(self) -> bool:
        """The distributed optimizer's dp_reshardable state (master weights in flat buffers, not per tensor)."""
        return any(BUCKETED_OPTIMIZER_KEY.match(key) for key in self.shapes)

    def common(self) -> dict:
        """The non-tensor state saved beside the tensors (iteration, model_config, ...)."""
        common = self.path / "common.pt"
        return torch.load(common, map_location="cpu", weights_only=False) if common.exists() else {}

    def load(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        """The whole global tensor, or its slice `index` along the leading (layer) axis."""
        if key not in self.shapes:
            raise KeyError(f"{key} is not a tensor of the checkpoint {self.path}")
        shape, dtype = self.shapes[key]
        if index is None:
            out = {key: torch.empty(shape, dtype=dtype)}
            offsets = (0,) * len(shape)
        else:
            out = {key: torch.empty((1, *shape[1:]), dtype=dtype)}
            offsets = (index,) + (0,) * (len(shape) - 1)
        self._dcp.load(out, storage_reader=self._dcp.FileSystemReader(str(self.path)),
                       planner=_slice_planner({key: offsets}), no_dist=True)
        return out[key] if index is None else out[key][0]
