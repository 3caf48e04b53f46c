"""The pretraining loop: build, (re)load, step (training/step.py), log, evaluate, save."""
from __future__ import annotations

import argparse
import signal
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_current_global_batch_size, update_num_microbatches

from megatron_m2 import parallel
from megatron_m2.config import transformer_overrides
from megatron_m2.contrastive import describe_mode
from megatron_m2.arithmetic import model_flops_per_sample
from megatron_m2.training.arguments import model_overrides
from megatron_m2.parallel import print_rank_0
from megatron_m2 import checkpointing
from megatron_m2.data.filters import sample_filter_from_args
from megatron_m2.training.batch_schedule import configure_microbatches
from megatron_m2.training.monitoring import (attach_timers, log_timers, report_stragglers,
                                             start_straggler_detector)
from megatron_m2.training.nan_guard import NanGuard
from megatron_m2.training.optimizer import build_optimizer, parameters_synced, schedule, wrap_ddp
from megatron_m2.training.profiling import build_profiler
from megatron_m2.training.progress import MetricsLogger
from megatron_m2.random_state import checkpoint_state, load_checkpoint_state
from megatron_m2.training.wandb_run import RUN_ID_KEY, build_wandb_run
from megatron_m2.training.negatives import build_negatives_state
from megatron_m2.training.step import (StepConfig, contrastive_batch_of, contrastive_batch_size, forward_step,
                                       masked_modeling_from_args, step_config_from_args, train_step)


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


def _next_step_config(args: argparse.Namespace, consumed_samples: int, current: StepConfig) -> StepConfig:
    """megatron-core's calculator at `consumed_samples` (the batch ramp-up) and the step config it gives; says when
    the global batch grows."""
    before = get_current_global_batch_size()
    update_num_microbatches(consumed_samples, consistency_check=True)
    if get_current_global_batch_size() == before:
        return current
    print_rank_0(f"ramping up the global batch from {before} to {get_current_global_batch_size()} samples at "
                 f"{consumed_samples} consumed samples (contrastive batch "
                 f"{contrastive_batch_of(args, get_current_global_batch_size()).describe()})")
    return step_config_from_args(args)


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """LiT: no gradients for the vision tower; returns the number of frozen parameters."""
    frozen = 0
    for name, param in model.named_parameters():
        if model.is_vision_parameter(name):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def _continue_data(data, root: str, iteration: int) -> None:
    """A resume at another data-parallel size: each reading rank continues the epochs where the old ranks left them
    (data/reshard.py: no sample they read comes again before those epochs end)."""
    from megatron_m2.data.reshard import reshard_loader_states

    if not data.is_reader:
        return
    old = [state["data"] for state in checkpointing.load_rank_states(root, iteration)]
    state = reshard_loader_states(old, parallel_state.get_data_parallel_rank(),
                                  parallel_state.get_data_parallel_world_size())
    if state is not None:
        data.load_state_dict(state)
    print_rank_0(f"data-parallel size {len(old)} in the checkpoint, {parallel_state.get_data_parallel_world_size()} "
                 "now: " + ("the data continues the old ranks' epochs" if state is not None else "the data position "
                            "predates blending and cannot be continued: the data streams restart from the beginning"))


