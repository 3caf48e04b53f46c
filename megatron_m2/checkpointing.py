"""Checkpoints with megatron-core dist_checkpointing: layout-independent, atomic, resumable.

On disk (names and the publish step: megatron_m2/checkpoint_layout.py):
    SAVE/iter_0000100/           a complete checkpoint (dist_checkpointing files + per-rank extras + done marker)
    SAVE/iter_0000200.tmp/       a save in progress or interrupted by a crash: never loaded, removed by the next save
    SAVE/latest_checkpointed_iteration.txt   written (atomically) only after the directory rename

The model and optimizer state are saved as global tensors with sharding metadata, so a checkpoint written at one
TP/PP layout loads into another. What differs per rank (the data stream position, RNG states) goes into
`extra/rank_NNNNN.pt`, indexed by the data-parallel rank so that a new layout with the same DP size resumes the
same streams. Every rank's random state (its generators and megatron's RNG tracker states: dropout and drop path
draw from them; megatron_m2/random_state.py) goes into `extra/rng/pp*_tp*_dp*.pt`, as Megatron-LM saves rng_state per
rank, and is restored only at the layout it was saved at (`load_random_state`).

At scale (as Megatron-LM by default): the save is spread over the data-parallel ranks (megatron-core's
FullyParallelSaveStrategyWrapper: each DP replica writes 1/DP of the replicated tensors instead of DP rank 0 writing
all of them), and with `async_save=True` the tensors are written by a background process while training goes on;
the done marker, rename and tracker update then run in the request's finalize step (`finalize_async_saves`), so an
interrupted async save stays an `iter_N.tmp` that is never loaded. The writer is megatron-core's persistent one on a
GPU (`persistent_worker=True`: spawned once per rank; it copies the tensors to host memory itself, while the
trainer waits, then writes them while training goes on), and a process forked for each save on CPU. The persistent
worker cannot run without CUDA: it calls torch.cuda.set_device(rank % device_count) (tried on CPU: the writer dies
of a ZeroDivisionError and the trainer waits forever for its copy), and its spawn queue would share CPU tensors
instead of copying them, so it would write tensors the optimizer is already changing; a fork copies them on write.
"""
from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                        FullyParallelSaveStrategyWrapper)

from megatron_m2.checkpoint_layout import (DONE, TRACKER, checkpoint_dir, latest_iteration, publish,
                                           remove_staging_dirs, staging_dir)
from megatron_m2.errors import ConfigError

__all__ = ["DONE", "TRACKER", "checkpoint_dir", "latest_iteration", "save_checkpoint", "finalize_async_saves",
           "close_async_saves", "load_checkpoint", "load_model_subset", "load_rank_states", "load_random_state",
           "check_schedule"]

# The distributed optimizer's checkpoint format, named: without it megatron-core 0.16.1 falls back to
# 'fully_sharded_model_space', which it lists as deprecated. 'dp_reshardable' is Megatron-LM's default: each DP rank
# writes its own optimizer buffer shards, with no gather and no communication; such a checkpoint reshards across DP
# sizes only (load_checkpoint refuses a TP/PP change before megatron fails on it deep inside loading).
DISTRIB_OPTIM_SHARDING_TYPE = "dp_reshardable"
LAYOUT_KEY = "parallel_layout"  # in the common state: the TP/PP the checkpoint was written at

