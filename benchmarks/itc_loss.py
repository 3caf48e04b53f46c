"""Benchmark of the grouped ITC loss at data-parallel world 8 on CPU (gloo): time, peak memory, bytes sent per rank.

    .venv/bin/python -m benchmarks.itc_loss [--local-batch-sizes 32 128 512] [--dim 512] [--write]

Variants (all fp32, forward + backward of the loss only, the features are leaves that require grad):
  full_logits  gather over all 8 ranks, every rank builds the full (B_global x B_global) logits (open_clip default)
  local        gather over all 8 ranks, each rank only its B_local rows (local loss)
  group4/2     gather over sub-groups of 4 / 2 DP ranks (--itc-group-size), local rows
  chunked      gather over all 8 ranks, local rows, softmax tiled over --chunk-size columns

What is measured, per rank:
  time   wall time of itc_loss + backward; per repetition the slowest rank counts, median over repetitions after
         one warm-up (barrier before each repetition).
  memory peak of the bytes allocated by torch inside one profiled step, the warm-up (torch.profiler profile_memory:
         the running sum of allocation/free events, sorted by time); the inputs existing before the step are not
         counted.
  comm   bytes this rank sends in one step: `loss.comm_bytes_sent` (what a ring all-gather / reduce-scatter moves),
         checked against the bytes the process actually wrote (`wchar` of /proc/self/io: gloo's TCP pairs write with
         writev; includes gloo's small headers and the loss's one 32-byte shape check).
--write replaces (or appends) the "## ITC loss (issue 4)" section of BENCHMARKS.md and leaves other sections alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.report import write_section

WORLD = 8
SECTION = "## ITC loss (issue 4)"
# name -> (itc group size, chunk size or None, local_loss)
VARIANTS = {
    "full_logits": (WORLD, None, False),
    "local": (WORLD, None, True),
    "group4": (4, None, True),
    "group2": (2, None, True),
    "chunked": (WORLD, "chunk", True),
}


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _peak_bytes(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _bench_rank(b_local: int, dim: int, reps: int, chunk_size: int, names: list[str]) -> dict:
    """Runs on every rank of an 8-process pool; returns per-variant measurements of this rank."""
    from megatron_m2 import loss as loss_module
    from megatron_m2 import parallel

    gen = torch.Generator().manual_seed(dist.get_rank())
    image = F.normalize(torch.randn(b_local, dim, generator=gen), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(b_local, dim, generator=gen), dim=1).requires_grad_(True)
    log_scale = torch.tensor(2.6593, requires_grad=True)
    out = {}
    for name in names:
        group_size, chunk, local_loss = VARIANTS[name]
        parallel.initialize_model_parallel(1, 1, group_size)

        def step():
            loss, _ = loss_module.itc_loss(
                image, text, log_scale, group=parallel.get_itc_group(), chunk_size=chunk_size if chunk else None,
                local_loss=local_loss,
            )
            loss.backward()
            image.grad = text.grad = log_scale.grad = None

        peak = _peak_bytes(step)  # also the warm-up
        times, sent, written = [], [], []
        for _ in range(reps):
            dist.barrier()
            loss_module.comm_bytes_sent = 0
            wchar, start = _wchar(), time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            written.append(_wchar() - wchar)
            sent.append(loss_module.comm_bytes_sent)
        dist.barrier()
        out[name] = {"times": times, "sent": sent[0], "written": statistics.median(written), "peak": peak}
    return out


def analytic(b_local: int, dim: int, name: str, chunk_size: int, elt: int = 4) -> dict:
    """The per-rank model of FORMULAS: bytes sent per step, peak bytes (logit part and feature part), matmul FLOPs."""
    group_size, chunk, local_loss = VARIANTS[name]
    n = group_size * b_local
    rows = b_local if local_loss else n
    cols = min(chunk_size, n) if chunk else n
    return {
        "comm": 2 * (group_size - 1) * b_local * 2 * dim * elt,
        "peak": max(6 * rows * cols + n * 2 * dim, (2 * n + 2 * b_local) * 2 * dim) * elt,
        "flops": (16 if chunk else 12) * rows * n * dim,
    }


FORMULAS = """\
Notation: b = B_local, P = data-parallel size (8 here), g = --itc-group-size (P = gather over all DP ranks),
N = g*b rows gathered per group (B_global = P*b when g = P), d = embedding width, e = bytes per element (4, fp32).

