"""Real training steps outside the pretraining loop, built from the trainer's own flags and pieces.

What `tools/plan.py --measure` and `benchmarks/gpu_check/` run: one process (call
`parallel.initialize_model_parallel(1, 1)` first), the trainer's model, megatron-core DDP, optimizer, schedule and
`train_step`, on synthetic batches. Nothing here reads data files or a tokenizer.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from megatron_m2.config import M2Config, load_config


def trainer_args(model: str, micro_batch_size: int, global_batch_size: Optional[int] = None, *, bf16: bool = False,
                 recompute: bool = False, spec: str = "local", use_distributed_optimizer: bool = False,
                 config: Optional[M2Config] = None, extra: Sequence[str] = ()) -> argparse.Namespace:
    """The trainer's argument namespace for these settings, validated for a world of one process.

    Parsed with --dry-run so that validation skips the data/tokenizer flags (and the CUDA checks of --bf16), then
    switched back to a real run. `extra`: any other trainer flags.
    """
    from megatron_m2.training.arguments import build_parser, validate_args

    flags = ["--model", model, "--micro-batch-size", str(micro_batch_size), "--global-batch-size",
             str(global_batch_size or micro_batch_size), "--spec", spec, "--dry-run", *extra]
    flags += ["--bf16"] * bf16 + ["--recompute-activations"] * recompute
    flags += ["--use-distributed-optimizer"] * use_distributed_optimizer
    args = build_parser().parse_args(flags)
    args.model_config = config if config is not None else load_config(model)
    args.layout = validate_args(args, world_size=1)
    args.dry_run = False
    return args


@dataclass
class TrainingPieces:
    """What the pretraining loop builds before its first step."""

    model: torch.nn.Module  # this process's stage (unwrapped)
    ddp: torch.nn.Module
    optimizer: Any
    scheduler: Any
    step_config: Any  # training.step.StepConfig

    def step(self, data_iterator: Iterator[dict]) -> dict[str, float]:
        """One optimizer step (training/step.py's train_step); returns its metrics."""
        from megatron_m2.training.step import forward_step, train_step

        return train_step(forward_step, data_iterator, self.ddp, self.optimizer, self.scheduler, self.step_config)


def build_training(args: argparse.Namespace, state_dict: Optional[dict] = None) -> TrainingPieces:
    """The model, DDP, optimizer and schedule as `training.loop.pretrain` builds them. `state_dict` (e.g. the weights
    of a float32 model, cast on load) is loaded before the optimizer copies the weights into its master copy."""
    from megatron_m2.training.arguments import model_overrides
    from megatron_m2.models import build_model
    from megatron_m2.training.batch_schedule import configure_microbatches
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import masked_modeling_from_args, step_config_from_args

    configure_microbatches(args, args.layout)
    objectives = masked_modeling_from_args(args)
    model = build_model(args.model_config, spec=args.spec, cmlm=objectives.cmlm, cmim=objectives.cmim,
                        **model_overrides(args))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    ddp = wrap_ddp(model, args)
    optimizer, scheduler = build_optimizer(ddp, args)
    return TrainingPieces(model, ddp, optimizer, scheduler, step_config_from_args(args))


def synthetic_batches(config: M2Config, batch_size: int, count: int = 1, device: Any = "cpu", seed: int = 0,
                      image_dtype: torch.dtype = torch.float32, padding: bool = False,
                      text_mask_prob: Optional[float] = None, image_mask_ratio: Optional[float] = None) -> list[dict]:
    """`count` reproducible batches in the trainer's batch format. image_dtype torch.uint8 gives 0-255 pixels as the
    data loader delivers them (train_step normalises them on the device); a float dtype gives N(0, 1) pixels.
    padding: random text lengths (else every token is real). text_mask_prob / image_mask_ratio: the CMLM / CMIM masks
    (data/masking.py's entries: that share of real tokens predicted, as [MASK] = id 3; that share of patches)."""
    from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS, num_masked_patches

    gen = torch.Generator().manual_seed(seed)
    b, length, size = batch_size, config.max_text_length, config.image_size
    batches = []
    for _ in range(count):
        shape = (b, config.num_channels, size, size)
        if image_dtype == torch.uint8:
            images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            images = torch.randn(shape, generator=gen).to(image_dtype)
        text_ids = torch.randint(0, config.vocab_size, (b, length), generator=gen)
        if padding:
            lengths = torch.randint(2, length + 1, (b, 1), generator=gen)
            mask = torch.arange(length)[None, :] >= lengths
        else:
            mask = torch.zeros(b, length, dtype=torch.bool)
        batch = dict(images=images, text_ids=text_ids, text_padding_mask=mask)
        if text_mask_prob is not None:
            targets = (torch.rand(b, length, generator=gen) < text_mask_prob) & ~mask
            batch.update({TEXT_TARGETS: targets, MASKED_TEXT_IDS: text_ids.masked_fill(targets, 3)})
        if image_mask_ratio is not None:
            k = num_masked_patches(config.num_patches, image_mask_ratio)
            order = torch.rand(b, config.num_patches, generator=gen).argsort(dim=1)
            batch[IMAGE_PATCH_MASK] = torch.zeros(b, config.num_patches, dtype=torch.bool).scatter_(
                1, order[:, :k], True)
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

