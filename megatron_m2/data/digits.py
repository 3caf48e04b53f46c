"""The embedded default data set: scikit-learn's bundled handwritten digits with bilingual captions.

1,797 real 8x8 scans (UCI optdigits, 43 writers; shipped inside scikit-learn, so no download), upsampled bicubic
to image_size and written as dark ink on a light background in RGB. A stratified, seeded split gives:
  train/digits-NNNNN.tar   webdataset shards; every train image twice, once with an English and once with a Chinese
                           caption drawn from varied templates ("a handwritten 7." / "数字七的照片。"), in shuffled
                           order; KEY.png + KEY.txt + KEY.json {"caption", "lang", "label", "index"}
  eval/NN_name/IIII.png    the held-out images in the ImageNet layout (IIII = index in load_digits)
  classnames_{en,zh}.txt   "zero".."nine" / "零".."九", label order
  templates_{en,zh}.txt    the zero-shot prompts for the digits ("{}" = class name)
  retrieval.jsonl          one held-out image per class with two English and two Chinese captions. The gallery
                           holds one image per digit because the captions can only name the digit: with several
                           images of a class, instance-level recall would mostly measure ties (chance t2i R@1: 10%).
  fine_grained.jsonl       the fine-grained evaluation (eval/fine_grained.py), made of held-out scans only:
  fine/NNNN_I.png          composites of two or three digits in a row, in pairs that differ only in what the captions
                           name: position ("three left of seven." / "三在七的左边。", the same two scans swapped) or
                           count ("two sevens." / "两个七。" against three); chance 50%. A digits analogue of the
                           paper's VG-POS / COCO-COUNT, which need downloads.
  captions.txt             every train caption, one a line (to train the tiny tokenizer)
With composites=N the train shards also hold N composites of train-split scans (each with an English and a Chinese
caption of varied wording), so that the fine-grained evaluation measures something learnt; the demo uses them.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from megatron_m2.data.shards import ShardWriter
from megatron_m2.errors import ConfigError

LANGS = ("en", "zh")
SHARD_PREFIX = "digits"

# Class names "zero".."nine" / "零".."九", in label order.
DIGIT_CLASS_NAMES: dict[str, list[str]] = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "zh": list("零一二三四五六七八九"),
}

# Zero-shot prompts for the digits (only the class name varies).
DIGIT_TEMPLATES: dict[str, list[str]] = {
    "en": ["a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand."],
    "zh": ["数字{}的照片。", "手写的{}。", "手写数字{}的图片。"],
}

# Training captions for the digits: {name} is the word ("seven" / "七"), {digit} the numeral ("7"). No "一张" /
# "一个" (a, one): 一 is also the class name of 1.
DIGIT_CAPTION_TEMPLATES: dict[str, list[str]] = {
    "en": [
        "a photo of the digit {name}.",
        "a handwritten {digit}.",
        "the number {name}, written by hand.",
        "a scan of a handwritten {name}.",
        "a blurry picture of the number {digit}.",
        "a small black and white image of a {name}.",
    ],
    "zh": [
        "数字{name}的照片。",
        "手写的数字{digit}。",
        "手写数字{name}的图片。",
        "手写的{name}。",
        "数字{digit}的扫描图。",
        "模糊的数字{name}。",
    ],
}


# Composite captions: position of two digits ({a} left of {b}; {a}/{b} a class name or numeral) and count of one digit
# ({n} copies of {d}, {plural} its English plural). The first template of each is the fine-grained evaluation's.
COMPOSITE_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "en": {"position": ["{a} left of {b}.", "the digit {a} to the left of the digit {b}.", "{b} right of {a}."],
           "count": ["{n} {plural}.", "{n} handwritten {plural}.", "a row of {n} {plural}."]},
    "zh": {"position": ["{a}在{b}的左边。", "{b}在{a}的右边。", "左边是{a}，右边是{b}。"],
           "count": ["{n}个{d}。", "{n}个手写的{d}。", "一排{n}个{d}。"]},
}
COUNT_WORDS = {"en": {2: "two", 3: "three"}, "zh": {2: "两", 3: "三"}}
PLURALS = ["zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines"]
FINE_GRAINED_FILE = "fine_grained.jsonl"


@dataclass(frozen=True)
class DigitsPaths:
    root: str
    train_dir: str
    train_shards: list[str]
    eval_dir: str
    classnames: dict[str, str]   # lang -> classnames_<lang>.txt
    templates: dict[str, str]    # lang -> templates_<lang>.txt
    retrieval: str
    captions: str
    num_train_images: int
    num_eval_images: int
    fine_grained: str = ""
    num_train_composites: int = 0


def render_digit(pixels: np.ndarray, image_size: int) -> Image.Image:
    """An 8x8 array of ink levels 0..16 -> RGB image_size x image_size, dark ink on light paper."""
    grey = Image.fromarray((255 - pixels * (255 / 16)).round().clip(0, 255).astype(np.uint8), mode="L")
    return grey.resize((image_size, image_size), Image.BICUBIC).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(label: int, lang: str, rng: np.random.Generator) -> str:
    """A random caption of the digit `label` in `lang`."""
    templates = DIGIT_CAPTION_TEMPLATES[lang]
    return _fill(templates[rng.integers(len(templates))], label, lang)


def _fill(template: str, label: int, lang: str) -> str:
    return template.format(name=DIGIT_CLASS_NAMES[lang][label], digit=label)


def _digit_word(label: int, lang: str, rng: Optional[np.random.Generator]) -> str:
    """The class name, or (training captions, half the time) the numeral."""
    if rng is not None and rng.random() < 0.5:
        return str(label)
    return DIGIT_CLASS_NAMES[lang][label]


def composite_caption(kind: str, labels: Sequence[int], lang: str, rng: Optional[np.random.Generator] = None) -> str:
    """A caption of a composite: kind "position" (labels = left, right) or "count" (labels = the same digit n times).
    rng picks among the templates and words (training); None gives the evaluation's fixed wording."""
    templates = COMPOSITE_TEMPLATES[lang][kind]
    template = templates[rng.integers(len(templates))] if rng is not None else templates[0]
    if kind == "position":
        return template.format(a=_digit_word(labels[0], lang, rng), b=_digit_word(labels[1], lang, rng))
    digit, n = labels[0], len(labels)
    return template.format(n=COUNT_WORDS[lang][n], d=DIGIT_CLASS_NAMES[lang][digit], plural=PLURALS[digit])


