#!/usr/bin/env python
"""Build webdataset-format tar shards (as img2dataset writes them) from a CSV or JSONL of image-text pairs.

CSV: a header with the columns image,caption[,lang]. JSONL: one {"image": ..., "caption": ..., "lang": ...} per
line. Image paths are relative to --image-root (default: the input file's folder). JPEG and PNG files are copied
byte for byte; other formats (WebP, BMP, GIF, TIFF, ...) are re-encoded (JPEG, or PNG when they have alpha).
Rows with a missing or unreadable image or an empty caption are reported and skipped, never fatal. The M2 paper's
cleaning (captions under 5 characters, images with an aspect ratio over 3) is --min-caption-chars 5
--max-aspect-ratio 3 (off by default; the trainer has the same flags, for shards written without them).

    python tools/make_shards.py pairs.csv --output-dir data/train --samples-per-shard 10000
    then train with --data-path data/train  (or data/train/shard-{00000..00009}.tar)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from typing import Iterator, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_m2.errors import ConfigError  # noqa: E402

_REPORTED_ROWS = 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="CSV (header image,caption[,lang]) or JSONL ({image, caption, lang}) file")
    p.add_argument("--output-dir", required=True, help="folder for the shards (created if missing)")
    p.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar shard")
    p.add_argument("--prefix", default="shard", help="shard file names: PREFIX-00000.tar, PREFIX-00001.tar, ...")
    p.add_argument("--image-root", default=None,
                   help="folder that relative image paths start from (default: the input file's folder)")
    p.add_argument("--image-column", default="image", help="CSV column / JSONL field with the image path")
    p.add_argument("--caption-column", default="caption", help="CSV column / JSONL field with the caption")
    p.add_argument("--lang-column", default="lang", help="optional CSV column / JSONL field with the language")
    p.add_argument("--min-caption-chars", type=int, default=0,
                   help="skip rows whose caption has fewer characters (the M2 paper: 5); 0 = off")
    p.add_argument("--max-aspect-ratio", type=float, default=0.0,
                   help="skip rows whose image's longer side exceeds this times the shorter one (the M2 paper: 3); "
                   "0 = off")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of images that must be re-encoded")
    p.add_argument("--log-every", type=int, default=1000, help="print progress (samples/s) every N samples")
    return p.parse_args(argv)


def read_rows(path: str, args: argparse.Namespace) -> Iterator[tuple[int, Optional[dict], str]]:
    """(row number, row or None, problem) for every data row; fails early on a missing column."""
    if not os.path.isfile(path):
        raise ConfigError(f"input {path!r}: no such file")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if path.endswith(".jsonl") or path.endswith(".json"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, None, f"not JSON: {exc.msg}"
                    continue
                if isinstance(row, dict):
                    yield number, row, ""
                else:
                    yield number, None, "not a JSON object"
        else:
            reader = csv.DictReader(f)
            missing = [c for c in (args.image_column, args.caption_column) if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"input {path!r} lacks the column(s) {missing} (header: {reader.fieldnames}); "
                                  "see --image-column/--caption-column")
            for number, row in enumerate(reader, 2):  # line 1 is the header
                yield number, row, ""


def load_image(path: str, jpeg_quality: int) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (width, height)): JPEG/PNG as they are, anything else re-encoded; raises for an unreadable
    image."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # a truncated or corrupt file fails here, not in the training run
    if image.format == "JPEG":
        return data, "jpg", image.size
    if image.format == "PNG":
        return data, "png", image.size
    buf = io.BytesIO()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image.convert("RGBA").save(buf, format="PNG")
        return buf.getvalue(), "png", image.size
    image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue(), "jpg", image.size


def make_shards(args: argparse.Namespace) -> dict:
    from megatron_m2.data.filters import SampleFilter
    from megatron_m2.data.shards import ShardWriter

    cleaning = SampleFilter(args.min_caption_chars, args.max_aspect_ratio)

    image_root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    if not os.path.isdir(image_root):
        raise ConfigError(f"--image-root {image_root!r}: no such folder")
    bad: dict[str, int] = {}
    start = time.perf_counter()
    with ShardWriter(args.output_dir, args.samples_per_shard, args.prefix) as writer:
        for number, row, problem in read_rows(args.input, args):
            if not problem:
                image_path = str(row.get(args.image_column) or "").strip()
                caption = str(row.get(args.caption_column) or "").strip()
                lang = str(row.get(args.lang_column) or "").strip() or None
                if not image_path:
                    problem = "no image path"
                elif not caption:
                    problem = "empty caption"
                elif cleaning.reject_caption(caption):
                    problem = f"short caption: {len(caption)} characters (--min-caption-chars {args.min_caption_chars})"
                else:
                    full = image_path if os.path.isabs(image_path) else os.path.join(image_root, image_path)
                    try:
                        image, ext, (width, height) = load_image(full, args.jpeg_quality)
                    except FileNotFoundError:
                        problem = f"image not found: {full}"
                    except Exception as exc:  # Pillow raises many types for a bad file
                        problem = f"unreadable image: {full}: {type(exc).__name__}: {exc}"
                    else:
                        if cleaning.reject_size(width, height):
                            problem = (f"aspect ratio: {full} is {width}x{height} (--max-aspect-ratio "
                                       f"{args.max_aspect_ratio})")
            if problem:
                reason = problem.split(":")[0]  # the counted reason; the rest is this row's detail
                bad[reason] = bad.get(reason, 0) + 1
                if sum(bad.values()) <= _REPORTED_ROWS:
                    print(f"skipped row {number}: {problem}", file=sys.stderr)
                continue
            writer.write(image, ext, caption, lang, meta={"source": image_path})
            if args.log_every and writer.count % args.log_every == 0:
                rate = writer.count / (time.perf_counter() - start)
                print(f"{writer.count} samples, {rate:.0f} samples/s, {len(writer.paths)} shards", flush=True)
    elapsed = time.perf_counter() - start
    summary = {"samples": writer.count, "shards": len(writer.paths), "skipped": sum(bad.values()),
               "skipped_by_reason": bad, "seconds": round(elapsed, 2),
               "samples_per_s": round(writer.count / elapsed, 1) if elapsed > 0 else None}
    print(f"wrote {writer.count} samples in {len(writer.paths)} shards to {args.output_dir} "
          f"({summary['samples_per_s']} samples/s); skipped {summary['skipped']} rows {bad or ''}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        make_shards(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
