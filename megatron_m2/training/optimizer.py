"""megatron-core DDP, AdamW and the warmup + cosine schedule, configured from the flags."""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

# No weight decay on biases, norms, the logit scale (all < 2-D) and the CLS token (open_clip's rule).
NO_WEIGHT_DECAY = ParamKey(
    name=("*.bias", "*cls_token"),
    predicate=ParamPredicate(name="ndim_below_2", fn=lambda param: param.ndim < 2),
)


def wrap_ddp(model: torch.nn.Module, args: argparse.Namespace) -> DistributedDataParallel:
    """megatron-core DDP; --overlap-grad-reduce and --overlap-param-gather as in Megatron-LM (off by default there
    too). align_param_gather stays off: it lets the interleaved schedule launch the parameter all-gathers, and our
    1F1B schedule is not interleaved, so the forward pre-hooks launch them bucket by bucket."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


@contextlib.contextmanager
def parameters_synced(model: DistributedDataParallel) -> Iterator[None]:
    """The model's parameters up to date inside the block (for a checkpoint save or an evaluation).

    With --overlap-param-gather the distributed optimizer's step leaves the all-gather of the updated parameters to
    the next forward's pre-hooks; Megatron-LM gathers them before saving or evaluating (disable_forward_pre_hook,
    which forces the sync) and turns the hooks back on after. A no-op otherwise.
    """
    if not getattr(model, "use_forward_hook", False):
        yield
        return
    model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        model.enable_forward_pre_hook()


def schedule(args: argparse.Namespace) -> dict:
    """Warmup + cosine learning rate and constant weight decay, in the names megatron-core's scheduler saves; in
    iterations, or in samples with --train-samples (training/batch_schedule.py)."""
    if args.train_samples is not None:
        warmup, decay, total = args.lr_warmup_samples, args.lr_decay_samples or args.train_samples, args.train_samples
    else:
        warmup, decay, total = args.lr_warmup_iters, args.lr_decay_iters, args.train_iters
    return dict(
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )


def build_optimizer(
    model: DistributedDataParallel, args: argparse.Namespace
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """AdamW and its schedule; megatron-core's optimizer times its phases with the model config's `timers`."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        timers=model.config.timers,
        barrier_with_L1_time=model.config.barrier_with_L1_time,
    )
    optimizer = get_megatron_optimizer(
        config, [model], config_overrides={NO_WEIGHT_DECAY: ParamGroupOverride(wd_mult=0.0)}
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        **schedule(args),
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
    # The pipeline schedule calls these: loss scaling, no-sync during accumulation, DP grad reduction at the end.
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return optimizer, scheduler
