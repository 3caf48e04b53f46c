"""Megatron-style progress lines and TensorBoard scalars, written by one rank (the last one, which holds the loss)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_m2.config import M2Config


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)



class MetricsLogger:
    """One line per --log-interval with iteration, samples, loss, lr, grad norm, logit scale and throughput."""

    def __init__(self, tensorboard_dir: Optional[str], train_iters: int, flops_per_sample: float,
                 world_size: int, on_gpu: bool, metrics_file: Optional[str] = None):
        self.enabled = is_logging_rank()
        self.metrics_file = None
        if self.enabled and metrics_file:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(metrics_file, "a", encoding="utf-8")
        self.train_iters, self.flops_per_sample = train_iters, flops_per_sample
        self.world_size, self.on_gpu = world_size, on_gpu
        self.writer = None
        if self.enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._window_start, self._window_samples = time.perf_counter(), 0

    def step(self, iteration: int, consumed_samples: int, batch_samples: int, scalars: dict[str, float],
             print_line: bool) -> None:
        self._window_samples += batch_samples
        if not self.enabled:
            return
        self._record("train", iteration, scalars)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, iteration)
        if not print_line:
            return
        elapsed = time.perf_counter() - self._window_start
        samples_per_s = self._window_samples / max(elapsed, 1e-9)
        parts = [f" iteration {iteration:8d}/{self.train_iters:8d}", f"consumed samples: {consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {1000 * elapsed * batch_samples / max(self._window_samples, 1):.1f}"]
        parts += [f"{name}: {value:.6g}" for name, value in scalars.items()]
        parts.append(f"samples/s: {samples_per_s:.2f}")
        if self.on_gpu:
            tflops = samples_per_s * self.flops_per_sample / self.world_size / 1e12
            parts.append(f"TFLOP/s/GPU: {tflops:.1f}")
            if self.writer is not None:
                self.writer.add_scalar("train/tflops_per_gpu", tflops, iteration)
        if self.writer is not None:
            self.writer.add_scalar("train/samples_per_second", samples_per_s, iteration)
        print(" | ".join(parts), flush=True)
        sys.stdout.flush()
        self._window_start, self._window_samples = time.perf_counter(), 0

    def _record(self, kind: str, iteration: int, values: dict[str, float]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")
            self.metrics_file.flush()

    def scalars(self, prefix: str, values: dict[str, float], iteration: int) -> None:
        if self.enabled:
            self._record(prefix, iteration, values)
        if self.enabled and self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
