"""Checkpoint save and load time of a preset at data-parallel 2 on CPU (gloo): sync vs async save.

    .venv/bin/python -m benchmarks.checkpoint_save [--model 0.4b] [--reps 3] [--dir /tmp] [--write]

Two processes (TP 1 x PP 1, so DP 2), each with the trainer's model, megatron-core DDP and Adam (training/bench.py),
after one real training step on synthetic batches so that the Adam moments exist. Then, `--reps` times each:
  sync    save_checkpoint(...): the wall time until it returns (the checkpoint is published by then)
  async   save_checkpoint(..., async_save=True): the time training is blocked (until it returns), then the time
          until finalize_async_saves(blocking=True) has published it (measured from the same start)
  load    load_checkpoint(...) of the newest checkpoint into the same model and optimizer
Per repetition the slowest rank counts (barrier before each timed call); one uncounted warm-up repetition comes
first; the table shows the median (and the range). Both saves use
the fully parallel strategy, so each DP rank writes about half of the bytes (the split is shown). Between the
repetitions the previous checkpoint is deleted. --write replaces (or appends) this benchmark's section of
BENCHMARKS.md and leaves the other sections alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine, write_section

SECTION = "## Checkpoint save and load (issue 16)"
WORLD = 2


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _rank_bytes(path: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    for f in path.glob("__*_*.distcp"):
        rank = int(f.name[2:].split("_")[0])
        out[rank] = out.get(rank, 0) + f.stat().st_size
    return out


def _measure_rank(model_name: str, root: str, reps: int) -> dict:
    import multiprocessing

    import torch
    import torch.distributed as dist

    from megatron_m2 import parallel
    from megatron_m2 import checkpointing
    from megatron_m2.training.bench import build_training, rss_bytes, synthetic_batches, trainer_args

    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    args = trainer_args(model_name, micro_batch_size=2)
    pieces = build_training(args)
    step_s, _ = _timed(pieces.step, iter(synthetic_batches(args.model_config, 2, count=4, seed=dist.get_rank())))
    numel = sum(p.numel() for p in pieces.model.parameters())
    process = multiprocessing.current_process()
    daemon, process.daemon = process.daemon, False  # the checkpoint writers fork; pool workers are daemonic
    rows: dict[str, list[float]] = {"sync": [], "async_blocked": [], "async_total": [], "load": []}
    split: dict[int, int] = {}
    total_bytes = 0
    try:
        iteration = 0
        for rep in range(reps + 1):  # rep 0 warms up (first-call setup, page cache) and is not counted
            for mode in ("sync", "async"):
                iteration += 1
                if dist.get_rank() == 0:  # one checkpoint on disk at a time (0.4b: ~2.9 GB)
                    for old in Path(root).glob("iter_*"):
                        shutil.rmtree(old)
                dist.barrier()
                rank_state = {"rank": dist.get_rank()}
                start = time.perf_counter()
                blocked, path = _timed(checkpointing.save_checkpoint, root, iteration, pieces.model,
                                       pieces.optimizer, pieces.scheduler, rank_state, async_save=mode == "async")
                if mode == "async":
                    checkpointing.finalize_async_saves(blocking=True)
                total = _slowest(time.perf_counter() - start)
                blocked = _slowest(blocked)
                dist.barrier()
                split = _rank_bytes(Path(path))
                total_bytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
                loaded, _ = _timed(checkpointing.load_checkpoint, root, pieces.model, pieces.optimizer,
                                   pieces.scheduler)
                loaded = _slowest(loaded)
                if rep == 0:
                    continue
                if mode == "sync":
                    rows["sync"].append(blocked)
                else:
                    rows["async_blocked"].append(blocked)
                    rows["async_total"].append(total)
                rows["load"].append(loaded)
    finally:
        process.daemon = daemon
    return {"rows": rows, "params_per_rank": numel, "checkpoint_bytes": total_bytes, "bytes_by_rank": split,
            "step_s": _slowest(step_s), "peak_rss_bytes": rss_bytes("VmHWM")}


def measure(model_name: str, reps: int, directory: str) -> dict:
    from megatron_m2.testing import run_distributed, shutdown_pools

    root = tempfile.mkdtemp(prefix="m2_ckpt_bench_", dir=directory)
    try:
        results = run_distributed(WORLD, _measure_rank, model_name, root, reps)
    finally:
        shutdown_pools()
        shutil.rmtree(root, ignore_errors=True)
    return results[0]


def render(run: dict) -> str:
    r = run["result"]
    med = {k: statistics.median(v) for k, v in r["rows"].items()}

    def rng(key: str) -> str:
        return f"{min(r['rows'][key]):.1f}-{max(r['rows'][key]):.1f}"

    gb = r["checkpoint_bytes"] / 1e9
    by_rank = sorted(r["bytes_by_rank"].items(), key=lambda item: int(item[0]))
    split = ", ".join(f"rank {k}: {v / 1e9:.2f} GB" for k, v in by_rank)
    lines = [
        f"Command: `{run['command']}` ({run['date']}; {run['machine']}; load average {run['load_before']:.1f} before, "
        f"{run['load_after']:.1f} after; checkpoints on {run['dir']}).",
        "",
        f"Preset {run['model']}, TP 1 x PP 1 x DP {WORLD}, fp32 weights and Adam moments: "
        f"{r['params_per_rank'] / 1e6:.0f} M parameters per rank, checkpoint {gb:.2f} GB on disk (model + Adam "
        f"state, one copy: the DP replicas share it), written by both ranks ({split}). Median of {run['reps']} "
        "repetitions, slowest rank:",
        "",
        "| save | training blocked (s) | until published (s) |",
        "|---|---:|---:|",
        f"| sync | {med['sync']:.1f} ({rng('sync')}) | {med['sync']:.1f} |",
        f"| async | {med['async_blocked']:.1f} ({rng('async_blocked')}) | {med['async_total']:.1f} "
        f"({rng('async_total')}) |",
        "",
        f"Load (either kind of checkpoint, into the same model and optimizer): {med['load']:.1f} s ({rng('load')}).",
        "",
        f"Effective write rate of the sync save: {gb / med['sync']:.2f} GB/s for the 2 processes together. "
        f"Raw repetitions: {json.dumps(r['rows'])}.",
    ]
    return "\n".join(lines) + "\n" + run.get("notes", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="0.4b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written")
    parser.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    parser.add_argument("--save", type=Path, help="also save the raw measurements as JSON")
    parser.add_argument("--load", type=Path, help="render a run saved with --save instead of measuring")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended to the section (e.g. the 10B estimate)")
    args = parser.parse_args()
    if args.load:
        run = json.loads(args.load.read_text())
    else:
        load_before = os.getloadavg()[0]
        result = measure(args.model, args.reps, args.dir)
        run = {"result": result, "model": args.model, "reps": args.reps, "dir": args.dir,
               "command": f"python -m benchmarks.checkpoint_save --model {args.model} --reps {args.reps}",
               "date": time.strftime("%Y-%m-%d"), "machine": machine(), "load_before": load_before,
               "load_after": os.getloadavg()[0]}
    if args.notes:
        run["notes"] = "\n" + args.notes.read_text()
    if args.save:
        args.save.write_text(json.dumps(run, indent=1))
    body = render(run)
    print(body)
    if args.write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
