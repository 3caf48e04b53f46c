"""Host memory of a run that computes on the CPU: glibc's malloc keeps the memory a step frees for the next step.

By default glibc serves each allocation above a moving threshold (128 KiB at start, at most 32 MiB) with its own
mmap, and gives the top of the heap back to the kernel once more than twice that threshold is free there. A training
step frees and re-allocates the same large activations every step, so the kernel maps and zeroes them again each time:
the trainer on benchmarks/trainer_overhead.py's model took 26,000 page faults a step (107 MB zeroed), and 360 with
both thresholds raised; over six alternating rounds its median step took 994 ms against 1073 ms
with glibc's defaults, on a 2-core machine where the run-to-run noise is about as large (BENCHMARKS.md, "Trainer
overhead").

The cost: the process keeps its peak heap until it exits, as jemalloc and tcmalloc (what PyTorch's CPU performance
guide and torch.backends.xeon.run_cpu preload) also do. Runs on a GPU keep glibc's defaults: their activations live in
CUDA's caching allocator. The user's own choice wins: with any MALLOC_* variable, a glibc.malloc tunable in
GLIBC_TUNABLES, or jemalloc / tcmalloc / mimalloc in LD_PRELOAD, nothing is changed. (Setting the trim threshold
alone is no way back to the defaults: it also fixes the mmap threshold at 128 KiB, and the step took 1.5x as long.
`GLIBC_TUNABLES=glibc.malloc.perturb=0`, a default value, keeps glibc's defaults.)
"""
from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30
_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # what every glibc accepts on 64-bit; newer ones take more


def user_chose_allocator(environ: Mapping[str, str] = os.environ) -> bool:
    """True if the environment already sets glibc's malloc or preloads another allocator."""
    if any(name.startswith("MALLOC_") for name in environ):
        return True
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(name in environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_host_memory() -> bool:
    """On a machine without a CUDA device, make glibc's malloc keep freed memory in the process (see the module
    docstring). Returns whether it did: not with a GPU, not on other C libraries, nor where the user chose the
    allocator's settings."""
    import torch

    if torch.cuda.is_available():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # the mmap threshold first: setting only the trim threshold would switch glibc's moving threshold off at 128 KiB
    if not (mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) or mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
