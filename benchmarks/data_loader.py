"""Benchmark of the training data path on CPU: the trainer's loader at 0, 1, 2 worker processes against a torch
DataLoader over the webdataset library doing the same decode, crop and tokenisation.

    .venv/bin/python -m benchmarks.data_loader [--workers 0 1 2] [--batches 16] [--write]

Data: JPEG shards the benchmark writes itself (tools/make_shards.py's ShardWriter) into --shard-dir: --samples
500x375 images (smooth random colour fields plus pixel noise, quality 90, about the size of a web photo), captions
of 10-30 words. Every variant produces micro-batches of 64: uint8 [64, 3, 224, 224] images (train transform:
random resized crop to 224, flip) and text ids [64, 52] (the GLM tokenizer).

  trainer  megatron_m2.data.build_train_data(num_workers=N): the stream is read in the main process, N worker
           processes decode, augment and tokenise (N = 0: all in the main process)
  wds      torch.utils.data.DataLoader(num_workers=N) over webdataset.WebDataset(shards).decode("pil")
           .map(same crop + tokenise).batched(64): shards split over the workers, the same Pillow decode
  trainer-randaugment  the trainer's loader with --randaugment 2 7 (the release's RandAugment after the crop)
  trainer-filters      the trainer's loader with --min-caption-chars 5 --max-aspect-ratio 3 (every benchmark sample
                       passes them: this is the cost of checking, paid by the reading process)

Each variant runs in a fresh process; after 2 warm-up batches (worker start excluded) it times --batches
micro-batches: samples/s = samples / wall time; samples per CPU-second = samples / (user + system CPU time of the
process and its worker processes in that window, psutil). The main process only consumes (a training step would
run there). --write replaces (or appends) the "## Data loader (issue 13)" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Data loader (issue 13)"
BATCH = 64
IMAGE_SIZE = 224
TEXT_LENGTH = 52


def glm_model() -> str:
    sys.path.insert(0, str(ROOT))
    from tests.glm import GLM_MODEL

    if not GLM_MODEL.exists():
        raise SystemExit(f"GLM SentencePiece model not found at {GLM_MODEL} (set M2_GLM_MODEL)")
    return str(GLM_MODEL)


def make_shards(shard_dir: Path, samples: int, per_shard: int) -> list[str]:
    import io

    import numpy as np
    from PIL import Image

    from megatron_m2.data.shards import ShardWriter

    done = shard_dir / "done.json"
    if done.exists() and json.loads(done.read_text())["samples"] == samples:
        return json.loads(done.read_text())["shards"]
    rng = np.random.default_rng(0)
    words = "a the cat dog red blue on under photo of small large house tree sky street car 一只 猫 在 红色 的 照片".split()
    with ShardWriter(str(shard_dir), per_shard) as writer:
        for _ in range(samples):
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375),
                                                                                             Image.BICUBIC)
            pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 12, (375, 500, 3)).astype(np.int16)
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(words, int(rng.integers(10, 31))))
            writer.write(buf.getvalue(), "jpg", caption)
        shards = writer.close()
    sizes = [os.path.getsize(p) for p in shards]
    done.write_text(json.dumps({"samples": samples, "shards": shards, "bytes": sum(sizes)}))
    return shards


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process and its workers, of this process alone)."""
    import psutil

    me = psutil.Process()
    total, main = 0.0, 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
            if proc is me:
                main = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total, main


class _WdsMap:
    """webdataset's per-sample map: the trainer's train transform (seeded per sample) and tokenizer."""

    def __init__(self, model: str) -> None:
        from megatron_m2.data.tokenizer import GLMTokenizer
        from megatron_m2.data.transforms import train_transform

        self.transform, self.tokenizer, self.count = train_transform(IMAGE_SIZE), GLMTokenizer(model, TEXT_LENGTH), 0

    def __call__(self, sample):
        import numpy as np

        image, caption = sample
        self.count += 1
        ids, mask = self.tokenizer([caption])
        return self.transform(image, rng=np.random.default_rng(self.count)), ids[0], mask[0]


def wds_batches(shards: list[str], model: str, workers: int):
    import torch
    import webdataset as wds

    dataset = (wds.WebDataset(shards, shardshuffle=False, repeat=True, empty_check=False)
               .decode("pil").to_tuple("jpg", "txt").map(_WdsMap(model)).batched(BATCH, partial=False))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                            prefetch_factor=2 if workers else None))


LOADERS = ("trainer", "wds", "trainer-randaugment", "trainer-filters")