_ASYNC_QUEUE: Optional[AsyncCallsQueue] = None  # one per process; persistent or not as the first async save asks
_ASYNC_PENDING: list[int] = []  # iterations of scheduled async saves, oldest first


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _save_metadata(optimizer) -> Optional[dict]:
    """What shapes the optimizer's sharded state dict (megatron's `metadata`); saved as the checkpoint's
    content_metadata so that loading rebuilds the same format. Only the distributed optimizer reads the key; for the
    others it would change nothing but the checkpoint's description, so it is left out."""
    if optimizer is not None and _is_distributed_optimizer(optimizer):
        return {"distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING_TYPE}
    return None


def _sharded_state(model, optimizer=None, scheduler=None, iteration: int = 0, extra_common: Optional[dict] = None,
                   is_loading: bool = False, metadata: Optional[dict] = None, sections: Optional[dict] = None):
    """The state dict_checkpointing saves or fills. `sections`: further sharded sections beside the model's (the
    negatives queue and the momentum towers of training/negatives.py), each {key: ShardedTensor}."""
    model_state = model.sharded_state_dict()
    state: dict[str, Any] = {"model": model_state, "iteration": iteration, **(sections or {})}
    if optimizer is not None:
        # Loading: megatron-core first creates the (empty) Adam moments, otherwise a fresh optimizer asks for no
        # state at all and the moments silently restart from zero.
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if extra_common:
        state.update(extra_common)
    return state


def _current_layout() -> dict[str, int]:
    return {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size()}


def _save_strategy():
    """torch_dist, with the writes spread over the data-parallel ranks (Megatron-LM's --ckpt-fully-parallel-save,
    on by default there): DP replicas hold the same tensors, and without the wrapper DP rank 0 writes all of them."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                            parallel_state.get_data_parallel_group(with_context_parallel=True))


def _load_strategy(path: Path):
    """Each DP replica reads 1/DP of the tensors and broadcasts them to the others (Megatron-LM's
    --ckpt-fully-parallel-load). GPU only: its exchange moves every tensor with `.cuda()`, which the CPU patches
    (parallel.py) do not reach; on CPU every rank reads what it needs, as before."""
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if not torch.cuda.is_available() or dist.get_world_size(dp_group) == 1:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), dp_group)


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, rank_state: dict,
                    common: Optional[dict] = None, async_save: bool = False, persistent_worker: bool = False,
                    random_state: Optional[dict] = None, step_state=None) -> Path:
    """Save atomically: write into iter_N.tmp, rename to iter_N when every rank has finished, then the tracker.

    rank_state: this data-parallel rank's extras (written by its TP 0, PP 0 rank); random_state: this rank's random
    state (RandomState.state_dict(), written by every rank).

    async_save: return once the tensors are handed to a writer process (forked for this save, so it sees the state as
    of this call; or, with persistent_worker (CUDA only), megatron-core's persistent writer, once it has copied them
    to host memory); the rename and tracker update happen in `finalize_async_saves`, which the loop calls every step.
    step_state: state the step owns beside the model (training/negatives.py's NegativesState: the queue and the
    momentum towers), saved as sharded sections of its own with its common entries.
    Returns the directory the checkpoint has (or will have, once finalized).
    """
    global _ASYNC_QUEUE
    # One save at a time: this one's cleanup of staging directories must not race a writer still filling one.
    finalize_async_saves(blocking=True)
    final, tmp = checkpoint_dir(root, iteration), staging_dir(root, iteration)
    rank = dist.get_rank()
    if rank == 0:
        remove_staging_dirs(root)
        tmp.mkdir(parents=True)  # empty: megatron warns "Overwriting old incomplete / corrupted" into a used one
    dist.barrier()
    metadata = _save_metadata(optimizer)
    step_common = step_state.common() if step_state is not None else {}
    state = _sharded_state(model, optimizer, scheduler, iteration,
                           {**(common or {}), **step_common, LAYOUT_KEY: _current_layout()}, metadata=metadata,
                           sections=step_state.sharded_sections() if step_state is not None else None)
    request = dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
                                      async_sharded_save=async_save, content_metadata=metadata)
    dp_rank = parallel_state.get_data_parallel_rank()
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_pipeline_model_parallel_rank() == 0:
        (tmp / "extra").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "extra" / f"rank_{dp_rank:05d}.pt")
    if random_state is not None:
        (tmp / "extra" / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(random_state, _random_state_file(tmp))
    if not async_save:
        dist.barrier()
        if rank == 0:
            publish(root, iteration)
        dist.barrier()
        return final
    # Finalize functions run on every rank once every rank's writer is done (megatron's own first write the
    # .metadata and metadata.json, with a barrier); ours then publishes from rank 0. Every rank wrote its extra
    # file above, before scheduling, so it is in place too.
    request.add_finalize_fn(lambda: publish(root, iteration) if dist.get_rank() == 0 else None)
    if _ASYNC_QUEUE is None:
        _ASYNC_QUEUE = AsyncCallsQueue(persistent=persistent_worker)
        if persistent_worker:
            atexit.register(_abort_persistent_writer)
    _ASYNC_QUEUE.schedule_async_request(request)
    _ASYNC_PENDING.append(iteration)
    return final


def finalize_async_saves(blocking: bool = False) -> list[int]:
    """Publish the async saves whose writers have finished on every rank; returns their iterations.

    Collective while a save is pending: every rank calls it at the same points (each step, non-blocking; blocking
    before the next save and before exit). Without pending saves it returns at once and communicates nothing.
    """
    if _ASYNC_QUEUE is None or not _ASYNC_PENDING:
        return []
    finalized = _ASYNC_QUEUE.maybe_finalize_async_calls(blocking=blocking)
    return [_ASYNC_PENDING.pop(0) for _ in finalized]


def _abort_persistent_writer() -> None:
    """At exit after an error (every normal path calls `close_async_saves`): kill the persistent writer, a
    non-daemonic process that would otherwise keep the interpreter waiting for it forever; the checkpoint it was
    writing stays an iter_N.tmp, never loaded."""
    if _ASYNC_QUEUE is not None:
        _ASYNC_QUEUE.close(abort=True)


def close_async_saves() -> None:
    """Finish pending async saves (collective, like `finalize_async_saves`) and stop the persistent writer."""
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        return
    finalize_async_saves(blocking=True)
    _ASYNC_QUEUE.close()
    _ASYNC_QUEUE = None


def check_schedule(root: str, flags_schedule: dict) -> None:
    """Before any allocation: a resumed run whose schedule flags differ from the checkpoint's must say which to use.

    (megatron-core would otherwise take the checkpoint's values silently, or assert deep inside loading.)
    """
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


def load_checkpoint(root: str, model, optimizer=None, scheduler=None, iteration: Optional[int] = None,
                    load_optimizer_state: bool = True, step_state=None) -> tuple[int, Optional[dict], dict]:
    """Load the latest (or given) complete checkpoint into model/optimizer/scheduler, in place.

    optimizer: the optimizer built on `model`, if any. Its state is loaded when `load_optimizer_state` (False:
    --no-load-optim) and the checkpoint has one (converted checkpoints hold the model only); otherwise it re-reads
    the loaded weights (`reload_model_params`): a mixed-precision optimizer cloned its fp32 master weights when it
    was built, before this load, and its first step would write those back. One path for every case, so a caller
    cannot load the weights and forget the masters.
    step_state: training/negatives.py's NegativesState: it picks the sections the checkpoint can restore (saying
    what restarts) and takes them, or restarts from the loaded model.
    Returns (iteration, this DP rank's extra state or None if the DP size changed, the common state).
    """
    if iteration is None:
        iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    path = checkpoint_dir(root, iteration)
    saved_common = dist_checkpointing.load_common_state_dict(str(path))
    optimizer_to_load = optimizer if load_optimizer_state else None
    if saved_common.get("converted_from_hf"):
        optimizer_to_load = scheduler = None  # tools/convert_from_hf.py writes model weights only
    # The format the checkpoint was written in (None for checkpoints older than content_metadata: megatron's default)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=saved_common)
    if optimizer_to_load is not None:
        check_optimizer_resharding(root, metadata, saved_common.get(LAYOUT_KEY), _current_layout())
    fresh = _objectives_to_start_fresh(root, path, model, optimizer_to_load)
    sections = step_state.sections_to_load(root, path, saved_common) if step_state is not None else {}
    state = _sharded_state(model, optimizer_to_load, scheduler, iteration, is_loading=True, metadata=metadata,
                           sections=sections)
    if fresh:
        state["model"] = {k: v for k, v in state["model"].items() if not model.objectives_of([k]) & fresh}
    loaded = dist_checkpointing.load(state, str(path), sharded_strategy=_load_strategy(path))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=not fresh)
    if [k for k in missing if not model.objectives_of([k]) & fresh] or unexpected:
        raise KeyError(f"--load {root}: loading left {missing} missing and {unexpected} unexpected")
    if optimizer_to_load is not None:
        optimizer.load_state_dict(loaded["optimizer"])  # the fp32 masters come with it
    elif optimizer is not None:
        optimizer.reload_model_params()
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if step_state is not None:
        step_state.load_sections({name: loaded[name] for name in sections}, model)
    extra_file = path / "extra" / f"rank_{parallel_state.get_data_parallel_rank():05d}.pt"
    num_extra = len(list((path / "extra").glob("rank_*.pt")))
    rank_state = None
    if extra_file.exists() and num_extra == parallel_state.get_data_parallel_world_size():
        rank_state = torch.load(extra_file, weights_only=False)
    common = {k: v for k, v in loaded.items()
              if k not in ("model", "optimizer", "scheduler", "content_metadata", *sections)}
    return iteration, rank_state, common


def _random_state_file(path: Path) -> Path:
    return path / "extra" / "rng" / (f"pp{parallel_state.get_pipeline_model_parallel_rank():03d}_"
                                      f"tp{parallel_state.get_tensor_model_parallel_rank():03d}_"
                                      f"dp{parallel_state.get_data_parallel_rank():05d}.pt")


def load_random_state(root: str, iteration: int) -> tuple[Optional[dict], str]:
    """This rank's saved random state if the checkpoint was written at this TP x PP x DP layout, else None; and a
    line saying which (the caller prints it once). At another layout no rank has a saved counterpart with the same
    stream of draws (another TP size shards attention dropout differently, another PP size puts other layers on a
    stage), so the run keeps its fresh seeding from --seed, as Megatron-LM ignores rng_state after a TP/PP change."""
    path = checkpoint_dir(root, iteration)
    files = list((path / "extra" / "rng").glob("pp*_tp*_dp*.pt"))
    saved_layout = dist_checkpointing.load_common_state_dict(str(path)).get(LAYOUT_KEY)
    if not files:
        return None, f"--load {root}: no random states in the checkpoint; dropout and drop path start from --seed"
    layout = _current_layout()
    if saved_layout != layout or len(files) != dist.get_world_size():
        def describe(tp_pp: Optional[dict], ranks: int) -> str:
            tp_pp = tp_pp or {}
            return (f"TP {tp_pp.get('tensor_model_parallel_size', '?')} x PP "
                    f"{tp_pp.get('pipeline_model_parallel_size', '?')} over {ranks} ranks")

        return None, (f"--load {root}: random states saved at {describe(saved_layout, len(files))}, this run is "
                      f"{describe(layout, dist.get_world_size())}: dropout and drop path start fresh from --seed")
    return torch.load(_random_state_file(path), weights_only=False), f"--load {root}: random states restored"


def load_rank_states(root: str, iteration: int) -> list[dict]:
    """Every data-parallel rank's extra state in the checkpoint of `iteration`, in DP-rank order (to continue the
    data of a run resumed at another data-parallel size)."""
    files = sorted((checkpoint_dir(root, iteration) / "extra").glob("rank_*.pt"))
    return [torch.load(path, weights_only=False) for path in files]


def _objectives_to_start_fresh(root: str, path: Path, model, optimizer) -> frozenset[str]:
    """The masked-modelling objectives (model.objectives, models/m2_model.py) whose decoders this model has and the
    checkpoint lacks: they start at their initialisation (a checkpoint trained ITC-only, an official import, a Hugging
    Face folder). The optimizer's state covers exactly the checkpoint's parameters, so a resume WITH the optimizer
    needs the same objectives on as when the checkpoint was written: ConfigError otherwise, before anything is read."""
    if not hasattr(model, "objectives_of"):
        return frozenset()
    saved = model.objectives_of(dist_checkpointing.load_tensors_metadata(str(path)))
    built = model.objectives
    if optimizer is not None and saved != built:
        names = lambda objectives: ", ".join(sorted(objectives)) or "none"  # noqa: E731
        raise ConfigError(
            f"--load {root}: the checkpoint was trained with the masked-modelling objectives [{names(saved)}] "
            f"(--cmlm-weight / --cmim-weight > 0), this run has [{names(built)}]; their decoders' optimizer state "
            "cannot be matched. Resume with the same objectives on, or pass --no-load-optim to load the weights only "
            "(decoders the checkpoint lacks start fresh, the Adam moments restart)")
    if built - saved:
        from megatron_m2.parallel import print_rank_0

        print_rank_0(f"--load {root}: no decoder weights for [{', '.join(sorted(built - saved))}] in the checkpoint: "
                     "they start from their initialisation")
    return frozenset(built - saved)


def check_optimizer_resharding(root: str, metadata: Optional[dict], saved_layout: Optional[dict],
                               layout: dict[str, int]) -> None:
    """A 'dp_reshardable' distributed-optimizer state loads only at the TP/PP it was saved at."""
    if (metadata or {}).get("distrib_optim_sharding_type") != "dp_reshardable" or saved_layout in (None, layout):
        return
    saved = ", ".join(f"{k} {saved_layout.get(k)} -> {v}" for k, v in layout.items() if saved_layout.get(k) != v)
    raise ConfigError(f"--load {root}: the distributed optimizer's state was saved as 'dp_reshardable', which loads "
                      f"only at the tensor/pipeline-parallel layout it was written at ({saved}); resume at that "
                      "layout, or pass --no-load-optim to load the model weights and schedule only")


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
