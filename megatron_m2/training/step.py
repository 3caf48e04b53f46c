"""One training step: the forward step megatron-core's schedules call, and `train_step`, which runs them.

`forward_step(data_iterator, model)` is Megatron-LM's step-function shape: it runs one micro-batch through this
pipeline stage and returns (output, loss_func). The loss function computes the grouped ITC loss of the micro-batch,
or, when the batch carries a cached embedding gradient (GBA-ITC batch accumulation, see batch_accumulation.py), the
surrogate loss; with `non_loss_data=True` it returns the embeddings (pass 1 and evaluation). When the batch carries
masks (--cmlm-weight / --cmim-weight, training/masked_modeling.py), the model also runs the masked streams and the
loss function adds alpha x CMIM + beta x CMLM to the contrastive term.

`train_step(forward_step_func, data_iterator, model, optimizer, scheduler, step_config)` reads the step's M
micro-batches once, moves them to the device (images stay uint8 there; `forward_step` normalises each micro-batch
when it runs) and either
- runs megatron's forward-backward schedule with the per-micro-batch loss (M = 1, or --itc-batch-accumulation
  memory / off; memory adds the step's earlier micro-batches' detached features to each loss's negatives), or
- (exact) computes one ITC loss over all M micro-batches (pass 1: forward-only schedule for the embeddings of the
  unmasked inputs; pass 2: loss and embedding gradients; pass 3: the forward-backward schedule with the surrogate
  loss, plus the masked-modelling terms), replaying the same batches and the same random state (dropout and
  drop-path masks, megatron_m2/random_state.py).
With --itc-queue-size (training/negatives.py) every loss also scores against the queue of earlier steps' features;
the step's group features (or, with --momentum-towers, the EMA model's, from a forward-only pass at the start of the
step) are enqueued after an applied update, and the EMA model moves then too.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_current_global_batch_size, get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import StragglerDetector

from megatron_m2 import parallel
from megatron_m2.contrastive import ContrastiveBatch, contrastive_batch
from megatron_m2.data.device import model_images, to_device
from megatron_m2.loss import itc_loss
from megatron_m2.models.m2_model import packed_sequence_length
from megatron_m2.training.negatives import NEGATIVES, NegativesState, StepNegatives, gather_group_features
from megatron_m2.training.profiling import (DATA_WAIT, FORWARD_BACKWARD, ITC_LOSS, MOMENTUM_FORWARD, OPTIMIZER,
                                            PASS1_FORWARD, phase)
from megatron_m2.training.batch_accumulation import (CachedGradient, embed_microbatches, itc_gradients,
                                                     surrogate_loss)
from megatron_m2.training.batch_schedule import scheduler_increment
from megatron_m2.training.masked_modeling import (LOSS_SCALE, MaskedModeling, masked_inputs, masked_modeling_loss,
                                                  step_scale, without_masks)
from megatron_m2.training.nan_guard import NanGuard
from megatron_m2.random_state import RandomState
from megatron_m2.training.optimizer import parameters_synced

ITC_GRADIENT = "itc_gradient"  # batch key of the cached embedding gradient (pass 3 of batch accumulation)
# megatron-core's straggler detector (training/monitoring.py configures it; until then its start/stop do nothing)
stimer = StragglerDetector()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(unwrap(model).parameters()).dtype


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module,
                 itc_group: Optional[dist.ProcessGroup] = None, itc_chunk_size: Optional[int] = None):
    """One micro-batch through this stage; on the last stage, the loss function (see the module docstring)."""
    batch = next(data_iterator)
    # the step holds its micro-batches as uint8 (train_step): this one is normalised now, and freed after its forward
    images = model_images(batch["images"], model_dtype(model))
    masked = masked_inputs(batch)
    with stimer:
        if masked is None:
            output = model(images, batch["text_ids"], batch["text_padding_mask"])
        else:
            output = model(images, batch["text_ids"], batch["text_padding_mask"], masked)

    def loss_func(output_tensor, non_loss_data: bool = False):
        image_embeds, text_embeds = output_tensor[:2]
        if non_loss_data:
            return image_embeds, text_embeds
        logit_scale = unwrap(model).logit_scale
        cached: Optional[CachedGradient] = batch.get(ITC_GRADIENT)
        negatives: Optional[StepNegatives] = batch.get(NEGATIVES)
        if cached is not None:
            loss, metrics = surrogate_loss(image_embeds, text_embeds, logit_scale, cached), {}
        else:
            with phase(ITC_LOSS):
                # the extra columns first: this loss's own gathered features are recorded for the later ones
                loss, metrics = itc_loss(image_embeds, text_embeds, logit_scale, group=itc_group,
                                         chunk_size=itc_chunk_size, timers=unwrap(model).config.timers,
                                         negatives=None if negatives is None else negatives.columns(),
                                         gathered_out=None if negatives is None else negatives.recorded)
        if masked is not None:  # the decoders' predictions follow the embeddings
            term, masked_metrics = masked_modeling_loss(output_tensor[-1], batch, unwrap(model).m2_config.patch_size)
            loss, metrics = loss + term, {**metrics, **masked_metrics}
        return loss, metrics

    return output, loss_func


@dataclass(frozen=True)
class StepConfig:
    """What one step needs besides the model: the micro-batching and the contrastive loss's settings."""

    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    itc_batch_accumulation: str = "exact"  # exact, memory or off (contrastive.py)
    itc_chunk_size: Optional[int] = None
    scheduler_increment: int = 1  # what the step adds to the learning-rate schedule's count (batch_schedule.py)
    masked_modeling: MaskedModeling = MaskedModeling()  # CMLM / CMIM weights (off by default)
    masked_seq_length: int = 0  # the packed sequence with the masked streams (the forward-backward pass)

    @property
    def accumulates(self) -> bool:
        """A second pass only pays off with more than one micro-batch."""
        return self.itc_batch_accumulation == "exact" and self.num_microbatches > 1