def render_composite(scans: Sequence[np.ndarray], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Digits left to right on light paper: each scan a third of the image wide, the k scans spread evenly over the
    width with a pixel of jitter, vertically centred give or take a few pixels."""
    cell = image_size // 3
    canvas = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    k = len(scans)
    for i, pixels in enumerate(scans):
        centre = (i + 0.5) * image_size / k
        left = int(np.clip(round(centre - cell / 2 + rng.integers(-1, 2)), 0, image_size - cell))
        top = int(np.clip((image_size - cell) // 2 + rng.integers(-3, 4), 0, image_size - cell))
        canvas.paste(render_digit(pixels, cell), (left, top))
    return canvas


def _composite_labels(kind: str, rng: np.random.Generator) -> list[int]:
    if kind == "position":
        return [int(x) for x in rng.choice(10, size=2, replace=False)]
    return [int(rng.integers(10))] * int(rng.integers(2, 4))


def _scans_of(labels: Sequence[int], by_label: dict[int, np.ndarray], rng: np.random.Generator) -> list[int]:
    """Distinct scan indices for the labels (a digit repeated gets different scans)."""
    chosen: list[int] = []
    for label in labels:
        pool = [i for i in by_label[label] if i not in chosen]
        chosen.append(int(pool[rng.integers(len(pool))]))
    return chosen


def class_dir_name(label: int) -> str:
    return f"{label:02d}_{DIGIT_CLASS_NAMES['en'][label]}"


def split_indices(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/held-out split of sample indices (sorted), deterministic given the seed."""
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"--train-fraction {train_fraction}: must be strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(train_fraction * len(members)))
        if n_train == len(members):  # keep at least one held-out image per class
            n_train -= 1
        train.extend(members[:n_train].tolist())
        held_out.extend(members[n_train:].tolist())
    return np.array(sorted(train)), np.array(sorted(held_out))


def _clear_previous(out_dir: str) -> None:
    # Only what an earlier run of this function wrote, so a smaller re-run leaves no stale shard or class.
    train_dir, eval_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "eval")
    if os.path.isdir(train_dir):
        for name in os.listdir(train_dir):
            if name.startswith(SHARD_PREFIX + "-") and name.endswith((".tar", ".tar.tmp")):
                os.remove(os.path.join(train_dir, name))
    for label in range(10):
        shutil.rmtree(os.path.join(eval_dir, class_dir_name(label)), ignore_errors=True)


