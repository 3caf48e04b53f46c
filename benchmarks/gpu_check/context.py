"""What the parts share (the mode, the device, a work directory, the data set, the runs done) and the
environment recorded in the report."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from benchmarks.gpu_check.settings import DRY_RUN_SETTINGS, GIB, GPU_SETTINGS, GRACE_S, ROOT


class Context:
    """What the parts share: the mode, the device, a work directory, the data set and the training runs done."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]):
        import torch

        self.args, self.log = args, log
        self.dry_run = args.dry_run
        self.settings = DRY_RUN_SETTINGS if args.dry_run else GPU_SETTINGS
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.work_dir = Path(tempfile.mkdtemp(prefix="m2_gpu_check_"))
        self.runs: dict[tuple, dict] = {}  # training runs by (preset, micro-batch, recompute, bf16)
        self.speed_runs: list[dict] = []
        self._data: Optional[Path] = None
        self._parallel = False

    def data_dir(self) -> Path:
        """The digits data + tokenizer (demo.prepare's layout): --data-dir, else $M2_WHEELS/digits (make gpu-wheels
        puts it there: the GPU machine may lack scikit-learn), else prepared here."""
        if self._data is None:
            given = self.args.data_dir
            candidate = Path(given) if given else Path(os.environ.get("M2_WHEELS", ROOT / ".gpu_wheels")) / "digits"
            if (candidate / "tokenizer.model").exists() and (candidate / "data" / "train").is_dir():
                self._data = candidate
            elif given:
                raise FileNotFoundError(f"--data-dir {given}: no tokenizer.model and data/train (demo.prepare's "
                                        "layout: python -m megatron_m2.demo prepare --output-dir DIR)")
            else:
                from megatron_m2.demo import prepare

                self._data = self.work_dir / "digits"
                self.log(f"preparing the digits data in {self._data}")
                prepare(self._data)
        return self._data

    def ensure_parallel(self) -> None:
        if not self._parallel:
            from megatron_m2 import parallel

            parallel.initialize_model_parallel(1, 1)
            self._parallel = True

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def close(self) -> None:
        import shutil

        if self._parallel:
            from megatron_m2 import parallel

            parallel.destroy_model_parallel()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def left(self) -> float:
        return self.args.deadline - time.monotonic()

    def start_trainer(self, run_dir: Path, flags: list[str], env: dict, nproc: int = 1
                      ) -> tuple[subprocess.Popen, Path, Path]:
        """The trainer (python -m megatron_m2.train; torchrun with `nproc` processes) with `flags` and its metrics in
        run_dir/metrics.jsonl, its output in run_dir/log.txt; returns (process, run_dir, log)."""
        run_dir.mkdir(parents=True)
        log = run_dir / "log.txt"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", "megatron_m2.train", *flags, "--metrics-file",
               str(run_dir / "metrics.jsonl")]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return proc, run_dir, log

    def wait_trainers(self, runs) -> None:
        """Wait for `start_trainer`'s runs within the budget; an error names the run and shows its log's end."""
        try:
            for proc, run_dir, log in runs:
                try:
                    rc = proc.wait(timeout=max(self.left() - GRACE_S, 5))
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                if rc != 0:
                    raise RuntimeError(f"trainer run {run_dir.name} exited {rc}:\n{log.read_text()[-3000:]}")
        finally:  # a failed, timed-out or interrupted wait leaves no trainer behind
            for proc, _, _ in runs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _trainer_losses(metrics_file: Path, name: str = "itc_loss") -> dict[int, float]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return {r["iteration"]: r[name] for r in records if r["kind"] == "train" and name in r}



def environment(ctx: Context) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_count": os.cpu_count(), "host": platform.node(),
           "device": torch.cuda.get_device_name() if ctx.cuda else "cpu"}
    if ctx.cuda:
        env["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    try:
        from importlib.metadata import version

        env["megatron_core"] = version("megatron-core")
    except Exception as error:  # an unpacked wheel without metadata
        env["megatron_core"] = f"unknown ({type(error).__name__})"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env