def step_config_from_args(args: argparse.Namespace) -> StepConfig:
    """The next step's config: its micro-batches from megatron-core's num_microbatches_calculator (configured by
    batch_schedule.configure_microbatches, updated by the loop before each step)."""
    layout = args.layout
    objectives = masked_modeling_from_args(args)
    return StepConfig(
        num_microbatches=get_num_microbatches(),
        micro_batch_size=args.micro_batch_size,
        seq_length=packed_sequence_length(
            args.model_config, sequence_parallel_size=layout.tensor_model_parallel_size if args.sequence_parallel
            else 1),
        itc_batch_accumulation=args.itc_batch_accumulation,
        itc_chunk_size=args.itc_chunk_size or None,
        scheduler_increment=scheduler_increment(args, get_current_global_batch_size()),
        masked_modeling=objectives,
        masked_seq_length=packed_sequence_length(args.model_config, with_masked_images=objectives.cmim,
                                                 with_masked_text=objectives.cmlm),
    )


def masked_modeling_from_args(args: argparse.Namespace) -> MaskedModeling:
    return MaskedModeling(cmlm_weight=args.cmlm_weight, cmim_weight=args.cmim_weight)


def contrastive_batch_of(args: argparse.Namespace, global_batch_size: Optional[int] = None) -> ContrastiveBatch:
    """The pairs and negatives per row of each contrastive loss of a step of `global_batch_size` samples (default
    --global-batch-size), per ITC group (contrastive.py counts them for the start line, --dry-run and tools/plan.py)."""
    layout = args.layout
    per_rank = (global_batch_size or args.global_batch_size) // layout.data_parallel_size
    return contrastive_batch(layout.itc_group_size, args.micro_batch_size, per_rank // args.micro_batch_size,
                             args.itc_batch_accumulation, args.itc_queue_size)