Communication per rank and step (`megatron_m2.loss` gathers image and text together as one [b, 2d] tensor):
forward ring all-gather sends (g-1)*b*2d*e, backward reduce-scatter (gloo: all-to-all of the row blocks, same bytes)
sends as much again, so **sent = received = 4(g-1)*b*d*e**, independent of P for a fixed g
(relative to the full gather: (g-1)/(P-1) = 3/7 for g=4, 1/7 for g=2; local loss and chunking do not change it).

Peak memory of the loss per rank (R x C = the logit block one rank builds per direction; R x C = N x N for full
logits (P^2 b^2 at g = P), b x N for the local loss, b x g*b grouped, b x chunk chunked), counted from the autograd
graph: **M = e * max(6*R*C + N*2d, (2N + 2b)*2d)**. The first term is the peak in the first backward of a logit
block: the four [R, C] buffers the forward saved (scaled dot products for the logit_scale gradient and the
log-softmax output, per direction) plus two transients (the logits' gradient and its product with the dot
products), next to the gathered [N, 2d] features. The second is the peak in the gather's backward: the features'
gradient assembled from both directions meets the all-to-all receive buffer of the same size, plus the local
[b, 2d] pair. The table's "model peak" is this formula; "peak" is measured.
Matmul work per rank: 12*R*N*d FLOPs (one forward and two backward matmuls per direction), 16*R*N*d when chunked
(the backward recomputes each chunk's logits).

So at g = P the local loss divides the logit memory and FLOPs by P, grouping divides both by another P/g and the
communication by (P-1)/(g-1), and chunking bounds the logit term at b*chunk but not the gathered features and
their gradient (4N*d): it pays only where 6b*N > 4N*d, i.e. local batches above ~2d/3 (large local batches against
a small embedding width, where Inf-CL uses it); below that the features dominate.
"""


def measure(local_batch_sizes: list[int], dim: int, reps: int, chunk_size: int) -> list[dict]:
    from megatron_m2.testing import run_distributed

    rows = []
    for b_local in local_batch_sizes:
        t0 = time.perf_counter()
        per_rank = run_distributed(WORLD, _bench_rank, b_local, dim, reps, chunk_size, list(VARIANTS), timeout_s=900)
        for name in VARIANTS:
            rank_results = [r[name] for r in per_rank]
            slowest = [max(r["times"][i] for r in rank_results) for i in range(reps)]
            rows.append({
                "b_local": b_local, "variant": name, "time_s": statistics.median(slowest),
                "peak": max(r["peak"] for r in rank_results),
                "sent": max(r["sent"] for r in rank_results),
                "written": max(r["written"] for r in rank_results),
            })
        print(f"B_local={b_local}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _model_checks(rows: list[dict], dim: int, chunk_size: int) -> str:
    """One paragraph computed from the run: how far the measurements are from the model."""
    comm = max(abs(r["written"] / r["sent"] - 1) for r in rows)
    counted = all(r["sent"] == analytic(r["b_local"], dim, r["variant"], chunk_size)["comm"] for r in rows)
    big = max(r["b_local"] for r in rows)
    peak = [r["peak"] / analytic(r["b_local"], dim, r["variant"], chunk_size)["peak"] for r in rows]
    peak_big = [p for p, r in zip(peak, rows) if r["b_local"] == big]
    return (
        f"Checks of this run: the counted bytes {'equal' if counted else 'DIFFER FROM'} the formula in every row, and "
        f"the bytes the processes actually wrote (wchar) are within {100 * comm:.2f}% of them. Measured peak / model "
        f"peak: {min(peak):.2f} to {max(peak):.2f} over all rows, {min(peak_big):.2f} to {max(peak_big):.2f} at "
        f"B_local = {big} (small batches carry fixed overheads the model leaves out). Times: 8 single-threaded "
        f"processes on {os.cpu_count()} shared cores, so they are noisy; compare them "
        f"with the model's FLOP ratio, which the loss step follows only roughly here."
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def to_markdown(
    rows: list[dict], dim: int, reps: int, chunk_size: int, command: str, wall_s: float, load: Optional[list] = None
) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    head = (
        f"| B_local | variant | time (s) | time / full | peak MiB | peak / full | model peak MiB "
        f"| sent MiB/rank | sent / full | model sent MiB | written MiB (wchar) | model FLOPs / full |\n"
        + "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        row = {**row, **{f"model_{k}": v for k, v in analytic(row["b_local"], dim, row["variant"], chunk_size).items()}}
        full_model = analytic(row["b_local"], dim, "full_logits", chunk_size)
        full = next(r for r in rows if r["b_local"] == row["b_local"] and r["variant"] == "full_logits")
        model_mem = row["model_peak"]
        model_flops = row["model_flops"] / full_model["flops"]
        lines.append(
            f"| {row['b_local']} | {row['variant']} | {row['time_s']:.4f} | {row['time_s'] / full['time_s']:.2f} "
            f"| {_mib(row['peak'])} | {row['peak'] / full['peak']:.3f} | {_mib(model_mem)} "
            f"| {_mib(row['sent'])} | {row['sent'] / full['sent']:.3f} | {_mib(row['model_comm'])} "
            f"| {_mib(row['written'])} | {model_flops:.3f} |"
        )
    checks = _model_checks(rows, dim, chunk_size)
    return (
        checks + "\n\n"
        f"Command: `{command}` (total {wall_s:.0f} s). Machine: {os.cpu_count()} cores ({cpu}), "
        f"{platform.system()}, torch {torch.__version__}, gloo; 8 processes with 1 thread each share the cores, "
        f"so times are contended and only the ratios measured in the same run mean something. "
        f"d = {dim}, fp32, DP = 8, chunk = {chunk_size}, {reps} timed repetitions (median of the slowest rank)"
        + (f"; 1-min load average {load[0]:.0f} at the start, {load[1]:.0f} at the end" if load else "") + ".\n\n"
        + head + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-batch-sizes", type=int, nargs="+", default=[32, 128, 384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--save", type=Path, help="also save the raw measurements as JSON")
    parser.add_argument("--load", type=Path, help="render a run saved with --save instead of measuring")
    args = parser.parse_args()
    if args.load:
        run = json.loads(args.load.read_text())
    else:
        start, load_before = time.perf_counter(), os.getloadavg()[0]
        rows = measure(args.local_batch_sizes, args.dim, args.reps, args.chunk_size)
        command = "python -m benchmarks.itc_loss " + " ".join(
            ["--local-batch-sizes", *map(str, args.local_batch_sizes), "--dim", str(args.dim),
             "--reps", str(args.reps), "--chunk-size", str(args.chunk_size)]
        )
        run = {"rows": rows, "dim": args.dim, "reps": args.reps, "chunk_size": args.chunk_size, "command": command,
               "wall_s": time.perf_counter() - start, "load": [load_before, os.getloadavg()[0]]}
        if args.save:
            args.save.write_text(json.dumps(run, indent=1))
    table = to_markdown(**run)
    print(table)
    if args.write:
        write_section(SECTION, FORMULAS + "\n" + table)

    from megatron_m2.testing import shutdown_pools

    shutdown_pools()


if __name__ == "__main__":
    main()
