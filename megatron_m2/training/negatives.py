"""Negatives beyond the step's pairs: the paper's feature memory, a queue of earlier steps, BriVL's momentum towers.

State the step owns and the checkpoint saves (training/step.py composes it; loss.py's docstring gives each mode's
formula):

- `StepNegatives` (--itc-batch-accumulation memory / off, or a queue): travels with the step's micro-batches (batch
  key NEGATIVES). Each micro-batch's loss function asks it for its extra columns, then records the group features
  the loss gathered. In memory mode the columns are the step's earlier micro-batches' recorded features (detached),
  the paper's GBA-ITC figure (panel c): at time T each GPU keeps the features of T-1, its own and those gathered
  from its group, and adds them to the negatives. megatron-core's 1F1B schedule calls the last stage's loss
  functions in micro-batch order, so "earlier" is well defined. No extra forward, no extra communication.
- `NegativesQueue` (--itc-queue-size K): a FIFO of the detached group features of the last K pairs of EARLIER steps
  (a memory bank, as MoCo's queue). Every rank of an ITC group holds the same queue (it enqueues the gathered group
  features), so every rank's rows see the same negatives, and the loss's gradient scaling argument (loss.py) is
  untouched. A ring buffer: any K works (K need not be a multiple of a step's pairs; a step with more than K pairs
  keeps its last K). Enqueued at the end of a step only when the optimizer applied the update: a skipped step (a
  non-finite loss or gradient, megatron's found-inf) may have produced non-finite features, and it does not count
  as a step anywhere else either (the schedule, the EMA).
- `MomentumTowers` (--momentum-towers M, BriVL / MoCo): an EMA copy of the whole model, built by the same build
  function (so it is sharded exactly like the model under TP/PP, and its sharded_state_dict reshards like the
  towers), updated after each applied step: theta_m = M theta_m + (1 - M) theta, from the optimizer's fp32 main
  parameters when it keeps them (bf16), else from the model's. With it, the features that enter the queue are its
  embeddings of the step's batches (one forward-only pass with megatron's schedule, as GBA-ITC's pass 1), computed at
  the start of the step, before this step's update, as MoCo's keys are. It runs in eval mode (no dropout): it is a
  target encoder, and MoCo's reason to keep the key encoder in training mode (BatchNorm statistics) does not apply to
  a LayerNorm transformer. The masked-modelling decoders are not in it: the queue needs only the embeddings.

Checkpoint (checkpointing.save_checkpoint's `step_state`): the queue is a ShardedTensor [num ITC groups, K, 2 out_dim]
(+ its fill level and write position), one slice per group, written by one rank of the group; the momentum towers
are the EMA model's sharded_state_dict under the prefix `momentum_towers.`. A resume at the same ITC-group layout
restores both exactly (same losses as an uninterrupted run). A resume with another number of ITC groups, or another
K, cannot map the saved queues onto the new groups: the queue restarts EMPTY with a printed warning (refusing would
forbid every DP or --itc-group-size change; an empty queue costs some steps of fewer negatives, nothing else). The
momentum towers reshard with TP/PP like the model. A checkpoint without momentum towers (trained without them, or
converted) starts them as a copy of the loaded model, with a warning.

bf16: the EMA model is held in the model's dtype with an fp32 shadow that the update accumulates in (a 0.995 EMA
step is below bf16's resolution). The checkpoint holds the shadow too, as ShardedTensors beside the EMA model's,
under `momentum_towers_fp32.` (same sharding), so a bf16 resume continues the same fp32 average; a checkpoint
without it (written by an fp32 run) restarts the shadow from the EMA weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_m2.parallel import print_rank_0

NEGATIVES = "itc_negatives"  # batch key of the step's StepNegatives
QUEUE_SECTION, MOMENTUM_SECTION = "negatives_queue", "momentum_towers"
QUEUE_COMMON = "negatives_queue_layout"  # in the common state: the queue's (num groups, size, dim)
MOMENTUM_PREFIX = "momentum_towers."
SHADOW_PREFIX = "momentum_towers_fp32."  # the fp32 shadow of a bf16 EMA model

Features = tuple[torch.Tensor, torch.Tensor]  # (image [n, d], text [n, d]), float32, detached


def _cat(features: list[Features]) -> Optional[Features]:
    features = [f for f in features if f is not None and f[0].shape[0]]
    if not features:
        return None
    return torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features])


class StepNegatives:
    """One step's negatives on the last stage: the queue's (fixed for the step) and, in memory mode, the features the
    step's earlier micro-batches' losses gathered. `recorded` collects every loss's gathered group features."""

    def __init__(self, queued: Optional[Features], memory: bool):
        self.queued, self.memory = queued, memory
        self.recorded: list[Features] = []

    def columns(self) -> Optional[Features]:
        """The extra (detached) columns of the next micro-batch's loss."""
        return _cat((self.recorded if self.memory else []) + [self.queued])

    def step_features(self) -> Optional[Features]:
        return _cat(self.recorded)


