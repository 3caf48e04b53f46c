"""The GPU check (issue 15): the first measured figures of the trainer on one GPU, in one command under 8 minutes.

    bash benchmarks/gpu_check.sh [--parts parity,itc,...] [--budget-s 420]   # on the GPU machine
    bash benchmarks/gpu_check.sh --dry-run                                   # every part that can, on CPU

Parts (each one's result, or its error, goes into one JSON; a part that fails does not stop the others):
  parity   the trainer (python -m megatron_m2.train, tiny preset, TP1 x PP1, float32, the digits data, M2's full
           objective ITC + CMIM + CMLM): 6 steps on the CPU (CUDA hidden), saving each, then steps 2..6 on CUDA
           resumed from the CPU's step-1 checkpoint: the same per-step ITC, CMLM and CMIM losses (rel 1e-4). The CUDA run starts from the CPU's checkpoint because on a GPU megatron
           initialises the weights with the CUDA RNG (other weights than on the CPU); TF32 is off in the CUDA run
           (NVIDIA_TF32_OVERRIDE=0: cuDNN's convolution, the patch embedding, uses TF32 by default).
  itc      megatron_m2.loss.itc_loss on one device (no group): forward + backward time and peak memory of the
           unchunked loss and the chunked one (--itc-chunk-size) at large local batches, bf16 and fp32.
  bf16     a few training steps of the 0.4b and 1b presets (local spec) in float32 and in bf16 from the same weights
           and batches: losses finite and close (first step rel 5e-2, later steps 1e-1); on 0.4b also bf16 with
           --use-distributed-optimizer (same losses as without, rel 1e-3).
  speed    the 1b preset, bf16, local spec, micro-batch sized by the planner for 139 GiB, without and with
           --recompute-activations (at the same micro-batch, and at the largest one recompute allows, at most 512):
           steady-state step time after warm-up (torch.cuda.synchronize after every step), model TFLOP/s
           (arithmetic.model_flops_per_sample x samples/s), hardware TFLOP/s (x 4/3 with recompute: one more forward),
           and MFU / HFU against the H200's measured dense bf16 peak (790 TFLOP/s).
  memory   for the speed part's runs: torch.cuda.max_memory_allocated() against planner.plan_layout's prediction for
           the same settings (without its reserved_gb); the check: the peak stays within the prediction plus the
           planner's reserve (what `fits` promises).
  profile  torch.profiler over one 1b step of the speed part: the ten CUDA kernels with the most time.
--dry-run (CPU, CUDA hidden): parity with both runs on CPU, itc at small sizes, bf16 as float32 against float32 on the
tiny preset (megatron's bf16 optimizer needs CUDA), speed and memory on the tiny preset (memory: torch's CPU
allocations counted by torch.profiler), no profile.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("parity", "itc", "bf16", "speed", "memory", "profile")
PEAK_TFLOPS = 790.0  # dense bf16 matmul as measured on the H200 this check is for (not the 989 of the H200 spec sheet)
GPU_MEMORY_GB = 139.0
RECOMPUTE_FLOPS = 4 / 3  # full recompute runs every layer's forward twice: 4 forward-equivalents instead of 3
PARITY_RTOL = 1e-4
PARITY_STEPS = 5
BF16_FIRST_RTOL = 5e-2  # first step: the same weights (bf16-rounded) on the same batch
BF16_RTOL = 1e-1  # later steps: after bf16 updates
DIST_OPT_RTOL = 1e-3
MEMORY_HEADROOM = 0.9  # size the speed part's micro-batch to 90% of the GPU (the planner's estimate may be low)
MICRO_BATCH_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# rough seconds each part needs on the GPU machine; a part is skipped when less than this is left of the budget
ESTIMATE_S = {"parity": 60, "itc": 20, "bf16": 60, "speed": 60, "memory": 1, "profile": 15}
GRACE_S = 10  # kept back from each part's time limit to write the JSON
GIB = 1024**3


@dataclass(frozen=True)
class Settings:
    """Sizes of one mode (the GPU run, or the CPU dry run)."""

    bf16_presets: tuple = ("0.4b", "1b")
    bf16_micro_batch: int = 16
    bf16_steps: int = 3
    low_precision: bool = True  # bf16; the dry run compares float32 with float32
    speed_preset: str = "1b"
    speed_max_micro_batch: int = 512
    speed_warmup: int = 2
    speed_min_steps: int = 3
    speed_max_steps: int = 20
    speed_step_budget_s: float = 12.0  # timed steps per run: as many as fit in this (within min/max)
    itc_rows: tuple = (8192, 16384, 32768)
    itc_dim: int = 1024
    itc_chunk: int = 4096
    itc_dtypes: tuple = ("bfloat16", "float32")
    itc_reps: int = 3
    profile: bool = True


GPU_SETTINGS = Settings()
DRY_RUN_SETTINGS = Settings(bf16_presets=("tiny",), bf16_steps=2, low_precision=False, speed_preset="tiny",
                            speed_max_micro_batch=16, speed_warmup=2, speed_min_steps=2, speed_max_steps=2,
                            itc_rows=(128, 512), itc_dim=32, itc_chunk=64, itc_reps=1, profile=False)


class Skip(Exception):
    """A part that does not apply here; the message is the reason recorded in the JSON."""


class PartTimeout(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# running parts, the JSON and the summary (no torch: unit-tested without it)

def check(passed: bool, value: Any, limit: Any, what: str) -> dict:
    """One pass/fail criterion of a part: `value` against `limit`, explained by `what`."""
    return {"passed": bool(passed), "value": value, "limit": limit, "what": what}


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise PartTimeout in this (main) thread after `seconds`, so a part over the budget still leaves a JSON."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"over its time limit of {seconds:.0f} s (the --budget-s left when it started)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_parts(parts: Sequence[tuple[str, Callable[[Any], dict]]], ctx: Any, deadline: float,
              on_result: Optional[Callable[[dict], None]] = None, cleanup: Optional[Callable[[], None]] = None,
              log: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """Run each part; record {status, seconds, ...its result}. status: ok, failed (a check did not pass), error (an
    exception, with its traceback), skipped (with the reason). `deadline` is a time.monotonic() value."""
    results: dict[str, dict] = {}
    for name, func in parts:
        left = deadline - time.monotonic()
        need = ESTIMATE_S.get(name, 0)
        start = time.perf_counter()
        if left < need:
            results[name] = {"status": "skipped",
                             "reason": f"time budget: {max(left, 0):.0f} s left, the part needs about {need} s"}
        else:
            log(f"{name}: start ({left:.0f} s of the budget left)")
            try:
                with time_limit(left - GRACE_S if math.isfinite(left) else None):
                    out = dict(func(ctx) or {})
                failed = any(not c["passed"] for c in out.get("checks", {}).values())
                results[name] = {"status": "failed" if failed else "ok", **out}
            except Skip as skip:
                results[name] = {"status": "skipped", "reason": str(skip)}
            except Exception as error:  # one part failing must not stop the others
                results[name] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc()[-6000:]}
            finally:
                if cleanup is not None:
                    cleanup()
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        log(f"{name}: {results[name]['status']} in {results[name]['seconds']:.1f} s")
        if on_result is not None:
            on_result(results)
    return results


def overall_status(parts: dict[str, dict]) -> str:
    return "ok" if all(p["status"] in ("ok", "skipped") for p in parts.values()) else "failed"


def format_summary(report: dict) -> str:
    """The printed table: one row per part with its headline figures, the reason for a skip or the error."""
    rows = [("part", "status", "seconds", "result")]
    for name, part in report["parts"].items():
        detail = part.get("summary") or part.get("reason") or part.get("error", "")
        failed = [key for key, c in part.get("checks", {}).items() if not c["passed"]]
        if failed:
            detail += f" [check failed: {', '.join(failed)}]"
        rows.append((name, part["status"], f"{part.get('seconds', 0.0):.1f}", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    env = report.get("environment", {})
    head = (f"GPU check{' (dry run, CPU)' if report.get('dry_run') else ''} on {env.get('device', '?')}: "
            f"{report.get('status', '?')} in {report.get('wall_s', 0.0):.0f} s")
    return "\n".join([head, lines[0], "-" * len(lines[0]), *lines[1:]])


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


def compare_losses(reference: dict[int, float], other: dict[int, float], rtol: float) -> dict:
    """Per-step relative difference of two loss curves (keyed by iteration); passed = same steps, all within rtol."""
    steps = sorted(set(reference) & set(other))
    rel = [abs(other[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in steps]
    same_steps = sorted(reference) == sorted(other) and bool(steps)
    return {"steps": steps, "rel_diff": rel, "max_rel_diff": max(rel, default=float("nan")),
            "passed": same_steps and all(r <= rtol for r in rel), "rtol": rtol,  # False for a NaN or inf loss too
            "same_steps": same_steps}


def planned_micro_batch(config, recompute: bool, bf16: bool = True, memory_gb: float = GPU_MEMORY_GB,
                        headroom: float = MEMORY_HEADROOM, cap: int = 512) -> tuple[int, float]:
    """The largest candidate micro-batch (at most `cap`) whose planner total, reserve included, fits in
    headroom x memory at TP1 PP1 with the local spec; returns it and that predicted total in bytes."""
    from megatron_m2 import planner
    from megatron_m2.errors import ConfigError

    best = None
    for b in MICRO_BATCH_CANDIDATES:
        if b > cap:
            break
        plan = planner.plan_layout(config, 1, 1, 1, 0, planner.Training(
            micro_batch_size=b, global_batch_size=b, bf16=bf16, recompute=recompute, spec="local"),
            planner.Hardware(gpu_memory_gb=memory_gb))
        if plan.memory["total"] > headroom * memory_gb * GIB:
            break
        best = (b, plan.memory["total"])
    if best is None:
        raise ConfigError(f"no micro-batch fits in {headroom:.0%} of {memory_gb} GiB")
    return best


def predicted_memory(config, micro_batch: int, recompute: bool, bf16: bool) -> dict[str, float]:
    """planner.plan_layout's per-GPU memory terms (bytes) for one process, TP1 PP1, local spec."""
    from megatron_m2 import planner

    return planner.plan_layout(config, 1, 1, 1, 0, planner.Training(
        micro_batch_size=micro_batch, global_batch_size=micro_batch, bf16=bf16, recompute=recompute, spec="local"),
        planner.Hardware(gpu_memory_gb=GPU_MEMORY_GB)).memory


