"""The parts that measure: speed (steady-state step time, TFLOP/s, MFU), memory (peak against the planner),
profile (the top CUDA kernels). They share the training runs (`training_run`)."""
from __future__ import annotations

import statistics
import time
import traceback
from typing import Any, Callable

from benchmarks.gpu_check.context import Context
from benchmarks.gpu_check.numerics import _finite, _peak_cpu_bytes
from benchmarks.gpu_check.runner import Skip, check
from benchmarks.gpu_check.settings import GIB, PEAK_TFLOPS, RECOMPUTE_FLOPS
from benchmarks.gpu_check.sizing import predicted_memory, speed_plan


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

