"""Running the parts, the JSON and the summary (no torch: unit-tested without it)."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from benchmarks.gpu_check.settings import ESTIMATE_S, GRACE_S


class Skip(Exception):
    """A part that does not apply here; the message is the reason recorded in the JSON."""


class PartTimeout(Exception):
    pass


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