def speed_plan(config, settings: Settings) -> list[tuple[bool, int]]:
    """(recompute, micro-batch) of the speed part's runs: the planner's size without recompute, recompute at the same
    size (its cost), recompute at the largest size it allows (at most speed_max_micro_batch)."""
    bf16 = settings.low_precision
    plain, _ = planned_micro_batch(config, False, bf16, cap=settings.speed_max_micro_batch)
    big, _ = planned_micro_batch(config, True, bf16, cap=settings.speed_max_micro_batch)
    runs = [(False, plain), (True, plain), (True, big)]
    return [run for i, run in enumerate(runs) if run not in runs[:i]]


# ---------------------------------------------------------------------------------------------------------------------
# the parts

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


PARITY_LOSSES = ("itc_loss", "cmlm_loss", "cmim_loss")


def _trainer_losses(metrics_file: Path, name: str = "itc_loss") -> dict[int, float]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return {r["iteration"]: r[name] for r in records if r["kind"] == "train" and name in r}


def part_parity(ctx: Context) -> dict:
    import shutil

    from megatron_m2.checkpoint_layout import checkpoint_dir

    data, root = ctx.data_dir(), ctx.work_dir / "parity"
    ckpt = root / "ckpt"
    flags = ["--model", "tiny", "--spec", "local", "--tensor-model-parallel-size", "1",
             "--pipeline-model-parallel-size", "1", "--micro-batch-size", "8", "--global-batch-size", "16",
             "--train-iters", str(PARITY_STEPS + 1), "--lr", "2e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
             "--seed", "7", "--num-workers", "0", "--no-hflip", "--data-path", str(data / "data" / "train"),
             "--tokenizer-model", str(data / "tokenizer.model"), "--cmlm-weight", "1", "--cmim-weight", "1"]
    cpu_env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    device_env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0") if ctx.cuda else cpu_env
    device_name = "cuda" if ctx.cuda else "cpu"

    def start(name: str, env: dict, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
        run_dir = root / name
        run_dir.mkdir(parents=True)
        log = run_dir / "log.txt"
        cmd = [sys.executable, "-m", "megatron_m2.train", *flags, "--metrics-file", str(run_dir / "metrics.jsonl"),
               *extra]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return proc, run_dir, log

    def wait(runs) -> None:
        try:
            for proc, run_dir, log in runs:
                try:
                    rc = proc.wait(timeout=max(ctx.left() - GRACE_S, 5))
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                if rc != 0:
                    raise RuntimeError(f"trainer run {run_dir.name} exited {rc}:\n{log.read_text()[-3000:]}")
        finally:  # a failed, timed-out or interrupted wait leaves no trainer behind
            for proc, _, _ in runs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    # All 6 steps on the CPU, saving each; then steps 2..6 on the device from the CPU's checkpoint of step 1 (alone in
    # a directory of its own, so --load takes it). An uninterrupted run and a resumed one give the same losses
    # (tests/test_training.py), so the dry run, where both are on the CPU, must match too.
    cpu_run = start("cpu", cpu_env, "--save", str(ckpt), "--save-interval", "1")
    wait([cpu_run])
    first = root / "ckpt_step1"
    shutil.copytree(checkpoint_dir(ckpt, 1), checkpoint_dir(first, 1))
    device_run = start(device_name if ctx.cuda else "cpu_resumed", device_env, "--load", str(first))
    wait([device_run])
    comparisons = {}
    for name in PARITY_LOSSES:
        cpu, device = (_trainer_losses(run_dir / "metrics.jsonl", name) for _, run_dir, _ in (cpu_run, device_run))
        cpu = {step: loss for step, loss in cpu.items() if step > 1}
        comparisons[name] = compare_losses(cpu, device, PARITY_RTOL)
    result = dict(comparisons["itc_loss"], passed=all(c["passed"] for c in comparisons.values()),
                  max_rel_diff=max(c["max_rel_diff"] for c in comparisons.values()))
    cpu, device = (_trainer_losses(run_dir / "metrics.jsonl") for _, run_dir, _ in (cpu_run, device_run))
    cpu = {step: loss for step, loss in cpu.items() if step > 1}
    expected = list(range(2, PARITY_STEPS + 2))
    return {
        "summary": f"{len(result['steps'])} steps cpu vs {device_name}: max rel diff {result['max_rel_diff']:.2e} "
                   f"(limit {PARITY_RTOL:g})",
        "devices": ["cpu", device_name], "tf32_off": ctx.cuda, "flags": flags,
        "cpu_losses": cpu, "device_losses": device,
        "comparison": result, "comparisons": comparisons,
        "checks": {"losses_match": check(result["passed"], result["max_rel_diff"], PARITY_RTOL,
                                         "max relative difference of the per-step ITC, CMLM and CMIM losses, CPU vs "
                                         "device"),
                   "steps": check(result["steps"] == expected, result["steps"], expected,
                                  "the iterations compared: the device run's, resumed from the CPU's step 1")},
    }


def _peak_cpu_bytes(step: Callable[[], Any]) -> int:
    from benchmarks.itc_loss import _peak_bytes

    return _peak_bytes(step)


def part_itc(ctx: Context) -> dict:
    import torch
    import torch.nn.functional as F

    from megatron_m2.loss import itc_loss

    s, rows_out, checks = ctx.settings, [], {}
    tolerance = {"float32": 1e-4, "bfloat16": 2e-2}
    for dtype_name in s.itc_dtypes:
        dtype = getattr(torch, dtype_name)
        for b in s.itc_rows:
            gen = torch.Generator(device=ctx.device).manual_seed(b)
            image = F.normalize(torch.randn(b, s.itc_dim, device=ctx.device, generator=gen), dim=1).to(dtype)
            text = F.normalize(torch.randn(b, s.itc_dim, device=ctx.device, generator=gen), dim=1).to(dtype)
            image.requires_grad_(True)
            text.requires_grad_(True)
            log_scale = torch.tensor(math.log(1 / 0.07), device=ctx.device, dtype=dtype, requires_grad=True)
            losses = {}
            for chunk in (None, s.itc_chunk):
                def step():
                    loss, _ = itc_loss(image, text, log_scale, group=None, chunk_size=chunk)
                    loss.backward()
                    image.grad = text.grad = log_scale.grad = None
                    return loss.detach().item()

                entry = {"dtype": dtype_name, "rows": b, "dim": s.itc_dim, "chunk": chunk}
                try:
                    if ctx.cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        losses[chunk] = step()  # also the warm-up
                        peak = torch.cuda.max_memory_allocated() - base
                    else:
                        losses[chunk] = step()
                        peak = _peak_cpu_bytes(step)
                    times = []
                    for _ in range(s.itc_reps):
                        if ctx.cuda:
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        step()
                        if ctx.cuda:
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                except torch.cuda.OutOfMemoryError as error:
                    entry["oom"] = str(error).splitlines()[0]
                    rows_out.append(entry)
                    continue
                finally:
                    ctx.cleanup()
                seconds = statistics.median(times)
                flops = (16 if chunk else 12) * b * b * s.itc_dim  # forward + backward matmuls, both directions
                entry.update(loss=losses[chunk], seconds=seconds, times=times, peak_mib=peak / 2**20,
                             tflops=flops / seconds / 1e12)
                rows_out.append(entry)
            if len(losses) == 2:
                rel = abs(losses[s.itc_chunk] - losses[None]) / abs(losses[None])
                checks[f"{dtype_name}_{b}_chunked_equals_unchunked"] = check(
                    rel <= tolerance[dtype_name], rel, tolerance[dtype_name],
                    "relative difference of the chunked and the unchunked loss")
            del image, text, log_scale
    # the headline: the largest local batch of the first dtype
    pair = [r for r in rows_out if r["dtype"] == s.itc_dtypes[0] and r["rows"] == s.itc_rows[-1] and "seconds" in r]
    summary = "no measurement"
    if len(pair) == 2:
        full, chunked = pair
        summary = (f"b={full['rows']} d={full['dim']} {full['dtype']}: unchunked {full['seconds'] * 1e3:.3g} ms "
                   f"{full['peak_mib']:.4g} MiB, chunk {chunked['chunk']} {chunked['seconds'] * 1e3:.3g} ms "
                   f"{chunked['peak_mib']:.4g} MiB")
    return {"summary": summary, "rows": rows_out, "checks": checks}


def _finite(values: Sequence[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def part_bf16(ctx: Context) -> dict:
    import torch

    from megatron_m2.config import load_config
    from megatron_m2.training.bench import build_training, synthetic_batches, trainer_args

    s = ctx.settings
    ctx.ensure_parallel()
    low_name = "bfloat16" if s.low_precision else "float32"
    presets, checks, summaries = {}, {}, []

    def train(pieces, batches) -> list[float]:
        return [pieces.step(iter([batch]))["itc_loss"] for batch in batches]

    for preset in s.bf16_presets:
        config = load_config(preset)
        batches = synthetic_batches(config, s.bf16_micro_batch, count=s.bf16_steps, device=ctx.device, seed=1,
                                    image_dtype=torch.uint8, padding=True)
        torch.manual_seed(0)
        pieces = build_training(trainer_args(preset, s.bf16_micro_batch))
        state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                 for k, v in pieces.model.state_dict().items()}
        reference = train(pieces, batches)
        del pieces
        ctx.cleanup()
        pieces = build_training(trainer_args(preset, s.bf16_micro_batch, bf16=s.low_precision), state_dict=state)
        low = train(pieces, batches)
        del pieces
        ctx.cleanup()
        rel = [abs(a - b) / abs(a) for a, b in zip(reference, low)]
        entry = {"micro_batch": s.bf16_micro_batch, "float32": reference, low_name: low, "rel_diff": rel}
        checks[f"{preset}_finite"] = check(_finite(reference) and _finite(low), [*reference, *low], "finite",
                                           "every step's loss in both precisions")
        checks[f"{preset}_first_step"] = check(rel[0] <= BF16_FIRST_RTOL, rel[0], BF16_FIRST_RTOL,
                                               "relative loss difference at the first step (same weights and batch)")
        checks[f"{preset}_all_steps"] = check(max(rel) <= BF16_RTOL, max(rel), BF16_RTOL,
                                              "largest relative loss difference over the steps")
        if s.low_precision and preset == s.bf16_presets[0]:
            pieces = build_training(trainer_args(preset, s.bf16_micro_batch, bf16=True,
                                                 use_distributed_optimizer=True), state_dict=state)
            distributed = train(pieces, batches)
            del pieces
            ctx.cleanup()
            rel_dist = max(abs(a - b) / abs(a) for a, b in zip(low, distributed))
            entry["bfloat16_distributed_optimizer"] = distributed
            checks[f"{preset}_distributed_optimizer"] = check(
                rel_dist <= DIST_OPT_RTOL, rel_dist, DIST_OPT_RTOL,
                "bf16 with --use-distributed-optimizer against without (DP=1: the same update)")
        del state
        presets[preset] = entry
        summaries.append(f"{preset} rel diff first {rel[0]:.1e} max {max(rel):.1e}")
    note = ("float32 against bfloat16 (megatron-core's mixed-precision optimizer: bf16 weights, fp32 master weights "
            "and grads)" if s.low_precision else
            "dry run: float32 against float32 on CPU (megatron-core's bf16 optimizer needs CUDA), so the comparison "
            "code runs but not the bf16 numerics")
    return {"summary": f"{low_name} vs float32: " + "; ".join(summaries), "precisions": ["float32", low_name],
            "note": note, "steps": s.bf16_steps, "presets": presets, "checks": checks}


def training_run(ctx: Context, preset: str, micro_batch: int, recompute: bool, profile: bool = False) -> dict:
    """Steady-state speed and peak memory of the trainer's step (bench.build_training + train_step) on synthetic
    uint8 batches; cached by settings (the memory and profile parts reuse the speed part's runs).

    Peak memory: on CUDA torch.cuda.max_memory_allocated() over the whole run; on CPU the peak of torch's own
    allocations (torch.profiler's memory events, as benchmarks/itc_loss.py counts them) over the build and the
    warm-up steps (from the second step on, Adam's moments exist). Both count from just before the model is built."""
    import torch

    from megatron_m2.arithmetic import model_flops_per_sample
    from megatron_m2.config import load_config
    from megatron_m2.training.bench import build_training, synthetic_batches, trainer_args

    s, bf16 = ctx.settings, ctx.settings.low_precision
    key = (preset, micro_batch, recompute, bf16)
    if key in ctx.runs and (not profile or "profile" in ctx.runs[key]):
        return ctx.runs[key]
    ctx.ensure_parallel()
    ctx.cleanup()
    config = load_config(preset)
    batches = synthetic_batches(config, micro_batch, count=2, device=ctx.device, image_dtype=torch.uint8, padding=True)
    losses, warmup_s, step_s, built = [], [], [], {}
    result: dict[str, Any] = {}

    def sync():
        if ctx.cuda:
            torch.cuda.synchronize()

    def steps(times: list, count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            metrics = built["pieces"].step(iter([batches[len(losses) % 2]]))
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(metrics["itc_loss"])

    def build_and_warm_up() -> None:
        torch.manual_seed(0)
        start = time.perf_counter()
        built["pieces"] = build_training(trainer_args(preset, micro_batch, bf16=bf16, recompute=recompute))
        sync()
        result["build_s"] = time.perf_counter() - start
        steps(warmup_s, s.speed_warmup)

    try:
        if ctx.cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            build_and_warm_up()
        else:
            peak = _peak_cpu_bytes(build_and_warm_up)
        # as many timed steps as fit in the step budget
        steps(step_s, min(max(int(s.speed_step_budget_s / warmup_s[-1]), s.speed_min_steps), s.speed_max_steps))
        if ctx.cuda:
            peak = torch.cuda.max_memory_allocated() - baseline
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        if profile and ctx.cuda:
            try:  # the profile part reports a profiler failure; the speed figures above stand
                result["profile"] = _profile_step(lambda: (built["pieces"].step(iter([batches[0]])), sync()), step_s)
            except Exception as error:
                result["profile"] = {"error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc()[-3000:]}
    finally:
        built.clear()
        ctx.cleanup()
    seconds = statistics.median(step_s)
    samples_per_s = micro_batch / seconds
    model_tflops = model_flops_per_sample(config) * samples_per_s / 1e12
    hardware_tflops = model_tflops * (RECOMPUTE_FLOPS if recompute else 1.0)
    result.update(
        preset=preset, micro_batch=micro_batch, recompute=recompute, precision="bfloat16" if bf16 else "float32",
        spec="local", warmup_s=warmup_s, step_s=step_s, median_step_s=seconds,
        samples_per_s=samples_per_s, model_tflops=model_tflops, hardware_tflops=hardware_tflops,
        mfu=model_tflops / PEAK_TFLOPS, hfu=hardware_tflops / PEAK_TFLOPS, losses=losses,
        peak_bytes=float(peak), peak_gib=peak / GIB,
        memory_measure=("torch.cuda.max_memory_allocated() minus what was allocated before the model" if ctx.cuda
                        else "peak of torch's CPU allocations from before the model through the warm-up steps "
                        "(torch.profiler memory events)"))
    ctx.runs[key] = result
    return result


def _profile_step(step: Callable[[], Any], step_s: list[float]) -> dict:
    """torch.profiler over one step: the ten CUDA kernels with the most self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))

    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == DeviceType.CUDA and device_us(e)]
    total = sum(device_us(e) for e in kernels)
    top = sorted(kernels, key=device_us, reverse=True)[:10]
    return {"kernel_ms_total": total / 1e3, "step_ms_unprofiled": statistics.median(step_s) * 1e3,
            "top_kernels": [{"name": e.key[:160], "calls": e.count, "ms": device_us(e) / 1e3,
                             "share": device_us(e) / total if total else 0.0} for e in top]}


def part_speed(ctx: Context) -> dict:
    import torch

    from megatron_m2.config import load_config

    s = ctx.settings
    config = load_config(s.speed_preset)
    runs, notes = [], []
    for i, (recompute, micro_batch) in enumerate(speed_plan(config, s)):
        for attempt in range(2):  # a short search: halve the micro-batch once if the planner's size does not fit
            try:
                runs.append(training_run(ctx, s.speed_preset, micro_batch, recompute,
                                         profile=i == 0 and s.profile and "profile" in ctx.args.parts))
                break
            except torch.cuda.OutOfMemoryError as error:
                notes.append(f"recompute={recompute} micro-batch {micro_batch}: out of memory "
                             f"({str(error).splitlines()[0][:200]})")
            ctx.cleanup()
            micro_batch //= 2
    ctx.speed_runs = runs
    table = [{k: r[k] for k in ("micro_batch", "recompute", "median_step_s", "samples_per_s", "model_tflops",
                                "hardware_tflops", "mfu", "hfu")} for r in runs]
    summary = "; ".join(f"mb {r['micro_batch']}{' recompute' if r['recompute'] else ''}: "
                        f"{r['median_step_s'] * 1e3:.0f} ms/step, {r['model_tflops']:.3g} model / "
                        f"{r['hardware_tflops']:.3g} hw TFLOP/s, MFU {100 * r['mfu']:.3g}%" for r in runs)
    return {"summary": f"{s.speed_preset} {'bf16' if s.low_precision else 'fp32'}: {summary}",
            "peak_tflops": PEAK_TFLOPS, "flops": "model: arithmetic.model_flops_per_sample (matmuls, 3 x forward); "
            "hardware: x 4/3 with full recompute", "table": table, "runs": runs, "oom": notes,
            "checks": {f"finite_mb{r['micro_batch']}{'_recompute' if r['recompute'] else ''}": check(
                _finite(r["losses"]), r["losses"], "finite", "every step's loss") for r in runs}}


def part_memory(ctx: Context) -> dict:
    from megatron_m2.config import load_config

    s = ctx.settings
    config = load_config(s.speed_preset)
    runs = ctx.speed_runs or [training_run(ctx, s.speed_preset, b, r) for r, b in speed_plan(config, s)]
    rows, checks = [], {}
    for run in runs:
        predicted = predicted_memory(config, run["micro_batch"], run["recompute"], s.low_precision)
        without_reserve = predicted["total"] - predicted["reserved"]
        row = {"micro_batch": run["micro_batch"], "recompute": run["recompute"], "measured_gib": run["peak_gib"],
               "predicted_gib": {k: v / GIB for k, v in predicted.items()},
               "predicted_without_reserve_gib": without_reserve / GIB,
               "measured_over_predicted": run["peak_bytes"] / without_reserve}
        if ctx.cuda:
            row["peak_reserved_gib"] = run.get("peak_reserved_gib")
            name = f"within_reserve_mb{run['micro_batch']}{'_recompute' if run['recompute'] else ''}"
            checks[name] = check(run["peak_bytes"] <= predicted["total"], run["peak_gib"], predicted["total"] / GIB,
                                 "measured peak <= the planner's total with its reserved_gb (what 'fits' promises)")
        rows.append(row)
    summary = "; ".join(f"mb {r['micro_batch']}{' recompute' if r['recompute'] else ''}: {r['measured_gib']:.3g} GiB "
                        f"measured / {r['predicted_without_reserve_gib']:.3g} predicted "
                        f"({r['measured_over_predicted']:.2f})" for r in rows)
    measure = runs[0]["memory_measure"] if runs else ""
    return {"summary": summary, "measure": measure, "rows": rows, "checks": checks,
            **({} if ctx.cuda else {"note": "CPU: every torch allocation counts, transients included (the "
                                            "planner models what stays alive); no check"})}


def part_profile(ctx: Context) -> dict:
    if not ctx.cuda or not ctx.settings.profile:
        raise Skip("dry run: there are no CUDA kernels to profile on CPU" if ctx.dry_run else "no CUDA device")
    from megatron_m2.config import load_config

    s = ctx.settings
    first = ctx.speed_runs[0] if ctx.speed_runs else None
    if first is None or "profile" not in first:
        recompute, micro_batch = speed_plan(load_config(s.speed_preset), s)[0]
        first = training_run(ctx, s.speed_preset, micro_batch, recompute, profile=True)
    prof = first["profile"]
    if "error" in prof:
        raise RuntimeError(f"torch.profiler failed: {prof['error']}\n{prof['traceback']}")
    top = prof["top_kernels"][:3]
    return {"summary": f"{s.speed_preset} mb {first['micro_batch']}: kernels {prof['kernel_ms_total']:.0f} ms of a "
                       f"{prof['step_ms_unprofiled']:.0f} ms step; top: " +
                       ", ".join(f"{k['name'][:40]} {100 * k['share']:.0f}%" for k in top),
            "micro_batch": first["micro_batch"], **prof}


PART_FUNCTIONS = {"parity": part_parity, "itc": part_itc, "bf16": part_bf16, "speed": part_speed,
                  "memory": part_memory, "profile": part_profile}


# ---------------------------------------------------------------------------------------------------------------------
# the command

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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run every part that can on CPU, with CUDA hidden")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--output", default=str(ROOT / "gpu_check_out" / "gpu_check.json"), help="the JSON report")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for all parts; a part that would not fit is skipped, one that runs over is stopped")
    p.add_argument("--data-dir", default=None,
                   help="the digits data + tokenizer (python -m megatron_m2.demo prepare --output-dir DIR); default "
                   "$M2_WHEELS/digits if there, else prepared in a temporary directory")
    args = p.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    started = time.monotonic()
    args.deadline = started + args.budget_s

    def log(line: str) -> None:
        print(f"[gpu_check {time.monotonic() - started:6.1f}s] {line}", flush=True)

    ctx = Context(args, log)
    output = Path(args.output)
    report = {"issue": 15, "dry_run": args.dry_run, "command": [sys.argv[0], *(argv or sys.argv[1:])],
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s,
              "peak_tflops": PEAK_TFLOPS, "gpu_memory_gb": GPU_MEMORY_GB, "environment": environment(ctx),
              "parts": {}}

    def save(parts: dict) -> None:
        report["parts"] = parts
        report["wall_s"] = time.monotonic() - started
        report["status"] = overall_status(parts)
        write_json(output, report)

    log(f"{'dry run on CPU' if args.dry_run else report['environment']['device']}: parts {','.join(args.parts)}, "
        f"budget {args.budget_s:.0f} s, report {output}")
    try:
        parts = run_parts([(name, PART_FUNCTIONS[name]) for name in PARTS if name in args.parts], ctx, args.deadline,
                          on_result=save, cleanup=ctx.cleanup, log=log)
    finally:
        ctx.close()
    save(parts)
    print(format_summary(report), flush=True)
    print(f"report: {output}", flush=True)
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