def trainer_batches(shards: list[str], model: str, workers: int, variant: str = "trainer"):
    from megatron_m2.data import build_train_data
    from megatron_m2.data.filters import SampleFilter
    from megatron_m2.data.tokenizer import GLMTokenizer

    config = type("Config", (), {"image_size": IMAGE_SIZE})()
    return build_train_data(shards, GLMTokenizer(model, TEXT_LENGTH), config, BATCH, 0, 1, seed=0,
                            num_workers=workers, prefetch_factor=2,
                            randaugment=(2, 7) if variant == "trainer-randaugment" else None,
                            sample_filter=SampleFilter(5, 3) if variant == "trainer-filters" else None)


def run_one(loader: str, workers: int, shards: list[str], batches: int, step_ms: float = 0.0) -> dict:
    import torch

    torch.set_num_threads(1)
    model = glm_model()
    it = wds_batches(shards, model, workers) if loader == "wds" else trainer_batches(shards, model, workers, loader)
    for _ in range(2):
        batch = next(it)
    images = batch[0] if isinstance(batch, (tuple, list)) else batch["images"]
    assert tuple(images.shape) == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.uint8, images.shape
    (cpu0, main0), t0 = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(it)
        if step_ms:
            time.sleep(step_ms / 1000)  # a GPU step: the training process waits, its core is free
    wall, (cpu1, main1) = time.perf_counter() - t0, cpu_seconds()
    cpu, main = cpu1 - cpu0, main1 - main0
    if hasattr(it, "close"):
        it.close()
    samples = batches * BATCH
    return {"loader": loader, "workers": workers, "step_ms": step_ms, "samples": samples, "wall_s": wall, "cpu_s": cpu,
            "main_cpu_s": main, "samples_per_s": samples / wall, "samples_per_cpu_s": samples / cpu,
            "main_ms_per_sample": 1000 * main / samples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--loaders", nargs="+", default=["trainer", "wds"], choices=LOADERS)
    p.add_argument("--batches", type=int, default=16, help="timed micro-batches of 64 per variant")
    p.add_argument("--samples", type=int, default=1536, help="samples in the benchmark's shards")
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--shard-dir", default="/tmp/m2-bench-shards")
    p.add_argument("--step-ms", type=float, nargs="+", default=[0.0],
                   help="also time a training loop whose step waits this long per micro-batch (a GPU step)")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--one", nargs=2, metavar=("LOADER", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    shards = make_shards(Path(args.shard_dir), args.samples, args.samples_per_shard)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), shards, args.batches, args.step_ms[0])))
        return 0
    info = json.loads((Path(args.shard_dir) / "done.json").read_text())
    where = f"{machine()}, load average {os.getloadavg()[0]:.1f} before the run"
    rows = []
    variants = [(loader, workers, 0.0) for loader in args.loaders for workers in args.workers]
    variants += [("trainer", workers, step) for step in args.step_ms if step for workers in args.workers]
    for loader, workers, step in variants:
        out = subprocess.run([sys.executable, "-m", "benchmarks.data_loader", "--one", loader, str(workers),
                              "--step-ms", str(step), "--batches", str(args.batches), "--samples", str(args.samples),
                              "--samples-per-shard", str(args.samples_per_shard), "--shard-dir", args.shard_dir],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{loader:8s} workers {workers} step {step:.0f} ms: {row['samples_per_s']:7.1f} samples/s, "
              f"{row['samples_per_cpu_s']:6.1f} samples per CPU-second, main process "
              f"{row['main_ms_per_sample']:.2f} CPU-ms per sample ({row['samples']} samples, "
              f"{row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} CPU-s)", flush=True)
    if args.write:
        base = {(r["loader"], r["step_ms"]): r for r in rows if r["workers"] == 0}
        lines = [f"`.venv/bin/python -m benchmarks.data_loader {' '.join(sys.argv[1:] if argv is None else argv)}` "
                 f"on {where}, {time.strftime('%Y-%m-%d')}. "
                 f"{info['samples']} JPEG samples of 500x375 in {len(info['shards'])} shards "
                 f"({info['bytes'] / info['samples'] / 1024:.0f} KiB per image on average), micro-batch {BATCH}, "
                 f"{args.batches} timed micro-batches per variant after 2 warm-up ones; uint8 224x224 crops and "
                 f"{TEXT_LENGTH} text ids per sample.", "",
                 "| loader | step (sleep) ms | workers | samples/s | vs 0 workers | samples per CPU-second | main process "
                 "CPU-ms per sample |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            key = (r["loader"], r["step_ms"])
            speedup = r["samples_per_s"] / base[key]["samples_per_s"] if key in base else float("nan")
            lines.append(f"| {r['loader']} | {r['step_ms']:.0f} | {r['workers']} | {r['samples_per_s']:.0f} | "
                         f"{speedup:.2f}x | {r['samples_per_cpu_s']:.0f} | {r['main_ms_per_sample']:.2f} |")
        write_section(SECTION, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