class NegativesQueue:
    """The FIFO of one ITC group's features of earlier steps (see the module docstring)."""

    def __init__(self, size: int, dim: int, device: torch.device):
        self.size, self.dim = size, dim
        self.features = torch.zeros(size, 2 * dim, dtype=torch.float32, device=device)  # rows [image; text]
        self.position = torch.zeros(2, dtype=torch.int64)  # (filled, next write row), saved with the features

    @property
    def filled(self) -> int:
        return int(self.position[0])

    def negatives(self) -> Optional[Features]:
        if not self.filled:
            return None
        rows = self.features[: self.filled]
        return rows[:, : self.dim], rows[:, self.dim:]

    def enqueue(self, features: Features) -> None:
        rows = torch.cat([features[0].float(), features[1].float()], dim=1).detach()[-self.size:]
        n, write = rows.shape[0], int(self.position[1])
        first = min(n, self.size - write)  # up to the end of the ring, the rest from its start
        self.features[write: write + first] = rows[:first]
        self.features[: n - first] = rows[first:]
        self.position[0] = min(self.size, self.filled + n)
        self.position[1] = (write + n) % self.size

    # -- checkpoint ---------------------------------------------------------------------------------------------
    @staticmethod
    def layout(size: int, dim: int) -> dict:
        dp, g = parallel_state.get_data_parallel_world_size(), _itc_group_size()
        return {"num_groups": dp // g, "size": size, "dim": dim}

    def sharded_state_dict(self) -> dict:
        """This group's slice of [num groups, ...]; one rank per group (TP rank 0, first DP rank of the group) is
        the main replica that writes it."""
        g = _itc_group_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        num_groups = parallel_state.get_data_parallel_world_size() // g
        replica = (0, parallel_state.get_tensor_model_parallel_rank(), dp_rank % g)
        return {
            f"{QUEUE_SECTION}.features": ShardedTensor.from_rank_offsets(
                f"{QUEUE_SECTION}.features", self.features, (0, dp_rank // g, num_groups), replica_id=replica,
                prepend_axis_num=1),
            f"{QUEUE_SECTION}.position": ShardedTensor.from_rank_offsets(
                f"{QUEUE_SECTION}.position", self.position, (0, dp_rank // g, num_groups), replica_id=replica,
                prepend_axis_num=1),
        }

    def load_state_dict(self, loaded: dict) -> None:
        self.features.copy_(loaded[f"{QUEUE_SECTION}.features"].to(self.features.device))
        self.position.copy_(loaded[f"{QUEUE_SECTION}.position"].cpu())


def _itc_group_size() -> int:
    from megatron_m2.parallel import get_itc_group

    return dist.get_world_size(get_itc_group())


def gather_group_features(features: Features, group: Optional[dist.ProcessGroup]) -> Features:
    """This rank's (image, text) rows gathered over the ITC group, rank-major, without autograd (the momentum
    towers' features; the online ones come gathered from the loss)."""
    local = torch.cat([features[0].float(), features[1].float()], dim=1).contiguous()
    if group is not None and dist.get_world_size(group) > 1:
        gathered = local.new_empty((dist.get_world_size(group) * local.shape[0], local.shape[1]))
        dist.all_gather_into_tensor(gathered, local, group=group)
        local = gathered
    dim = features[0].shape[1]
    return local[:, :dim], local[:, dim:]


def _main_parameters(optimizer) -> dict[int, torch.Tensor]:
    """id(model parameter) -> the optimizer's fp32 main copy, where it keeps one (megatron-core's
    Float16OptimizerWithFloat16Params); the distributed optimizer's main parameters are shards, left out (its model
    parameters hold the update once the step's all-gather ran)."""
    found: dict[int, torch.Tensor] = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        model_groups, main_groups = getattr(opt, "float16_groups", None), getattr(opt, "fp32_from_float16_groups", None)
        if model_groups is None or main_groups is None:
            continue
        for model_group, main_group in zip(model_groups, main_groups):
            for model_param, main_param in zip(model_group, main_group):
                found[id(model_param)] = main_param
    return found


class MomentumTowers:
    """The EMA copy of the model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, build: Callable[[], torch.nn.Module], coefficient: float):
        self.coefficient = coefficient
        self.model = build()
        self.model.requires_grad_(False)
        self.model.eval()
        self.copy_from(model)

    def _pairs(self, online: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        source = dict(online.named_parameters())
        return [(param, source[name]) for name, param in self.model.named_parameters()]

    def copy_from(self, online: torch.nn.Module) -> None:
        with torch.no_grad():
            for ema, param in self._pairs(online):
                ema.copy_(param)
        self._shadow = (None if next(self.model.parameters()).dtype == torch.float32 else
                        [ema.detach().float().clone() for ema, _ in self._pairs(online)])

    @torch.no_grad()
    def update(self, online: torch.nn.Module, optimizer) -> None:
        """theta_m = M theta_m + (1 - M) theta, after an applied optimizer step."""
        main = _main_parameters(optimizer)
        pairs = self._pairs(online)
        m = self.coefficient
        for i, (ema, param) in enumerate(pairs):
            source = main.get(id(param), param)
            if self._shadow is None:
                ema.mul_(m).add_(source.to(ema.dtype), alpha=1 - m)
            else:
                self._shadow[i].mul_(m).add_(source.float(), alpha=1 - m)
                ema.copy_(self._shadow[i])

    def embed(self, step_func: Callable, batches: list[dict], seq_length: int,
              micro_batch_size: int) -> Optional[Features]:
        """Its (image, text) embeddings of the batches, concatenated (last stage; None elsewhere)."""
        from megatron_m2.training.batch_accumulation import embed_microbatches

        embeddings = embed_microbatches(step_func, batches, self.model, seq_length, micro_batch_size)
        return None if embeddings is None else _cat([(i.float(), t.float()) for i, t in embeddings])

    def sharded_state_dict(self, with_shadow: bool = True) -> dict:
        """The EMA model's sharded state under `momentum_towers.` and, in bf16, its fp32 shadow under
        `momentum_towers_fp32.`: each parameter's ShardedTensor again (same shape, offsets, replicas), on the
        shadow's data."""
        state = self.model.sharded_state_dict(prefix=MOMENTUM_PREFIX)
        if self._shadow is None or not with_shadow:
            return state
        for (name, param), shadow in zip(self.model.named_parameters(), self._shadow):
            sharded = state.get(MOMENTUM_PREFIX + name)
            if isinstance(sharded, ShardedTensor) and sharded.data is param and sharded.flattened_range is None:
                state[SHADOW_PREFIX + name] = dataclasses.replace(
                    sharded, key=SHADOW_PREFIX + sharded.key[len(MOMENTUM_PREFIX):], data=shadow,
                    dtype=torch.float32)
        return state

    def load_state_dict(self, loaded: dict) -> None:
        state = {k[len(MOMENTUM_PREFIX):]: v for k, v in loaded.items() if k.startswith(MOMENTUM_PREFIX)}
        self.model.load_state_dict(state, strict=True)
        if self._shadow is not None:
            with torch.no_grad():
                for i, (name, param) in enumerate(self.model.named_parameters()):
                    saved = loaded.get(SHADOW_PREFIX + name)
                    self._shadow[i] = (saved if saved is not None else param).detach().float().clone()

    @property
    def shadow(self) -> Optional[list[torch.Tensor]]:
        return self._shadow


class NegativesState:
    """The queue and the momentum towers of a run (either may be absent), as the step and the checkpoint use them."""

    def __init__(self, queue_size: int, dim: int, queue: Optional[NegativesQueue], momentum: Optional[MomentumTowers]):
        self.queue_size, self.dim = queue_size, dim  # every rank knows them (the queue lives on the last stage only)
        self.queue, self.momentum = queue, momentum
        self.pending: Optional[Features] = None  # this step's group features, enqueued if the update is applied

    def queued(self) -> Optional[Features]:
        return None if self.queue is None else self.queue.negatives()

    def end_step(self, update_applied: bool, online: torch.nn.Module, optimizer) -> None:
        """After the optimizer: enqueue the step's features and move the EMA, only if the update was applied."""
        pending, self.pending = self.pending, None
        if not update_applied:
            return
        if self.queue is not None and pending is not None:
            self.queue.enqueue(pending)
        if self.momentum is not None:
            self.momentum.update(online, optimizer)

    # -- checkpoint (checkpointing.save_checkpoint / load_checkpoint) ---------------------------------------------
    def common(self) -> dict:
        return {QUEUE_COMMON: NegativesQueue.layout(self.queue_size, self.dim)} if self.queue_size else {}

    def sharded_sections(self) -> dict[str, dict]:
        sections = {}
        if self.queue is not None and parallel_state.is_pipeline_last_stage():
            sections[QUEUE_SECTION] = self.queue.sharded_state_dict()
        if self.momentum is not None:
            sections[MOMENTUM_SECTION] = self.momentum.sharded_state_dict()
        return sections

    def sections_to_load(self, root: str, path, saved_common: dict) -> dict[str, dict]:
        """What the checkpoint at `path` can restore; says what restarts and why."""
        sections = self.sharded_sections()
        saved_keys = set(dist_checkpointing.load_tensors_metadata(str(path)))
        if self.queue_size:
            saved = saved_common.get(QUEUE_COMMON)
            now = NegativesQueue.layout(self.queue_size, self.dim)
            if saved != now:
                why = ("holds no queue" if saved is None else
                       f"holds the queues of {saved['num_groups']} ITC group(s) of {saved['size']} x {saved['dim']} "
                       f"features, this run has {now['num_groups']} of {now['size']} x {now['dim']}")
                print_rank_0(f"WARNING: --load {root} {why}: the --itc-queue-size queue starts empty")
                sections.pop(QUEUE_SECTION, None)
        if self.momentum is not None and not any(k.startswith(MOMENTUM_PREFIX) for k in saved_keys):
            print_rank_0(f"WARNING: --load {root} holds no momentum towers: they start as a copy of the loaded model")
            sections.pop(MOMENTUM_SECTION, None)
        elif self.momentum is not None and not any(k.startswith(SHADOW_PREFIX) for k in saved_keys):
            # an fp32 run's checkpoint loaded in bf16: the shadow restarts from the EMA weights
            sections[MOMENTUM_SECTION] = self.momentum.sharded_state_dict(with_shadow=False)
        return sections

    def load_sections(self, loaded: dict[str, dict], online: torch.nn.Module) -> None:
        if QUEUE_SECTION in loaded:
            self.queue.load_state_dict(loaded[QUEUE_SECTION])
        if self.momentum is not None:
            if MOMENTUM_SECTION in loaded:
                self.momentum.load_state_dict(loaded[MOMENTUM_SECTION])
            else:
                self.momentum.copy_from(online)


def build_negatives_state(args, model: torch.nn.Module, build: Callable[[], torch.nn.Module]
                          ) -> Optional[NegativesState]:
    """From --itc-queue-size and --momentum-towers; None when both are off. `model` is the (unwrapped) online model
    as it stands (after --load-vision / --load-text); `build` builds a fresh one like it (for the EMA copy)."""
    if not args.itc_queue_size:
        return None
    device = next(model.parameters()).device
    queue = (NegativesQueue(args.itc_queue_size, args.model_config.out_dim, device)
             if parallel_state.is_pipeline_last_stage() else None)
    momentum = MomentumTowers(model, build, args.momentum_towers) if args.momentum_towers else None
    return NegativesState(args.itc_queue_size, args.model_config.out_dim, queue, momentum)
