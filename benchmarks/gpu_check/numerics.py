"""The parts that check numbers: parity (CPU vs device losses), itc (the loss at large batches), bf16."""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

from benchmarks.gpu_check.context import Context, _trainer_losses
from benchmarks.gpu_check.runner import check, compare_losses
from benchmarks.gpu_check.settings import BF16_FIRST_RTOL, BF16_RTOL, DIST_OPT_RTOL, PARITY_RTOL, PARITY_STEPS


PARITY_LOSSES = ("itc_loss", "cmlm_loss", "cmim_loss")  # M2's full objective


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

    def start(name: str, env: dict, *extra: str):
        return ctx.start_trainer(root / name, [*flags, *extra], env)

    wait = ctx.wait_trainers

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
        comparisons[name] = compare_losses({step: loss for step, loss in cpu.items() if step > 1}, device,
                                           PARITY_RTOL)
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
                                         "max relative difference of the per-step ITC, CMLM and CMIM losses, CPU "
                                         "vs device"),
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