def contrastive_batch_size(args: argparse.Namespace, global_batch_size: Optional[int] = None) -> int:
    """Pairs each contrastive loss of a step scores against each other (per ITC group), for a step of
    `global_batch_size` samples (default --global-batch-size)."""
    return contrastive_batch_of(args, global_batch_size).pairs


@contextmanager
def _timed(timers, name: str, log_level: int, barrier: bool = False) -> Iterator[None]:
    """A megatron-core timer around the block (nothing without Timers: --timing-log-level 0)."""
    if timers is None:
        yield
        return
    timers(name, log_level=log_level).start(barrier=barrier)
    try:
        yield
    finally:
        timers(name).stop(barrier=barrier)


def reduce_metrics(metrics: list[dict]) -> dict[str, float]:
    """The last stage's metrics of a step, over its micro-batch entries and the data-parallel ranks.

    A scalar metric is averaged over the entries that have it (one entry with batch accumulation) and over DP; a
    per-token metric, a [sum, count] pair (the masked-modelling losses), is summed over entries and DP, then divided:
    the mean over every token of the step (Megatron-LM's per-token loss reporting)."""
    metrics = [m for m in metrics if m]
    if not metrics:
        return {}
    names = sorted({n for m in metrics for n in m})
    totals = []  # (numerator, denominator) per name
    for name in names:
        values = [m[name].detach().float().reshape(-1) for m in metrics if name in m]
        if values[0].numel() == 2:
            totals.append(torch.stack(values).sum(0))
        else:
            totals.append(torch.stack([torch.stack(values).mean(), torch.ones_like(values[0][0])]))
    stacked = torch.stack(totals)
    dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
    return dict(zip(names, (stacked[:, 0] / stacked[:, 1].clamp_min(1)).tolist()))


def forward_backward(forward_step_func: Callable, data_iterator: Iterator[dict], model: torch.nn.Module,
                     config: StepConfig, negatives: Optional[NegativesState] = None) -> list[dict]:
    """Gradients of the step's loss in the model's grad buffers (DP-reduced by the schedule's finalize); returns the
    last stage's per-micro-batch metrics (one entry for the whole step with batch accumulation).

    negatives: the queue (its features join every loss's negatives) and momentum towers; the step's group features
    for the queue are left in `negatives.pending` (NegativesState.end_step enqueues them)."""
    timers = unwrap(model).config.timers
    # the step's M micro-batches on the device as they came (uint8 images), read once: batch accumulation replays them
    with phase(DATA_WAIT), _timed(timers, "batch-generator", 2), stimer(bdata=True):
        batches = [to_device(next(data_iterator), model_device(model), dtype=None)
                   for _ in range(config.num_microbatches)]
    itc_group = parallel.get_itc_group()
    step_func = partial(forward_step_func, itc_group=itc_group, itc_chunk_size=config.itc_chunk_size)
    # the forward-backward pass runs the masked streams too (its packed sequence is longer), GBA-ITC's pass 1 never
    seq_length = config.masked_seq_length if config.masked_modeling.active else config.seq_length
    schedule = partial(get_forward_backward_func(), model=model, num_microbatches=config.num_microbatches,
                       seq_length=seq_length, micro_batch_size=config.micro_batch_size)
    train_batches = batches
    if config.masked_modeling.active and parallel_state.is_pipeline_last_stage():
        scale = step_scale(batches, config.masked_modeling, parallel_state.get_data_parallel_group())
        train_batches = [dict(batch, **{LOSS_SCALE: scale}) for batch in batches]
    queued = None
    if negatives is not None:
        negatives.pending = None
        queued = negatives.queued()
        if negatives.momentum is not None:  # MoCo's keys: the EMA weights before this step's update
            with phase(MOMENTUM_FORWARD), _timed(timers, "momentum-forward", 1):
                features = negatives.momentum.embed(step_func, [without_masks(batch) for batch in batches],
                                                    config.seq_length, config.micro_batch_size)
                if features is not None:
                    negatives.pending = gather_group_features(features, itc_group)
    if not config.accumulates:
        step_negatives = None
        if negatives is not None or (config.itc_batch_accumulation == "memory" and config.num_microbatches > 1):
            step_negatives = StepNegatives(queued, memory=config.itc_batch_accumulation == "memory")
            train_batches = [dict(batch, **{NEGATIVES: step_negatives}) for batch in train_batches]
        with phase(FORWARD_BACKWARD):
            metrics = schedule(forward_step_func=step_func, data_iterator=iter(train_batches), forward_only=False)
        if negatives is not None and negatives.momentum is None:
            negatives.pending = step_negatives.step_features()
        return metrics

    # pass 3's forwards must draw pass 1's dropout and drop-path masks (megatron_m2/random_state.py)
    random_state = RandomState.capture()
    with phase(PASS1_FORWARD), _timed(timers, "itc-embeddings-forward", 1):
        embeddings = embed_microbatches(step_func, [without_masks(batch) for batch in batches], model,
                                        config.seq_length, config.micro_batch_size)
    metrics: dict = {}
    if embeddings is not None:  # the last stage
        with phase(ITC_LOSS), _timed(timers, "itc-loss", 1):
            gathered: list = []
            metrics, cached = itc_gradients(embeddings, unwrap(model).logit_scale, itc_group, config.itc_chunk_size,
                                            timers, negatives=queued, gathered_out=gathered)
        if negatives is not None and negatives.momentum is None:
            negatives.pending = gathered[0]
        train_batches = [dict(batch, **{ITC_GRADIENT: gradient}) for batch, gradient in zip(train_batches, cached)]
    random_state.restore()
    with phase(FORWARD_BACKWARD):
        return [metrics] + schedule(forward_step_func=step_func, data_iterator=iter(train_batches),
                                    forward_only=False)


