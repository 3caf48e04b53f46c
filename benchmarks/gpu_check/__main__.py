"""python -m benchmarks.gpu_check: run the parts, write the JSON, print the summary (see the package docstring)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import benchmarks.gpu_check as package
from benchmarks.gpu_check.communication import part_communication
from benchmarks.gpu_check.context import Context, environment
from benchmarks.gpu_check.numerics import part_bf16, part_itc, part_parity
from benchmarks.gpu_check.runner import format_summary, overall_status, run_parts, write_json
from benchmarks.gpu_check.settings import GPU_MEMORY_GB, PARTS, PEAK_TFLOPS, ROOT
from benchmarks.gpu_check.speed import part_memory, part_profile, part_speed

PART_FUNCTIONS = {"parity": part_parity, "itc": part_itc, "bf16": part_bf16, "speed": part_speed,
                  "memory": part_memory, "profile": part_profile, "communication": part_communication}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=package.__doc__,
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