def write_digits_dataset(out_dir: str, image_size: int = 32, train_fraction: float = 0.8, seed: int = 0,
                         samples_per_shard: int = 512, composites: int = 0, fine_grained_pairs: int = 120
                         ) -> DigitsPaths:
    """Writes the digits data set under out_dir (layout in the module docstring); deterministic given the seed.
    composites: composite training images (each twice, English and Chinese caption); fine_grained_pairs: pairs of
    held-out composites in fine_grained.jsonl (two thirds position, one third count)."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ConfigError(f"--image-size {image_size}: the digits are 8x8, use at least 8")
    digits = load_digits()
    images, labels = digits.images, digits.target
    train_idx, eval_idx = split_indices(labels, train_fraction, seed)
    rng = np.random.default_rng([seed, 1])
    _clear_previous(out_dir)
    train_dir, eval_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "eval")

    # Train: (index, lang) pairs shuffled so the two captions of an image rarely share a batch.
    pairs = [(int(i), lang) for i in train_idx for lang in LANGS]
    composite_rng = np.random.default_rng([seed, 2])  # its own stream: composites=0 writes what it always did
    train_by_label = {label: train_idx[labels[train_idx] == label] for label in range(10)}
    composite_items = []
    for _ in range(composites):
        kind = "position" if composite_rng.random() < 2 / 3 else "count"
        digit_labels = _composite_labels(kind, composite_rng)
        scans = _scans_of(digit_labels, train_by_label, composite_rng)
        image = png_bytes(render_composite([images[i] for i in scans], image_size, composite_rng))
        composite_items.append((kind, digit_labels, scans, image))
    pairs += [(("composite", c), lang) for c in range(composites) for lang in LANGS]
    order = rng.permutation(len(pairs)) if not composites else composite_rng.permutation(len(pairs))
    captions = []
    with ShardWriter(train_dir, samples_per_shard=samples_per_shard, prefix=SHARD_PREFIX, key_width=6) as writer:
        for position in order:
            index, lang = pairs[position]
            if isinstance(index, tuple):
                kind, digit_labels, scans, image = composite_items[index[1]]
                text = composite_caption(kind, digit_labels, lang, composite_rng)
                captions.append(text)
                writer.write(image, "png", text, lang, {"kind": kind, "labels": digit_labels, "indices": scans})
                continue
            label = int(labels[index])
            text = caption(label, lang, rng)
            captions.append(text)
            writer.write(png_bytes(render_digit(images[index], image_size)), "png", text, lang,
                         {"label": label, "index": index})
    shards = writer.paths

    # Held-out: ImageNet layout.
    eval_paths: dict[int, list[str]] = {label: [] for label in range(10)}
    for index in eval_idx:
        label = int(labels[index])
        relative = os.path.join("eval", class_dir_name(label), f"{index:04d}.png")
        os.makedirs(os.path.join(out_dir, os.path.dirname(relative)), exist_ok=True)
        render_digit(images[index], image_size).save(os.path.join(out_dir, relative))
        eval_paths[label].append(relative)

    classnames, templates = {}, {}
    for lang in LANGS:
        classnames[lang] = _write_lines(os.path.join(out_dir, f"classnames_{lang}.txt"), DIGIT_CLASS_NAMES[lang])
        templates[lang] = _write_lines(os.path.join(out_dir, f"templates_{lang}.txt"), DIGIT_TEMPLATES[lang])

    retrieval = os.path.join(out_dir, "retrieval.jsonl")
    with open(retrieval, "w", encoding="utf-8") as f:
        for label in range(10):
            image = eval_paths[label][rng.integers(len(eval_paths[label]))]
            texts = [_fill(t, label, lang) for lang in LANGS
                     for t in rng.choice(DIGIT_CAPTION_TEMPLATES[lang], size=2, replace=False)]
            f.write(json.dumps({"image": image, "captions": texts}, ensure_ascii=False) + "\n")

    captions_path = _write_lines(os.path.join(out_dir, "captions.txt"), captions)
    fine_grained = write_fine_grained(out_dir, images, labels, eval_idx, image_size, fine_grained_pairs, seed)
    return DigitsPaths(root=out_dir, train_dir=train_dir, train_shards=shards, eval_dir=eval_dir,
                       classnames=classnames, templates=templates, retrieval=retrieval, captions=captions_path,
                       num_train_images=len(train_idx), num_eval_images=len(eval_idx), fine_grained=fine_grained,
                       num_train_composites=composites)


def write_fine_grained(out_dir: str, images: np.ndarray, labels: np.ndarray, eval_idx: np.ndarray, image_size: int,
                       num_pairs: int, seed: int) -> str:
    """fine_grained.jsonl + fine/*.png from held-out scans: per record two composites that differ only in what the
    captions name, {"kind", "images": [path, path], "captions": {lang: [caption of image 0, of image 1]}, "indices"}."""
    rng = np.random.default_rng([seed, 3])
    fine_dir = os.path.join(out_dir, "fine")
    shutil.rmtree(fine_dir, ignore_errors=True)
    os.makedirs(fine_dir)
    by_label = {label: eval_idx[labels[eval_idx] == label] for label in range(10)}
    path = os.path.join(out_dir, FINE_GRAINED_FILE)
    with open(path, "w", encoding="utf-8") as f:
        for pair in range(num_pairs):
            if pair % 3 < 2:  # position: the same two scans, swapped
                kind, first = "position", [int(x) for x in rng.choice(10, size=2, replace=False)]
                scans = _scans_of(first, by_label, rng)
                variants = [(first, scans), (first[::-1], scans[::-1])]
            else:  # count: two copies of a digit against three (the two plus one more scan)
                kind, digit = "count", int(rng.integers(10))
                scans = _scans_of([digit] * 3, by_label, rng)
                variants = [([digit] * 2, scans[:2]), ([digit] * 3, scans)]
            record = {"kind": kind, "images": [], "captions": {lang: [] for lang in LANGS},
                      "indices": [list(v[1]) for v in variants]}  # the scans (load_digits indices), for provenance
            for i, (digit_labels, digit_scans) in enumerate(variants):
                relative = f"fine/{pair:04d}_{i}.png"
                render_composite([images[s] for s in digit_scans], image_size, rng).save(
                    os.path.join(out_dir, relative))
                record["images"].append(relative)
                for lang in LANGS:
                    record["captions"][lang].append(composite_caption(kind, digit_labels, lang))
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _write_lines(path: str, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
