"""Benchmarks write their own section of BENCHMARKS.md (with --write) and describe the machine they ran on: one
function each for all of them."""
from __future__ import annotations

import os
import platform
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section under `heading` ('## ...', up to the next '## ') with `body`, or append it; the others
    stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)


def machine() -> str:
    """The machine a figure was measured on, as BENCHMARKS.md states it: cores available to this process, CPU model,
    memory and the versions that set the speed."""
    import megatron.core
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{len(os.sched_getaffinity(0))}-core {model or platform.machine()}, {mem_gb:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}, megatron-core {megatron.core.__version__}")
