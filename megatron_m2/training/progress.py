"""Progress lines, TensorBoard scalars and the JSONL metrics file, in Megatron-LM's names, written by one rank (the
last one, which holds the loss).

TensorBoard tags follow megatron/training/training.py's training_log, so Megatron users' dashboards work:
`learning-rate`, `batch-size`, `<loss name>` (here `itc-loss`, and `cmlm-loss` / `cmim-loss` with those objectives),
`grad-norm`, `logit-scale`, each also as
`<tag> vs samples` (x axis = consumed samples), `iteration-time`, `throughput` (TFLOP/s per GPU, on GPU), plus
`samples-per-second`, `skipped-iterations` and `nan-iterations`. The log line reads like Megatron-LM's.
The metrics file keeps one JSON object per step with the raw metric names (itc_loss, lr, ...) and consumed samples.
With --wandb-project the same scalars go to Weights & Biases under the same tags (training/wandb_run.py), with the
iteration as its step (the "vs samples" copies are TensorBoard's way of changing the x axis; wandb gets
`consumed-samples` instead).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from megatron_m2.parallel import is_logging_rank
from megatron_m2.progress_line import format_duration
from megatron_m2.training.wandb_run import WandbRun

# raw metric name -> Megatron-LM style tag
TAGS = {"lr": "learning-rate", "itc_loss": "itc-loss", "cmlm_loss": "cmlm-loss", "cmim_loss": "cmim-loss",
        "grad_norm": "grad-norm", "logit_scale": "logit-scale", "i2t_acc": "i2t-accuracy", "t2i_acc": "t2i-accuracy"}
# the log line's label for each raw metric, in the order Megatron-LM prints them
LABELS = {"lr": "learning rate", "itc_loss": "itc loss", "cmlm_loss": "cmlm loss", "cmim_loss": "cmim loss",
          "logit_scale": "logit scale", "i2t_acc": "i2t acc", "t2i_acc": "t2i acc", "grad_norm": "grad norm"}
LOSSES = ("itc_loss", "cmlm_loss", "cmim_loss")  # printed as Megatron-LM prints its lm loss; a NaN one counts


class MetricsLogger:
    """One line per --log-interval; TensorBoard scalars and the metrics file every step."""

    def __init__(self, tensorboard_dir: Optional[str], train_iters: int, flops_per_sample: float,
                 world_size: int, on_gpu: bool, metrics_file: Optional[str] = None,
                 wandb_run: Optional[WandbRun] = None):
        self.enabled = is_logging_rank()
        self.wandb_run = wandb_run if self.enabled else None
        self._wandb_row: dict[str, float] = {}
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
        self.skipped_iterations = self.nan_iterations = 0
        self._window_start, self._window_samples, self._window_iterations = time.perf_counter(), 0, 0

    def step(self, iteration: int, consumed_samples: int, batch_samples: int, scalars: dict[str, float],
             print_line: bool) -> None:
        self._window_samples += batch_samples
        self._window_iterations += 1
        self.skipped_iterations += int(scalars.get("skipped", 0))
        self.nan_iterations += int(any(not math.isfinite(scalars[name]) for name in LOSSES if name in scalars))
        if not self.enabled:
            return
        self._record("train", iteration, {"consumed_samples": consumed_samples, **scalars})
        self._scalar("consumed-samples", consumed_samples, iteration, tensorboard=False)
        self._scalar("batch-size", batch_samples, iteration, consumed_samples)
        for name, value in scalars.items():
            if name != "skipped":
                self._scalar(TAGS.get(name, name), value, iteration, consumed_samples)
        self._scalar("skipped-iterations", self.skipped_iterations, iteration)
        self._scalar("nan-iterations", self.nan_iterations, iteration)
        if not print_line:
            self._flush_wandb(iteration)
            return
        elapsed = time.perf_counter() - self._window_start
        iteration_time = elapsed / max(self._window_iterations, 1)
        samples_per_s = self._window_samples / max(elapsed, 1e-9)
        parts = [f" iteration {iteration:8d}/{self.train_iters:8d}", f"consumed samples: {consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {1000 * iteration_time:.1f}",
                 f"time left: {format_duration(iteration_time * (self.train_iters - iteration))}"]
        if self.on_gpu:
            tflops = samples_per_s * self.flops_per_sample / self.world_size / 1e12
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
            self._scalar("throughput", tflops, iteration)
        if "lr" in scalars:
            parts.append(f"learning rate: {scalars['lr']:.6E}")
        parts.append(f"global batch size: {batch_samples:5d}")
        for name, label in LABELS.items():
            if name in scalars and name != "lr":
                parts.append(f"{label}: {scalars[name]:.6E}" if name in LOSSES else f"{label}: {scalars[name]:.4g}")
        # per-reason skip counts go to TensorBoard and the metrics file only: the line keeps the totals
        parts += [f"{name}: {value:.6g}" for name, value in scalars.items()
                  if name not in LABELS and name != "skipped" and "skipped/" not in name]
        parts += [f"number of skipped iterations: {self.skipped_iterations:3d}",
                  f"number of nan iterations: {self.nan_iterations:3d}", f"samples/s: {samples_per_s:.2f}"]
        self._scalar("iteration-time", iteration_time, iteration)
        self._scalar("samples-per-second", samples_per_s, iteration)
        self._flush_wandb(iteration)
        print(" | ".join(parts) + " |", flush=True)
        self._window_start, self._window_samples, self._window_iterations = time.perf_counter(), 0, 0

    def _scalar(self, tag: str, value: float, iteration: int, consumed_samples: Optional[int] = None,
                tensorboard: bool = True) -> None:
        """One scalar to TensorBoard (also against consumed samples when given) and to the step's wandb row."""
        if self.writer is not None and tensorboard:
            self.writer.add_scalar(tag, value, iteration)
            if consumed_samples is not None:
                self.writer.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if self.wandb_run is not None:
            self._wandb_row[tag] = value

    def _flush_wandb(self, iteration: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(self._wandb_row, iteration)
        self._wandb_row = {}

    def _record(self, kind: str, iteration: int, values: dict[str, float]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")
            self.metrics_file.flush()

    def scalars(self, prefix: str, values: dict[str, float], iteration: int) -> None:
        """Evaluation results (and other non-step series) under `prefix/`, e.g. eval/en/top1."""
        if not self.enabled:
            return
        self._record(prefix, iteration, values)
        for name, value in values.items():
            self._scalar(f"{prefix}/{name}", value, iteration)
        self._flush_wandb(iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
