"""A progress line for long work (evaluation, conversion): what is being done, how far, how fast, how long is left.

    progress = ProgressLine("zero-shot: encoding images", total=50_000, unit="images")
    for batch in batches:
        ...
        progress.update(len(batch))
    progress.close()

Plain lines, not a redrawn bar, because these run inside training logs and Slurm output files as often as in a
terminal: `zero-shot: encoding images: 12,800/50,000 images (26%), 410 images/s, 0:01:31 left`. Work that ends
within `quiet_s` prints nothing (an evaluation on 359 digits during the demo stays silent); after that, a line every
`interval_s` and a last one with the total time. Only rank 0 of a distributed job prints.
"""
from __future__ import annotations

import datetime
import time
from typing import Optional

import torch.distributed as dist


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


class ProgressLine:
    def __init__(self, what: str, total: Optional[int] = None, unit: str = "items", interval_s: float = 10.0,
                 quiet_s: float = 5.0, enabled: Optional[bool] = None) -> None:
        if enabled is None:
            enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.what, self.total, self.unit = what, total, unit
        self.interval_s, self.quiet_s, self.enabled = interval_s, quiet_s, enabled
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.printed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.start >= self.quiet_s and (not self.printed or now - self._last >=
                                                                  self.interval_s):
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            position = f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
            left = f", {format_duration((self.total - self.done) / rate)} left" if rate > 0 else ""
        else:
            position, left = f"{self.done:,} {self.unit}", ""
        print(f"{self.what}: {position}, {rate:,.1f} {self.unit}/s{left}", flush=True)
        self.printed, self._last = True, now

    def close(self) -> None:
        """The last line (only when earlier lines were printed, or the work took longer than quiet_s)."""
        elapsed = time.perf_counter() - self.start
        if self.enabled and (self.printed or elapsed >= self.quiet_s):
            print(f"{self.what}: {self.done:,} {self.unit} in {format_duration(elapsed)} "
                  f"({self.done / max(elapsed, 1e-9):,.1f} {self.unit}/s)", flush=True)

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
