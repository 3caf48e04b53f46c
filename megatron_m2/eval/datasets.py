"""Evaluation inputs in the formats users already have.

Zero-shot: the ImageNet layout, root/<class_dir>/*.jpg|png, class directories sorted by name = label order, plus one
class-name file per language (one name a line, in label order: classnames_en.txt, classnames_zh.txt).
Retrieval: JSONL, one {"image": path, "captions": [...]} a line, or the release's files as shipped
(f30k-cn_test.jsonl, coco-cn_test.jsonl, f30k_caption_karpathy_test.jsonl, ...: key "caption"); either key may hold
one string or a list. Lines naming the same image are one image with all their captions. Relative image paths are
relative to --retrieval-image-root, else to the JSONL's folder. --caption-normalization official applies the
release's evaluation text rule (eval_retrieval.py `_preprocess_text`: lower-case, “ and ” to ", nothing else).
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
CAPTION_NORMALIZATIONS = ("none", "official")


def model_eval_transform(config) -> Callable:
    """The evaluation transform of a model config's saved preprocessing (M2Config or M2EncoderConfig): squash for
    the release's weights, shorter side + center crop for configs that predate the fields."""
    from megatron_m2.config import IMAGE_RESIZE_MODES
    from megatron_m2.data.transforms import eval_transform

    mode = getattr(config, "image_resize_mode", "crop")
    if mode not in IMAGE_RESIZE_MODES:
        raise ConfigError(f"model config: image_resize_mode {mode!r} is not one of {IMAGE_RESIZE_MODES}")
    # the transforms resize bicubic and normalise with 0.5 (data/transforms.py): refuse a config that asks otherwise
    channels = getattr(config, "num_channels", 3)
    for name, expected in (("image_interpolation", "bicubic"), ("image_mean", (0.5,) * channels),
                           ("image_std", (0.5,) * channels)):
        value = getattr(config, name, expected)
        if (tuple(value) if isinstance(value, (list, tuple)) else value) != expected:
            raise ConfigError(f"model config: {name} {value!r} is not implemented by the evaluator (only {expected})")
    return eval_transform(config.image_size, square=mode == "squash")


def normalize_caption(text: str, mode: str = "none") -> str:
    """none: the caption stripped of surrounding whitespace. official: exactly the release's evaluation rule
    (lower-case, curly double quotes to straight ones; no stripping), so ids equal the release's."""
    if mode == "official":
        return text.lower().replace("\u201c", '"').replace("\u201d", '"')
    if mode == "none":
        return text.strip()
    raise ConfigError(f"--caption-normalization {mode!r}: use one of {CAPTION_NORMALIZATIONS}")


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

    `template_files` (optional, lang -> file of prompt templates with "{}" for the class name, one a line: the
    --zeroshot-templates flag) sets `templates[lang]`, which evaluate_zero_shot uses instead of the built-in ImageNet
    templates (eval/templates.py).
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
        from megatron_m2.eval.templates import read_templates

        unknown = sorted(set(template_files or {}) - set(self.class_names))
        if unknown:
            raise ConfigError(f"--zeroshot-templates {unknown[0]}=: no --zeroshot-classnames for language "
                              f"{unknown[0]!r} (have {sorted(self.class_names)})")
        self.templates: dict[str, list[str]] = {lang: read_templates(path, f"--zeroshot-templates {lang}=")
                                                for lang, path in (template_files or {}).items()}
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


def _row_captions(row: object) -> Optional[list]:
    """The captions of a row: key "captions" (ours) or "caption" (the release's), a string or a list."""
    if not isinstance(row, dict) or ("caption" in row) == ("captions" in row):
        return None  # neither key, both keys, or not an object: reported by the caller
    captions = row["captions"] if "captions" in row else row["caption"]
    return [captions] if isinstance(captions, str) else captions


def read_retrieval_records(source: Union[str, Sequence[dict]], image_root: Optional[str] = None,
                           caption_normalization: Optional[str] = None) -> list[RetrievalRecord]:
    """Records of a retrieval JSONL path (or of already-parsed dicts), image paths resolved and checked.

    image_root: where relative image paths start (default: the JSONL's folder; for dicts the cwd).
    caption_normalization: "none" (strip) or "official" (the release's rule, see normalize_caption).
    """
    mode = caption_normalization or "none"
    if mode not in CAPTION_NORMALIZATIONS:
        raise ConfigError(f"--caption-normalization {mode!r}: use one of {CAPTION_NORMALIZATIONS}")
    root_flag = "--retrieval-image-root" if image_root is not None else None
    if image_root is not None and not os.path.isdir(image_root):
        raise ConfigError(f"--retrieval-image-root {image_root!r}: no such directory")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"--retrieval-data {path!r}: no such file")
        if image_root is None:
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
    by_image: dict[str, tuple[str, list[str]]] = {}  # normalised path -> (path, captions), in the file's order
    for where, row in rows:
        image = row.get("image") if isinstance(row, dict) else None
        captions = _row_captions(row)
        if not isinstance(image, str) or not isinstance(captions, list) or not captions \
                or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ConfigError(f"--retrieval-data {where}: expected {{\"image\": path, \"captions\" (or the "
                              f"release's \"caption\"): a non-empty string or list of them}}, got {str(row)[:200]}")
        resolved = image if os.path.isabs(image) else os.path.join(image_root or os.getcwd(), image)
        if not os.path.isfile(resolved):
            relative_to = root_flag or "the JSONL's folder; set --retrieval-image-root for another root"
            raise ConfigError(f"--retrieval-data {where}: image {resolved!r} not found (relative paths are "
                              f"relative to {relative_to})")
        # one image named on several lines is one retrieval target, with all its captions
        by_image.setdefault(os.path.normpath(resolved), (resolved, []))[1].extend(
            normalize_caption(c, mode) for c in captions)
    if not by_image:
        raise ConfigError(f"--retrieval-data {source!r}: no record")
    return [RetrievalRecord(image, captions) for image, captions in by_image.values()]