def train_step(forward_step_func: Callable, data_iterator: Iterator[dict], model: torch.nn.Module, optimizer,
               scheduler, config: StepConfig, nan_guard: Optional[NanGuard] = None,
               negatives: Optional[NegativesState] = None) -> dict[str, float]:
    """Zero the gradients, forward-backward the step's micro-batches, update; returns the logged metrics.

    forward_step_func(data_iterator, model, itc_group=..., itc_chunk_size=...) has `forward_step`'s contract: its
    loss function computes the ITC loss in that group, the surrogate when the batch carries ITC_GRADIENT, and the
    embeddings when called with non_loss_data=True (pass 1). nan_guard: skip the update of a step whose loss or
    gradients are not finite (training/nan_guard.py); a skipped step (here or megatron's found-inf) does not advance
    the learning-rate schedule, as in Megatron-LM. negatives: the queue and momentum towers (training/negatives.py),
    advanced only when the update is applied."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(forward_step_func, data_iterator, model, config, negatives)
    if nan_guard is not None and nan_guard.skip_step(
            model, [value for metrics in losses for value in metrics.values() if isinstance(value, torch.Tensor)]):
        update_ok, grad_norm = False, None
    else:
        with phase(OPTIMIZER), _timed(unwrap(model).config.timers, "optimizer", 1,
                                      barrier=unwrap(model).config.barrier_with_L1_time):
            update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=config.scheduler_increment)
    if negatives is not None:
        # the EMA reads the updated weights: with --overlap-param-gather their all-gather would wait for the next
        # forward, so it is forced here (a no-op otherwise)
        with parameters_synced(model) if negatives.momentum is not None and update_ok else nullcontext():
            negatives.end_step(bool(update_ok), unwrap(model), optimizer)
    metrics = reduce_metrics(losses) if parallel_state.is_pipeline_last_stage() else {}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if not update_ok:
        metrics["skipped"] = 1.0
    return metrics