def pretrain(args: argparse.Namespace, forward_step_func: Callable = forward_step,
             eval_fn: Optional[Callable] = None) -> dict[str, Any]:
    """Train as the flags say with `forward_step_func` (training/step.py's shape); `eval_fn(forward_step_func, model,
    tokenizer)` -> metrics runs at --eval-interval. Returns the per-rank data statistics."""
    from megatron_m2.data import (build_replica_train_data, check_vocab, cores_per_local_rank, default_num_workers,
                                  load_tokenizer, name_sources, parse_data_path, reduce_stats)
    from megatron_m2.data.masking import build_masker
    from megatron_m2.host_memory import keep_freed_host_memory
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

    keep_freed_host_memory()  # on CPU, each step's activations re-use the last step's memory
    parallel.initialize_model_parallel(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                                       layout.itc_group_size, seed=args.seed,
                                       distributed_timeout_minutes=args.distributed_timeout_minutes)
    configure_microbatches(args, layout)
    model = build_model(config, spec=args.spec, seed=args.seed, cmlm=objectives.cmlm, cmim=objectives.cmim,
                        **model_overrides(args))
    num_params = sum(p.numel() for p in model.parameters())
    print(f"[rank {dist.get_rank()}] stage {parallel_state.get_pipeline_model_parallel_rank()} "
          f"tp {parallel_state.get_tensor_model_parallel_rank()}: {num_params:,} parameters, ITC group ranks "
          f"{parallel.get_itc_group_ranks()}", flush=True)
    timers = attach_timers(model, args)

    iteration, rank_state, saved_common, consumed_samples = 0, None, {}, 0
    if not resume:  # before the optimizer exists: its fp32 master weights (bf16) are cloned from these
        for root, tower in ((args.load_vision, "vision"), (args.load_text, "text")):
            if root:
                keep = model.is_vision_parameter if tower == "vision" else model.is_text_parameter
                names = checkpointing.load_model_subset(root, model, keep)
                print_rank_0(f"initialised the {tower} tower from {root} ({len(names)} tensors)")
    if args.freeze_vision:
        print_rank_0(f"--freeze-vision: {freeze_vision_tower(model):,} parameters frozen on rank 0")
    def build_momentum_copy() -> torch.nn.Module:
        # the model's build without the decoders, sharded like it; its throw-away init must not move torch's RNG
        with torch.random.fork_rng(devices=[]):
            return build_model(config, spec=args.spec, seed=args.seed,
                               **transformer_overrides(False, args.bf16, args.sequence_parallel))

    # the queue and the momentum towers (a copy of the model as it stands: after --load-vision / --load-text)
    negatives = build_negatives_state(args, model, build_momentum_copy)
    ddp = wrap_ddp(model, args)
    optimizer, scheduler = build_optimizer(ddp, args)
    if resume:
        iteration, rank_state, saved_common = checkpointing.load_checkpoint(
            args.load, model, optimizer, scheduler, load_optimizer_state=not args.no_load_optim,
            step_state=negatives)
        # checkpoints from before the batch ramp-up existed trained with a constant batch
        consumed_samples = saved_common.get("consumed_train_samples", iteration * args.global_batch_size)
        print_rank_0(f"resumed from {args.load} at iteration {iteration}")

    # one rank per model replica reads and decodes (worker processes, prefetch) and broadcasts to its TP/PP peers
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    if num_workers and not torch.cuda.is_available():
        # on CPU the decode workers and torch's intra-op threads share the rank's cores; oversubscribed, a
        # decode-bound step got no faster with 2 workers on 2 cores (BENCHMARKS.md, data path)
        torch.set_num_threads(max(1, cores_per_local_rank() - num_workers))
    data = build_replica_train_data(sources, tokenizer, config, args.micro_batch_size, args.seed,
                                    num_workers=num_workers, prefetch_factor=args.prefetch_factor,
                                    hflip=args.hflip, randaugment=args.randaugment,
                                    sample_filter=sample_filter_from_args(args), timeout=args.dataloader_timeout,
                                    masker=masker)
    nan_guard = NanGuard(args.max_consecutive_nan_iterations) if args.check_for_nan_in_loss_and_grad else None
    if resume:  # each rank's generators as saved, at the same layout (else fresh from --seed; one line says which)
        saved_random_state, note = checkpointing.load_random_state(args.load, iteration)
        if saved_random_state is not None:
            load_checkpoint_state(saved_random_state)
        print_rank_0(note)
    if rank_state is not None:
        data.load_state_dict(rank_state["data"])
        if nan_guard is not None:
            nan_guard.load_state_dict(rank_state.get("nan_guard", {}))
    elif resume:
        _continue_data(data, args.load, iteration)

    wandb_run, wandb_run_id = build_wandb_run(args, saved_common.get(RUN_ID_KEY), parallel.is_logging_rank())
    wandb_run_id = wandb_run_id or saved_common.get(RUN_ID_KEY)  # a run without wandb keeps the id for a later one
    logger = MetricsLogger(args.tensorboard_dir, args.train_iters, model_flops_per_sample(config),
                           dist.get_world_size(), torch.cuda.is_available(), args.metrics_file, wandb_run=wandb_run)
    profiler = build_profiler(args, dist.get_rank())
    sigterm = SigtermFlag()
    update_num_microbatches(consumed_samples, consistency_check=False)
    step_config = step_config_from_args(args)
    stragglers = start_straggler_detector(args)
    window_iterations, window_flops = 0, 0.0  # since the last log line (timers and straggler report)

    def save(step: int) -> None:
        finalize_saves(blocking=True)  # one save at a time: an --async-save still being written finishes first
        rank_state = {"data": data.state_dict(), "nan_guard": nan_guard.state_dict() if nan_guard is not None else {}}
        start = time.perf_counter()
        with parameters_synced(ddp):
            path = checkpointing.save_checkpoint(
                args.save, step, model, optimizer, scheduler, rank_state,
                common={"model_config": config.to_dict(), "consumed_train_samples": consumed_samples,
                        RUN_ID_KEY: wandb_run_id},
                async_save=args.async_save, persistent_worker=bool(args.use_persistent_ckpt_worker),
                random_state=checkpoint_state(), step_state=negatives)
        if args.async_save:
            print_rank_0(f"async save of {path} started: training blocked {time.perf_counter() - start:.1f} s")
        else:
            print_rank_0(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")

    def finalize_saves(blocking: bool) -> None:
        """Publish finished --async-save checkpoints (collective; a no-op without pending saves)."""
        for step in checkpointing.finalize_async_saves(blocking=blocking):
            print_rank_0(f"saved checkpoint {checkpointing.checkpoint_dir(args.save, step)} (async)")

    how = describe_mode(args.itc_batch_accumulation, step_config.num_microbatches, args.itc_queue_size,
                        args.momentum_towers)
    print_rank_0(f"training {args.model} ({model.spec} layer spec, {'bf16' if args.bf16 else 'fp32'}) for "
                 f"{args.train_iters} iterations: TP {layout.tensor_model_parallel_size} "
                 f"PP {layout.pipeline_model_parallel_size} DP {layout.data_parallel_size} ITC group "
                 f"{layout.itc_group_size}, global batch {get_current_global_batch_size()} = "
                 f"{step_config.num_microbatches} micro-batches of {args.micro_batch_size} per data-parallel rank; "
                 f"contrastive batch {contrastive_batch_of(args, get_current_global_batch_size()).describe()} "
                 f"({how}); {_objectives_note(step_config, args)}")
    if args.rampup_batch_size:
        start, increment, samples = args.rampup_batch_size
        print_rank_0(f"batch size ramp-up: global batch {start} to {args.global_batch_size} by {increment} over "
                     f"{samples} samples (contrastive batch up to {contrastive_batch_size(args)} pairs per ITC "
                     f"group), {args.train_samples} samples in {args.train_iters} iterations")

    def evaluate(step: int) -> None:
        start = time.perf_counter()
        with parameters_synced(ddp):
            results = eval_fn(forward_step_func, model, tokenizer)
        logger.scalars("eval", results, step)
        print_rank_0(f" eval at iteration {step} ({time.perf_counter() - start:.1f} s): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in results.items()))

    if eval_fn is not None and args.eval_at_start and iteration == 0:
        evaluate(0)
    while iteration < args.train_iters:
        step_config = _next_step_config(args, consumed_samples, step_config)
        batch_size = get_current_global_batch_size()
        if profiler is not None:
            profiler.before_step(iteration)
        metrics = train_step(forward_step_func, data, ddp, optimizer, scheduler, step_config, nan_guard=nan_guard,
                             negatives=negatives)
        iteration += 1
        if profiler is not None:
            profiler.after_step(iteration)
        consumed_samples += batch_size
        window_iterations, window_flops = window_iterations + 1, window_flops + batch_size * logger.flops_per_sample
        finalize_saves(blocking=False)
        print_line = iteration % args.log_interval == 0 or iteration == args.train_iters
        if print_line:  # per-source sample and skip counts of the whole job (readers count, the others add 0)
            metrics.update(reduce_stats(data.stats, group=dist.group.WORLD))
        logger.step(iteration, consumed_samples, batch_size, metrics, print_line=print_line)
        if print_line:
            log_timers(timers, window_iterations)
            report_stragglers(stragglers, window_flops, window_iterations)
            window_iterations, window_flops = 0, 0.0
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
    if profiler is not None:
        profiler.stop()  # training ended inside the profiled range
    checkpointing.close_async_saves()
    logger.close()
    stats = data.stats
    data.close()
    return {"data_stats": stats}
