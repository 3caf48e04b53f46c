"""Fine-grained retrieval against hard negatives: pairs of images that differ only in what their captions name.

Each record (JSONL, one a line) is {"kind": name, "images": [path_0, path_1], "captions": {lang: [caption_0,
caption_1]}}, caption_i describing image_i and image_(1-i) its hard negative: the same digits with their positions
swapped, or one more copy (data/digits.py writes such a file from held-out scans). Both directions are scored, as
Winoground does: text (i2t) = for each image, its own caption scores above the other one; image (t2i) = for each
caption, its own image scores above the other one. Ties count against the model. Reported per language and kind as the
mean of the two accuracies, in percent (chance 50), plus `<lang>/mean` over kinds and `mean` over all.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_m2.errors import ConfigError
from megatron_m2.eval.zeroshot import EncodeImages, EncodeTexts, encode_in_batches


@dataclass(frozen=True)
class HardNegativePair:
    kind: str
    images: tuple[str, str]  # resolved paths
    captions: dict[str, tuple[str, str]]  # lang -> (caption of image 0, caption of image 1)


def read_fine_grained_records(path: str) -> list[HardNegativePair]:
    """The pairs of a fine-grained JSONL (relative image paths are relative to its folder); ConfigError naming
    --fine-grained-data for a missing file, a malformed line or a missing image."""
    if not os.path.isfile(path):
        raise ConfigError(f"--fine-grained-data {path!r}: no such file")
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--fine-grained-data {path}:{number}"
            try:
                row = json.loads(line)
                images = tuple(os.path.join(root, p) if not os.path.isabs(p) else p for p in row["images"])
                captions = {lang: tuple(c) for lang, c in row["captions"].items()}
                kind = str(row["kind"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{where}: expected {{\"kind\", \"images\": [2 paths], \"captions\": {{lang: "
                                  f"[2 captions]}}}} ({exc})") from exc
            if len(images) != 2 or not captions or any(len(c) != 2 for c in captions.values()):
                raise ConfigError(f"{where}: needs exactly two images and two captions per language")
            for image in images:
                if not os.path.isfile(image):
                    raise ConfigError(f"{where}: image {image!r} not found")
            pairs.append(HardNegativePair(kind, images, captions))  # type: ignore[arg-type]
    if not pairs:
        raise ConfigError(f"--fine-grained-data {path}: no record")
    languages = {tuple(sorted(p.captions)) for p in pairs}
    if len(languages) != 1:
        raise ConfigError(f"--fine-grained-data {path}: every record needs captions in the same languages")
    return pairs


def hard_negative_accuracy(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """Per pair, (text score, image score) in {0, 0.5, 1}: image_embeds, text_embeds [n, 2, d] (caption i of image
    i). Text score: the share of the two images whose own caption wins; image score: of the two captions."""
    scores = torch.einsum("nid,njd->nij", image_embeds.float(), text_embeds.float())  # [n, image, caption]
    own = scores.diagonal(dim1=1, dim2=2)  # [n, 2]
    text = (own > scores.flip(2).diagonal(dim1=1, dim2=2)).float().mean(1)  # image i: caption i vs caption 1-i
    image = (own > scores.flip(1).diagonal(dim1=1, dim2=2)).float().mean(1)  # caption i: image i vs image 1-i
    return text, image


def evaluate_fine_grained(path: str, encode_images: EncodeImages, encode_texts: EncodeTexts, transform: Callable,
                          batch_size: int = 64, pairs: Optional[list[HardNegativePair]] = None) -> dict[str, float]:
    """{"<lang>/<kind>", "<lang>/mean", "mean"} in percent (see the module docstring)."""
    from megatron_m2.eval.datasets import load_image

    pairs = pairs if pairs is not None else read_fine_grained_records(path)
    paths = [image for pair in pairs for image in pair.images]
    image_embeds = torch.cat([encode_images(torch.stack([transform(load_image(p)) for p in paths[i:i + batch_size]]))
                              .detach().float().cpu() for i in range(0, len(paths), batch_size)])
    image_embeds = image_embeds.view(len(pairs), 2, -1)
    kinds = sorted({pair.kind for pair in pairs})
    results: dict[str, float] = {}
    for lang in sorted(pairs[0].captions):
        texts = [caption for pair in pairs for caption in pair.captions[lang]]
        text_embeds = encode_in_batches(encode_texts, texts, batch_size).view(len(pairs), 2, -1)
        text_score, image_score = hard_negative_accuracy(image_embeds, text_embeds)
        both = (text_score + image_score) / 2
        for kind in kinds:
            chosen = torch.tensor([pair.kind == kind for pair in pairs])
            results[f"{lang}/{kind}"] = 100.0 * both[chosen].mean().item()
        results[f"{lang}/mean"] = sum(results[f"{lang}/{kind}"] for kind in kinds) / len(kinds)
    langs = sorted(pairs[0].captions)
    results["mean"] = sum(results[f"{lang}/mean"] for lang in langs) / len(langs)
    return results
