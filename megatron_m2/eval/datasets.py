"""Evaluation inputs in the formats users already have.

Zero-shot: the ImageNet layout, root/<class_dir>/*.jpg|png, class directories sorted by name = label order, plus one
class-name file per language (one name a line, in label order: classnames_en.txt, classnames_zh.txt).
Retrieval: JSONL, one {"image": path, "captions": [...]} a line (the Flickr30K-CN / COCO-CN test-file layout of
M2-Encoder's release); relative image paths are relative to the JSONL's folder.
Problems are ConfigErrors raised when the data set is opened, naming the flag, so a bad path fails at startup and
not after hours of training at the first --eval-interval.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from PIL import Image

from megatron_m2.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(path: str) -> Image.Image:
    """The image at `path` as RGB."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read evaluation image {path!r} ({exc}): fix or remove it") from exc


def read_lines_file(path: str, flag: str) -> list[str]:
    """Non-empty lines of a UTF-8 file (trailing blank lines ignored; a blank line inside is an error)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().rstrip().splitlines()]
    if not lines or not all(lines):
        raise ConfigError(f"{flag} {path!r}: expected one non-empty entry a line, found an empty line or file")
    return lines


class ImageFolderWithClassNames:
    """ImageNet-layout folder; items are (transform(image), label). `class_names[lang]` lists names in label order.

    `template_files` (optional, lang -> file of prompt templates with "{}" for the class name, one a line) sets
    `templates[lang]`, which evaluate_zero_shot uses instead of the built-in ImageNet templates.
    """

    def __init__(self, root: str, class_name_files: Mapping[str, str], transform: Callable,
                 template_files: Optional[Mapping[str, str]] = None) -> None:
        if not os.path.isdir(root):
            raise ConfigError(f"--zeroshot-data {root!r}: no such directory (expected root/<class_dir>/*.jpg)")
        self.class_dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.class_dirs:
            raise ConfigError(f"--zeroshot-data {root!r} has no class sub-directory (expected root/<class_dir>/*.jpg)")
        self.samples: list[tuple[str, int]] = []
        for label, class_dir in enumerate(self.class_dirs):
            files = sorted(f for f in os.listdir(os.path.join(root, class_dir))
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise ConfigError(f"--zeroshot-data: class directory {os.path.join(root, class_dir)!r} holds no "
                                  f"image ({', '.join(IMAGE_EXTENSIONS)})")
            self.samples.extend((os.path.join(root, class_dir, f), label) for f in files)
        if not class_name_files:
            raise ConfigError("--zeroshot-classnames is empty: give LANG=FILE per language, e.g. "
                              "en=classnames_en.txt zh=classnames_zh.txt")
        self.class_names: dict[str, list[str]] = {}
        for lang, path in class_name_files.items():
            names = read_lines_file(path, f"--zeroshot-classnames {lang}=")
            if len(names) != len(self.class_dirs):
                raise ConfigError(f"--zeroshot-classnames {lang}={path}: {len(names)} names but --zeroshot-data "
                                  f"{root!r} has {len(self.class_dirs)} class directories; the file needs one name "
                                  "per class directory, in sorted directory order")
            self.class_names[lang] = names
        self.templates: dict[str, list[str]] = {}
        for lang, path in (template_files or {}).items():
            templates = read_lines_file(path, f"--zeroshot-templates {lang}=")
            if not all("{}" in t for t in templates):
                raise ConfigError(f"--zeroshot-templates {lang}={path}: every template needs a {{}} for the class name")
            self.templates[lang] = templates
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


@dataclass(frozen=True)
class RetrievalRecord:
    image: str            # resolved path
    captions: list[str]


def read_retrieval_records(source: Union[str, Sequence[dict]], image_root: Optional[str] = None
                           ) -> list[RetrievalRecord]:
    """Records of a retrieval JSONL path (or of already-parsed dicts), image paths resolved and checked."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"--retrieval-data {path!r}: no such file")
        image_root = os.path.dirname(os.path.abspath(path))
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"--retrieval-data {path}:{number}: not valid JSON ({exc})") from exc
    else:
        rows = [(f"record {i}", row) for i, row in enumerate(source)]
    records = []
    for where, row in rows:
        image = row.get("image") if isinstance(row, dict) else None
        captions = row.get("captions") if isinstance(row, dict) else None
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(image, str) or not isinstance(captions, list) or not captions \
                or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ConfigError(f"--retrieval-data {where}: expected {{\"image\": path, \"captions\": [non-empty "
                              f"strings]}}, got {str(row)[:200]}")
        resolved = image if os.path.isabs(image) else os.path.join(image_root or os.getcwd(), image)
        if not os.path.isfile(resolved):
            raise ConfigError(f"--retrieval-data {where}: image {resolved!r} not found (relative paths are "
                              "relative to the JSONL's folder)")
        records.append(RetrievalRecord(resolved, [c.strip() for c in captions]))
    if not records:
        raise ConfigError(f"--retrieval-data {source!r}: no record")
    return records
