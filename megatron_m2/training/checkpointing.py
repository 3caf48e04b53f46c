"""Checkpoints with megatron-core dist_checkpointing: layout-independent, atomic, resumable.

On disk (names and the publish step: megatron_m2/checkpoint_layout.py):
    SAVE/iter_0000100/           a complete checkpoint (dist_checkpointing files + per-rank extras + done marker)
    SAVE/iter_0000200.tmp/       a save in progress or interrupted by a crash: never loaded, removed by the next save
    SAVE/latest_checkpointed_iteration.txt   written (atomically) only after the directory rename

The model and optimizer state are saved as global tensors with sharding metadata, so a checkpoint written at one
TP/PP layout loads into another. What differs per rank (the data stream position, RNG states) goes into
`extra/rank_NNNNN.pt`, indexed by the data-parallel rank so that a new layout with the same DP size resumes the
same streams.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_m2.checkpoint_layout import (DONE, TRACKER, checkpoint_dir, latest_iteration, publish,
                                           remove_staging_dirs, staging_dir)

__all__ = ["DONE", "TRACKER", "checkpoint_dir", "latest_iteration", "save_checkpoint", "load_checkpoint",
           "load_model_subset", "check_schedule"]


def _sharded_state(model, optimizer=None, scheduler=None, iteration: int = 0, extra_common: Optional[dict] = None,
                   is_loading: bool = False):
    model_state = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_state, "iteration": iteration}
    if optimizer is not None:
        # Loading: megatron-core first creates the (empty) Adam moments, otherwise a fresh optimizer asks for no
        # state at all and the moments silently restart from zero.
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if extra_common:
        state.update(extra_common)
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, rank_state: dict,
                    common: Optional[dict] = None) -> Path:
    """Save atomically: write into iter_N.tmp, rename to iter_N when every rank has finished, then the tracker."""
    final, tmp = checkpoint_dir(root, iteration), staging_dir(root, iteration)
    rank = dist.get_rank()
    if rank == 0:
        remove_staging_dirs(root)
        tmp.mkdir(parents=True)  # empty: megatron warns "Overwriting old incomplete / corrupted" into a used one
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, iteration, common), str(tmp))
    dp_rank = parallel_state.get_data_parallel_rank()
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_pipeline_model_parallel_rank() == 0:
        (tmp / "extra").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "extra" / f"rank_{dp_rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        publish(root, iteration)
    dist.barrier()
    return final


def check_schedule(root: str, flags_schedule: dict) -> None:
    """Before any allocation: a resumed run whose schedule flags differ from the checkpoint's must say which to use.

    (megatron-core would otherwise take the checkpoint's values silently, or assert deep inside loading.)
    """
    from megatron_m2.errors import ConfigError

    saved = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(root, latest_iteration(root))))
    saved = saved.get("scheduler") or {}
    differ = {k: (saved[k], v) for k, v in flags_schedule.items() if k in saved and saved[k] != v}
    if differ:
        listing = ", ".join(f"{k}: checkpoint {old!r} vs flags {new!r}" for k, (old, new) in differ.items())
        raise ConfigError(
            f"the learning-rate schedule in {root} differs from the flags ({listing}); pass "
            "--override-opt-param-scheduler to follow the flags, or --use-checkpoint-opt-param-scheduler to keep "
            "the checkpoint's schedule"
        )


def load_checkpoint(root: str, model, optimizer=None, scheduler=None,
                    iteration: Optional[int] = None) -> tuple[int, Optional[dict], dict]:
    """Load the latest (or given) complete checkpoint into model/optimizer/scheduler, in place.

    Returns (iteration, this DP rank's extra state or None if the DP size changed, the common state).
    """
    if iteration is None:
        iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    path = checkpoint_dir(root, iteration)
    if dist_checkpointing.load_common_state_dict(str(path)).get("converted_from_hf"):
        optimizer = scheduler = None  # tools/convert_from_hf.py writes model weights only
    loaded = dist_checkpointing.load(_sharded_state(model, optimizer, scheduler, iteration, is_loading=True), str(path))
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    extra_file = path / "extra" / f"rank_{parallel_state.get_data_parallel_rank():05d}.pt"
    num_extra = len(list((path / "extra").glob("rank_*.pt")))
    rank_state = None
    if extra_file.exists() and num_extra == parallel_state.get_data_parallel_world_size():
        rank_state = torch.load(extra_file, weights_only=False)
    common = {k: v for k, v in loaded.items() if k not in ("model", "optimizer", "scheduler")}
    return iteration, rank_state, common


def load_model_subset(root: str, model, keep: Callable[[str], bool]) -> list[str]:
    """Load only the model tensors whose checkpoint key passes `keep` (for --load-vision / --load-text)."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    sharded = {k: v for k, v in model.sharded_state_dict().items() if keep(k)}
    if not sharded:
        raise ValueError("no model tensors selected")
    loaded = dist_checkpointing.load({"model": sharded}, str(checkpoint_dir(root, iteration)))["model"]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    del missing, unexpected  # by construction the rest of the model is untouched
    return sorted(loaded)
