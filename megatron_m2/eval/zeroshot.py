"""Zero-shot classification: a text classifier from class names x prompt templates, top-k accuracy.

Ties count against the model (a class scoring exactly as high as the true one ranks before it), so a collapsed
encoder that maps everything to one vector scores 0, not 100.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_m2.eval.datasets import normalize_caption
from megatron_m2.eval.templates import default_templates, fill
from megatron_m2.progress_line import ProgressLine

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodeTexts = Callable[[list[str]], torch.Tensor]


def encode_in_batches(encode_texts: EncodeTexts, texts: Sequence[str], batch_size: int,
                      what: str = "encoding texts") -> torch.Tensor:
    """encode_texts over `texts` in chunks of batch_size; [len(texts), d] float32 on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    with ProgressLine(what, len(texts), "texts") as progress:
        for i in range(0, len(texts), batch_size):
            chunks.append(encode_texts(list(texts[i:i + batch_size])).detach().float().cpu())
            progress.update(len(chunks[-1]))
    return torch.cat(chunks)


def build_classifier(class_names: list[str], templates: list[str], encode_texts: EncodeTexts,
                     batch_size: int = 256, caption_normalization: str = "none") -> torch.Tensor:
    """[C, d]: per class, every template's embedding (normalised), averaged, re-normalised (CLIP ensembling).

    Each prompt goes through the caption normalisation captions get (datasets.normalize_caption)."""
    if not class_names or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    texts = [normalize_caption(fill(t, name), caption_normalization) for name in class_names for t in templates]
    embeds = F.normalize(encode_in_batches(encode_texts, texts, batch_size, "zero-shot: encoding the class prompts"),
                         dim=-1)
    return F.normalize(embeds.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, how many other columns score >= the target column (0 = a strict top-1 hit)."""
    target_score = scores.gather(1, target.view(-1, 1))
    return (scores >= target_score).sum(dim=1) - 1


def zero_shot_accuracy(image_embeds: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": .., "top5": ..} in percent; a k larger than the number of classes is left out (always 100)."""
    if image_embeds.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} image embeddings but {labels.shape[0]} labels")
    ranks = rank_of_target(image_embeds.float() @ classifier.float().T, labels.long())
    return {f"top{k}": 100.0 * (ranks < k).float().mean().item() for k in topk if k <= classifier.shape[0]}


def encode_dataset_images(dataset, encode_images: EncodeImages, batch_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [n, d], labels [n]) of a dataset whose items are (image tensor [3,H,W], label), in order."""
    embeds, labels = [], []
    with ProgressLine("zero-shot: encoding images", len(dataset), "images") as progress:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            embeds.append(encode_images(torch.stack([image for image, _ in items])).detach().float().cpu())
            labels.extend(label for _, label in items)
            progress.update(len(items))
    return torch.cat(embeds), torch.tensor(labels, dtype=torch.long)


def evaluate_zero_shot(dataset, class_names_by_lang: Mapping[str, list[str]], encode_images: EncodeImages,
                       encode_texts: EncodeTexts, batch_size: int = 64,
                       templates_by_lang: Optional[Mapping[str, list[str]]] = None,
                       topk: Sequence[int] = (1, 5), caption_normalization: str = "none") -> dict[str, float]:
    """{"en/top1", "en/top5", "zh/top1", ...}: images encoded once, one classifier per language.

    Templates: `templates_by_lang`, else the dataset's own (`dataset.templates`: --zeroshot-templates files, e.g.
    the digits'), else the built-in ImageNet ones (templates.default_templates). Prompts are normalised like
    captions (`caption_normalization`, the evaluation protocol's).
    """
    templates_by_lang = templates_by_lang or getattr(dataset, "templates", None) or {}
    image_embeds, labels = encode_dataset_images(dataset, encode_images, batch_size)
    results: dict[str, float] = {}
    for lang, names in class_names_by_lang.items():
        templates = templates_by_lang.get(lang) or default_templates(lang)
        classifier = build_classifier(names, templates, encode_texts, batch_size, caption_normalization)
        for key, value in zero_shot_accuracy(image_embeds, labels, classifier, topk).items():
            results[f"{lang}/{key}"] = value
    return results
