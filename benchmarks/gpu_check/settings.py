"""The GPU check's constants and the sizes of its two modes (the GPU run, the CPU dry run)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("parity", "itc", "bf16", "speed", "memory", "profile", "communication")
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
ESTIMATE_S = {"parity": 60, "itc": 20, "bf16": 60, "speed": 60, "memory": 1, "profile": 15,
              "communication": 60}
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
