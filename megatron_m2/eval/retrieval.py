"""Image-text retrieval: t2i and i2t R@1/5/10 and their mean (MR), as reported by M2-Encoder and Chinese-CLIP.

Several captions per image: t2i ranks each caption's one image among all images; i2t counts a hit for an image if
ANY of its captions is within the top k (Chinese-CLIP's / M2-Encoder's convention). Ties count against the model.
Similarities are computed in row chunks so a 5k x 25k test set never materialises one big matrix.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from megatron_m2.eval.zeroshot import EncodeImages, EncodeTexts, encode_in_batches, rank_of_target
from megatron_m2.progress_line import ProgressLine

RECALL_KS = (1, 5, 10)
_CHUNK = 1024


def _t2i_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    return torch.cat([rank_of_target(text_embeds[i:i + _CHUNK] @ image_embeds.T, text_to_image[i:i + _CHUNK])
                      for i in range(0, text_embeds.shape[0], _CHUNK)])


def _i2t_ranks(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """Per image: how many texts of OTHER images score >= its best caption."""
    ranks = []
    for i in range(0, image_embeds.shape[0], _CHUNK):
        scores = image_embeds[i:i + _CHUNK] @ text_embeds.T  # [b, m]
        own = text_to_image.view(1, -1) == torch.arange(i, i + scores.shape[0]).view(-1, 1)
        best_own = scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((scores >= best_own) & ~own).sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor
                      ) -> dict[str, float]:
    """{"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", ..., "MR"} in percent; MR is the mean of the six."""
    text_to_image = text_to_image.long()
    n = image_embeds.shape[0]
    if text_embeds.shape[0] != text_to_image.shape[0]:
        raise ValueError(f"{text_embeds.shape[0]} text embeddings but {text_to_image.shape[0]} text_to_image entries")
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= n):
        raise ValueError(f"text_to_image must index the {n} images")
    if torch.bincount(text_to_image, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption (i2t recall is undefined otherwise)")
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    ranks = {"i2t": _i2t_ranks(image_embeds, text_embeds, text_to_image),
             "t2i": _t2i_ranks(image_embeds, text_embeds, text_to_image)}
    metrics = {f"{d}_R@{k}": 100.0 * (ranks[d] < k).float().mean().item() for d in ("i2t", "t2i") for k in RECALL_KS}
    metrics["MR"] = sum(metrics.values()) / len(metrics)
    return metrics


def evaluate_retrieval(jsonl_path_or_records: Union[str, Sequence[dict]], encode_images: EncodeImages,
                       encode_texts: EncodeTexts, transform: Callable, batch_size: int = 64,
                       image_root: Optional[str] = None,
                       caption_normalization: Optional[str] = None) -> dict[str, float]:
    """Retrieval metrics on a JSONL file of {"image": path, "captions" or "caption": [...]} (or those records).

    Relative image paths are resolved against `image_root`, else the JSONL's folder (records: the cwd);
    caption_normalization "official" applies the release's text rule (see datasets.read_retrieval_records).
    """
    from megatron_m2.eval.datasets import load_image, read_retrieval_records

    records = read_retrieval_records(jsonl_path_or_records, image_root, caption_normalization)
    image_embeds = []
    with ProgressLine("retrieval: encoding images", len(records), "images") as progress:
        for start in range(0, len(records), batch_size):
            batch = torch.stack([transform(load_image(r.image)) for r in records[start:start + batch_size]])
            image_embeds.append(encode_images(batch).detach().float().cpu())
            progress.update(len(batch))
    texts = [caption for r in records for caption in r.captions]
    text_to_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions], dtype=torch.long)
    return retrieval_metrics(torch.cat(image_embeds),
                             encode_in_batches(encode_texts, texts, batch_size, "retrieval: encoding captions"),
                             text_to_image)
