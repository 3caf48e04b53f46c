"""Micro-batch sizes from the planner: what the speed and memory parts run, and what the planner predicts."""
from __future__ import annotations

from benchmarks.gpu_check.settings import GIB, GPU_MEMORY_GB, MEMORY_HEADROOM, MICRO_BATCH_CANDIDATES, Settings


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

