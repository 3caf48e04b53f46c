"""Weights & Biases logging, as Megatron-LM's --wandb-project / --wandb-exp-name / --wandb-save-dir.

The logging rank (the one that writes TensorBoard, training/progress.py) logs the same scalars under the same names,
with the iteration as wandb's step; the run's flags are its config. The run id is agreed by all ranks at start and
saved in the checkpoint, so a resumed job continues the same wandb run (wandb's resume="allow"). wandb is an optional
extra (`pip install 'megatron-m2[wandb]'`): nothing imports it unless a flag asks for it. For a machine without
network, WANDB_MODE=offline writes the run under --wandb-save-dir for a later `wandb sync`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import secrets
from typing import Any, Optional

import torch.distributed as dist

from megatron_m2.errors import ConfigError

RUN_ID_KEY = "wandb_run_id"  # in the checkpoint's common state
INSTALL_HINT = "pip install 'megatron-m2[wandb]' (or pip install wandb)"


def check_wandb_arguments(args: argparse.Namespace) -> None:
    """Flag errors before anything is built: the extra flags need --wandb-project, which needs the package."""
    if not args.wandb_project:
        for flag in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(args, flag):
                raise ConfigError(f"--{flag.replace('_', '-')} needs --wandb-project NAME")
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb-project needs the wandb package, which is not installed: {INSTALL_HINT}")


def save_dir(args: argparse.Namespace) -> Optional[str]:
    """--wandb-save-dir, else SAVE/wandb as Megatron-LM (else wandb's default, ./wandb)."""
    if args.wandb_save_dir:
        return args.wandb_save_dir
    return os.path.join(args.save, "wandb") if args.save else None


def agree_on_run_id(saved: Optional[str]) -> str:
    """The run id every rank uses: the checkpoint's (a resume continues its run), else a new one from rank 0.
    Collective. Drawn from the OS, not from torch/numpy, so the training RNG streams are untouched."""
    chosen = [saved or secrets.token_hex(4)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a JSON-friendly dict (the model config and layout as their fields)."""
    config = {}
    for name, value in vars(args).items():
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif not isinstance(value, (str, int, float, bool, list, tuple, dict, type(None))):
            value = str(value)
        config[name] = value
    return config


class WandbRun:
    """One wandb run; `log(values, step)` adds a row of scalars at that step."""

    def __init__(self, project: str, name: Optional[str], directory: Optional[str], run_id: str,
                 config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"--wandb-project needs the wandb package: {INSTALL_HINT}") from None
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=project, name=name or None, dir=directory, id=run_id, resume="allow",
                              config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def build_wandb_run(args: argparse.Namespace, saved_run_id: Optional[str], logging_rank: bool
                    ) -> tuple[Optional[WandbRun], Optional[str]]:
    """(the run on the logging rank or None, the agreed run id or None without --wandb-project). Collective."""
    if not args.wandb_project:
        return None, None
    run_id = agree_on_run_id(saved_run_id)
    if not logging_rank:
        return None, run_id
    return WandbRun(args.wandb_project, args.wandb_exp_name, save_dir(args), run_id, run_config(args)), run_id
