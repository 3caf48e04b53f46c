"""The pretraining loop: build, (re)load, step with megatron-core's pipeline schedule, log, evaluate, save."""
from __future__ import annotations

import argparse
import signal
import time
from functools import partial
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_m2 import parallel
from megatron_m2.loss import itc_loss
from megatron_m2.training import checkpointing
from megatron_m2.training.logging import MetricsLogger, model_flops_per_sample, print_rank_0
from megatron_m2.training.optimizer import build_optimizer, schedule, wrap_ddp


def sequence_length(config, with_images: bool = True, with_text: bool = True) -> int:
    """Length of the packed [image tokens; text tokens] activation that travels between pipeline stages."""
    return config.vision_seq_length * with_images + config.max_text_length * with_text


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, itc_chunk_size: Optional[int] = None):
    """One micro-batch through this stage; on the last stage, the grouped contrastive loss."""
    batch = next(data_iterator)
    output = model(batch["images"], batch["text_ids"], batch["text_padding_mask"])

    def loss_func(output_tensor, non_loss_data: bool = False):
        image_embeds, text_embeds = output_tensor[:2]
        if non_loss_data:  # evaluation collects embeddings instead of a loss
            return image_embeds, text_embeds
        loss, metrics = itc_loss(image_embeds, text_embeds, unwrap(model).logit_scale, chunk_size=itc_chunk_size)
        return loss, metrics

    return output, loss_func


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


def _reduce_metrics(losses: list[dict]) -> dict[str, float]:
    """Average the last stage's per-micro-batch metrics over micro-batches and data-parallel ranks."""
    if not losses:
        return {}
    names = sorted(losses[0])
    stacked = torch.stack([torch.stack([m[n].float().reshape(()) for n in names]) for m in losses]).mean(0)
    dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
    stacked /= parallel_state.get_data_parallel_world_size()
    return dict(zip(names, stacked.tolist()))


def train_step(model, optimizer, scheduler, data_iterator, args: argparse.Namespace) -> dict[str, float]:
    config = args.model_config
    num_microbatches = args.global_batch_size // (args.micro_batch_size * args.layout.data_parallel_size)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, itc_chunk_size=args.itc_chunk_size or None),
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=sequence_length(config),
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
    )
    update_ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    metrics = _reduce_metrics(losses) if parallel_state.is_pipeline_last_stage() else {}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if not update_ok:
        metrics["skipped"] = 1.0
    return metrics


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """LiT: no gradients for the vision tower; returns the number of frozen parameters."""
    frozen = 0
    for name, param in model.named_parameters():
        if model.is_vision_parameter(name):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def pretrain(args: argparse.Namespace, eval_fn=None) -> dict[str, Any]:
    """Train as the flags say; returns the history (losses and evaluations) for the demo and tests."""
    from megatron_m2.data import build_train_data, check_vocab, load_tokenizer, resolve_shards
    from megatron_m2.models import build_model

    layout = args.layout
    config = args.model_config
    # Cheap input checks first: a missing shard or a wrong tokenizer must fail before the model is allocated.
    shards = resolve_shards(args.data_path)
    tokenizer = load_tokenizer(args.tokenizer_model, config.max_text_length)
    check_vocab(tokenizer, config.vocab_size)

    resume = checkpointing.latest_iteration(args.load) is not None
    if resume and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        checkpointing.check_schedule(args.load, schedule(args))

    parallel.initialize_model_parallel(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                                       layout.itc_group_size, seed=args.seed)
    overrides = {}
    if args.recompute_activations:
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if args.bf16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    model = build_model(config, spec=args.spec, **overrides)
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

    data = build_train_data(shards, tokenizer, config, args.micro_batch_size,
                            parallel_state.get_data_parallel_rank(), layout.data_parallel_size, args.seed,
                            hflip=args.hflip)
    if rank_state is not None:
        data.load_state_dict(rank_state["data"])
        torch.set_rng_state(rank_state["torch_rng"])
    elif resume:
        print_rank_0("data-parallel size changed since the checkpoint: data streams restart from the beginning")

    logger = MetricsLogger(args.tensorboard_dir, args.train_iters, model_flops_per_sample(config),
                           dist.get_world_size(), torch.cuda.is_available(), args.metrics_file)
    sigterm = SigtermFlag()
    history: dict[str, Any] = {"iteration": [], "loss": [], "eval": []}

    def save(step: int) -> None:
        rank_state = {"data": data.state_dict(), "torch_rng": torch.get_rng_state()}
        start = time.perf_counter()
        path = checkpointing.save_checkpoint(args.save, step, model, optimizer, scheduler, rank_state,
                                             common={"model_config": config.to_dict()})
        print_rank_0(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")

    print_rank_0(f"training {args.model} ({model.spec} layer spec, {'bf16' if args.bf16 else 'fp32'}) for "
                 f"{args.train_iters} iterations: TP {layout.tensor_model_parallel_size} "
                 f"PP {layout.pipeline_model_parallel_size} DP {layout.data_parallel_size} ITC group "
                 f"{layout.itc_group_size}, global batch {args.global_batch_size}")
    def evaluate(step: int) -> None:
        start = time.perf_counter()
        results = eval_fn(model, tokenizer)
        history["eval"].append({"iteration": step, **results})
        logger.scalars("eval", results, step)
        print_rank_0(f" eval at iteration {step} ({time.perf_counter() - start:.1f} s): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in results.items()))

    if eval_fn is not None and args.eval_at_start and iteration == 0:
        evaluate(0)
    while iteration < args.train_iters:
        metrics = train_step(ddp, optimizer, scheduler, data, args)
        iteration += 1
        logger.step(iteration, iteration * args.global_batch_size, args.global_batch_size, metrics,
                    print_line=iteration % args.log_interval == 0 or iteration == args.train_iters)
        if "itc_loss" in metrics:
            history["iteration"].append(iteration)
            history["loss"].append(metrics["itc_loss"])
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
    logger.close()
    history["data_stats"] = getattr(data, "stats", {})
    return history
