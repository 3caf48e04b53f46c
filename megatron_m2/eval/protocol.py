"""Evaluation protocols: how captions and prompts are normalised and which texts match which images.

release  M2-Encoder's released evaluation (eval_retrieval.py in alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder):
         every caption and prompt lower-cased, curly double quotes made straight (`_preprocess_text`), and a caption
         text shared by several images (after normalisation) counts as a match for each of them, in both directions
         (its ground-truth matrices are built from caption strings). The numbers a user holds against the paper.
strict   the project's own rule: captions and prompts as written (surrounding whitespace stripped), and a caption
         matches only the image it is listed under (a caption shared by two images is a negative for the other).

`--eval-protocol auto` (the default) picks `release` for a model that carries the release's preprocessing (the
importer sets image_resize_mode "squash", tools/import_official.py) and `strict` otherwise. `--caption-normalization`
overrides the protocol's normalisation alone.

One detail of the release's script is not copied: when the same caption string appears several times, it marks
only the last copy as a match (`text_ids[caption]` is overwritten), although every copy has the same embedding and
score; which copy its unstable argsort then ranks first is arbitrary. Here every copy matches, so a tie between
identical strings never decides a recall.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_m2.errors import ConfigError

EVAL_PROTOCOLS = ("auto", "release", "strict")


@dataclass(frozen=True)
class EvalProtocol:
    name: str
    caption_normalization: str  # datasets.CAPTION_NORMALIZATIONS: "official" (the release's) or "none"
    shared_captions_match: bool  # a caption string shared by several images matches each of them

    def describe(self) -> str:
        rule = ("a caption shared by several images matches each" if self.shared_captions_match
                else "a caption matches only its own image")
        return f"{self.name} (caption and prompt normalisation: {self.caption_normalization}; {rule})"


PROTOCOLS = {"release": EvalProtocol("release", "official", True), "strict": EvalProtocol("strict", "none", False)}


def default_protocol(config) -> str:
    """release for a model carrying the release's preprocessing (its squashed images, set by the importer)."""
    return "release" if getattr(config, "image_resize_mode", "crop") == "squash" else "strict"


def resolve_protocol(name: str, config, caption_normalization: Optional[str] = None) -> EvalProtocol:
    """--eval-protocol (auto = the model's default) with --caption-normalization's override, if given."""
    if name not in EVAL_PROTOCOLS:
        raise ConfigError(f"--eval-protocol {name!r}: use one of {EVAL_PROTOCOLS}")
    protocol = PROTOCOLS[default_protocol(config) if name == "auto" else name]
    if caption_normalization is not None and caption_normalization != protocol.caption_normalization:
        protocol = EvalProtocol(f"{protocol.name} + --caption-normalization {caption_normalization}",
                                caption_normalization, protocol.shared_captions_match)
    return protocol


def caption_matches(texts: Sequence[str], text_to_image: torch.Tensor, shared_captions_match: bool) -> torch.Tensor:
    """[P, 2] (text index, image index) pairs that count as matches: each text with the image it is listed under,
    and with shared_captions_match every image that has a caption with the same (normalised) string."""
    text_to_image = text_to_image.long()
    pairs = torch.stack([torch.arange(len(text_to_image)), text_to_image], dim=1)
    if not shared_captions_match:
        return pairs
    if len(texts) != len(text_to_image):
        raise ValueError(f"{len(texts)} texts but {len(text_to_image)} text_to_image entries")
    images_of: dict[str, set[int]] = {}
    for text, image in zip(texts, text_to_image.tolist()):
        images_of.setdefault(text, set()).add(image)
    shared = [(t, image) for t, text in enumerate(texts) for image in sorted(images_of[text])]
    return torch.tensor(shared, dtype=torch.long).view(-1, 2)
