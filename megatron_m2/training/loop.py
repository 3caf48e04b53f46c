"""The pretraining loop: build, (re)load, step (training/step.py), log, evaluate, save."""
from __future__ import annotations

import argparse
import signal
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_m2 import parallel
from megatron_m2.arithmetic import model_flops_per_sample
from megatron_m2.config import transformer_overrides
from megatron_m2.parallel import print_rank_0
from megatron_m2 import checkpointing
from megatron_m2.training.optimizer import build_optimizer, schedule, wrap_ddp
from megatron_m2.training.progress import MetricsLogger
from megatron_m2.training.step import (StepConfig, contrastive_batch_size, forward_step, masked_modeling_from_args,
                                       step_config_from_args, train_step)


class SigtermFlag:
    """Set by SIGTERM (Slurm preemption); all ranks agree on it once per step so they save and exit together."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], dtype=torch.int32,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _objectives_note(step_config: StepConfig, args: argparse.Namespace) -> str:
    objectives = step_config.masked_modeling
    terms = ["L_ITC"] + [f"{args.cmim_weight:g} x L_CMIM (image mask ratio {args.image_mask_ratio:.3f})"] * \
        objectives.cmim + [f"{args.cmlm_weight:g} x L_CMLM (text mask prob {args.text_mask_prob:g})"] * objectives.cmlm
    return "objective " + " + ".join(terms)


def _accumulation_note(step_config: StepConfig) -> str:
    if step_config.accumulates:
        return "GBA-ITC batch accumulation over the step's micro-batches: one extra forward"
    if step_config.num_microbatches > 1:
        return "--no-itc-batch-accumulation: one loss per micro-batch"
    return "one micro-batch per step"


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """LiT: no gradients for the vision tower; returns the number of frozen parameters."""
    frozen = 0
    for name, param in model.named_parameters():
        if model.is_vision_parameter(name):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def pretrain(args: argparse.Namespace, forward_step_func: Callable = forward_step,
             eval_fn: Optional[Callable] = None) -> dict[str, Any]:
    """Train as the flags say with `forward_step_func` (training/step.py's shape); `eval_fn(forward_step_func, model,
    tokenizer)` -> metrics runs at --eval-interval. Returns the per-rank data statistics."""
    from megatron_m2.data import (build_replica_train_data, check_vocab, cores_per_local_rank, default_num_workers,
                                  load_tokenizer, name_sources, parse_data_path, reduce_stats)
    from megatron_m2.data.masking import build_masker
    from megatron_m2.models import build_model

    layout = args.layout
    config = args.model_config
    # Cheap input checks first: a missing shard or a wrong tokenizer must fail before the model is allocated.
    sources = name_sources(parse_data_path(args.data_path))  # resolved here, once
    tokenizer = load_tokenizer(args.tokenizer_model, config.max_text_length)
    check_vocab(tokenizer, config.vocab_size)
    objectives = masked_modeling_from_args(args)
    masker = build_masker(tokenizer, config.num_patches, args.text_mask_prob if objectives.cmlm else None,
                          args.image_mask_ratio if objectives.cmim else None)  # ConfigError without a [MASK] piece

    resume = checkpointing.latest_iteration(args.load) is not None
    if resume and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        checkpointing.check_schedule(args.load, schedule(args))

    parallel.initialize_model_parallel(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                                       layout.itc_group_size, seed=args.seed)
    model = build_model(config, spec=args.spec, cmlm=objectives.cmlm, cmim=objectives.cmim,
                        **transformer_overrides(args.recompute_activations, args.bf16))
    num_params = sum(p.numel() for p in model.parameters())
    print(f"[rank {dist.get_rank()}] stage {parallel_state.get_pipeline_model_parallel_rank()} "
          f"tp {parallel_state.get_tensor_model_parallel_rank()}: {num_params:,} parameters", flush=True)

    iteration, rank_state = 0, None
    if not resume:
        for root, tower in ((args.load_vision, "vision"), (args.load_text, "text")):
            if root:
                keep = model.is_vision_parameter if tower == "vision" else model.is_text_parameter
                names = checkpointing.load_model_subset(root, model, keep)
                print_rank_0(f"initialised the {tower} tower from {root} ({len(names)} tensors)")
    if args.freeze_vision:
        print_rank_0(f"--freeze-vision: {freeze_vision_tower(model):,} parameters frozen on rank 0")
    ddp = wrap_ddp(model, args)
    optimizer, scheduler = build_optimizer(ddp, args)
    if resume:
        iteration, rank_state, _ = checkpointing.load_checkpoint(
            args.load, model, None if args.no_load_optim else optimizer, scheduler)
        print_rank_0(f"resumed from {args.load} at iteration {iteration}")

    # one rank per model replica reads and decodes (worker processes, prefetch) and broadcasts to its TP/PP peers
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    if num_workers and not torch.cuda.is_available():
        # on CPU the decode workers and torch's intra-op threads share the rank's cores; oversubscribed, a
        # decode-bound step got no faster with 2 workers on 2 cores (BENCHMARKS.md, data path)
        torch.set_num_threads(max(1, cores_per_local_rank() - num_workers))
    data = build_replica_train_data(sources, tokenizer, config, args.micro_batch_size, args.seed,
                                    num_workers=num_workers, prefetch_factor=args.prefetch_factor,
                                    hflip=args.hflip, masker=masker)
    if rank_state is not None:
        data.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["torch_rng"])
    elif resume:
        print_rank_0("data-parallel size changed since the checkpoint: data streams restart from the beginning")

    logger = MetricsLogger(args.tensorboard_dir, args.train_iters, model_flops_per_sample(config),
                           dist.get_world_size(), torch.cuda.is_available(), args.metrics_file)
    sigterm = SigtermFlag()
    step_config = step_config_from_args(args)

    def save(step: int) -> None:
        finalize_saves(blocking=True)  # one save at a time: an --async-save still being written finishes first
        rank_state = {"data": data.state_dict(), "torch_rng": torch.get_rng_state()}
        start = time.perf_counter()
        path = checkpointing.save_checkpoint(args.save, step, model, optimizer, scheduler, rank_state,
                                             common={"model_config": config.to_dict()}, async_save=args.async_save)
        if args.async_save:
            print_rank_0(f"async save of {path} started: training blocked {time.perf_counter() - start:.1f} s")
        else:
            print_rank_0(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")

    def finalize_saves(blocking: bool) -> None:
        """Publish finished --async-save checkpoints (collective; a no-op without pending saves)."""
        for step in checkpointing.finalize_async_saves(blocking=blocking):
            print_rank_0(f"saved checkpoint {checkpointing.checkpoint_dir(args.save, step)} (async)")

    print_rank_0(f"training {args.model} ({model.spec} layer spec, {'bf16' if args.bf16 else 'fp32'}) for "
                 f"{args.train_iters} iterations: TP {layout.tensor_model_parallel_size} "
                 f"PP {layout.pipeline_model_parallel_size} DP {layout.data_parallel_size} ITC group "
                 f"{layout.itc_group_size}, global batch {args.global_batch_size} = {step_config.num_microbatches} "
                 f"micro-batches of {args.micro_batch_size} per data-parallel rank; contrastive batch "
                 f"{contrastive_batch_size(args)} pairs per ITC group ({_accumulation_note(step_config)}); "
                 f"{_objectives_note(step_config, args)}")

    def evaluate(step: int) -> None:
        start = time.perf_counter()
        results = eval_fn(forward_step_func, model, tokenizer)
        logger.scalars("eval", results, step)
        print_rank_0(f" eval at iteration {step} ({time.perf_counter() - start:.1f} s): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in results.items()))

    if eval_fn is not None and args.eval_at_start and iteration == 0:
        evaluate(0)
    while iteration < args.train_iters:
        metrics = train_step(forward_step_func, data, ddp, optimizer, scheduler, step_config)
        iteration += 1
        finalize_saves(blocking=False)
        print_line = iteration % args.log_interval == 0 or iteration == args.train_iters
        if print_line:  # per-source sample and skip counts of the whole job (readers count, the others add 0)
            metrics.update(reduce_stats(data.stats, group=dist.group.WORLD))
        logger.step(iteration, iteration * args.global_batch_size, args.global_batch_size, metrics,
                    print_line=print_line)
        if eval_fn is not None and args.eval_interval and (
                iteration % args.eval_interval == 0 or iteration == args.train_iters):
            evaluate(iteration)
        preempted = sigterm.any_rank()
        stop = preempted or bool(args.exit_interval and iteration % args.exit_interval == 0)
        if args.save and ((args.save_interval and iteration % args.save_interval == 0) or stop
                          or iteration == args.train_iters):
            save(iteration)
        if stop:
            reason = "SIGTERM received" if preempted else f"--exit-interval {args.exit_interval}"
            print_rank_0(f"{reason}: {'saved' if args.save else 'not saved (no --save)'} at iteration {iteration}, "
                         "exiting")
            break
    finalize_saves(blocking=True)  # a checkpoint still being written must be complete before the process exits
    logger.close()
    stats = data.stats
    data.close()
    return {"data_stats": stats}
