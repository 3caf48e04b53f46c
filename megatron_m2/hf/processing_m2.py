"""Tokenizer + image preprocessing for M2-Encoder, self-contained (sentencepiece, torch, Pillow, numpy).

Copied into converted folders next to tokenizer.model; load it there with
    transformers.dynamic_module_utils.get_class_from_dynamic_module("processing_m2.M2Processor", folder)
Text rules (GLM's Chinese SentencePiece model, as the official release): runs of n >= 2 spaces become <|blank_n|>,
ids are [CLS] + pieces + <|endoftext|>, truncated from the LEFT, padded with <|endoftext|> to max_length.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence, Union

import numpy as np
import torch

PROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer.model"
_SPACES = re.compile(r" {2,}")


class M2Tokenizer:
    def __init__(self, model_path: str, max_length: int = 52, cls_token: str = "[CLS]",
                 eos_token: str = "<|endoftext|>"):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.max_length = max_length
        self.cls_id = self._piece_id(cls_token)
        self.eos_id = self._piece_id(eos_token)
        self.pad_id = self.eos_id

    def _piece_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            raise ValueError(f"tokenizer model has no piece {piece!r}")
        return i

    def encode(self, text: str) -> list[int]:
        """[CLS] + pieces + <|endoftext|>, unpadded, at most max_length ids (pieces truncated from the left)."""
        text = _SPACES.sub(lambda m: f"<|blank_{len(m.group(0))}|>", text)
        pieces = self.sp.encode(text)
        keep = self.max_length - 2
        pieces = pieces[len(pieces) - keep:] if len(pieces) > keep else pieces
        return [self.cls_id, *pieces, self.eos_id]

    def __call__(self, texts: Union[str, Sequence[str]]) -> dict[str, torch.Tensor]:
        """input_ids [B, max_length] and attention_mask (1 = token, 0 = padding)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, :len(encoded)] = torch.tensor(encoded)
            mask[row, :len(encoded)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class M2ImageProcessor:
    """Resize the shorter side (bicubic) to image_size, center crop, scale to [0, 1], normalise mean/std 0.5."""

    def __init__(self, image_size: int = 224, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def one(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.image_size / min(w, h)
        size = (max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __call__(self, images) -> dict[str, torch.Tensor]:
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.one(im) for im in images])}


class M2Processor:
    def __init__(self, tokenizer: Optional[M2Tokenizer], image_processor: M2ImageProcessor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs) -> "M2Processor":
        with open(os.path.join(folder, PROCESSOR_CONFIG)) as f:
            cfg = json.load(f)
        tok_path = os.path.join(folder, TOKENIZER_FILE)
        tokenizer = M2Tokenizer(tok_path, cfg["max_length"]) if os.path.exists(tok_path) else None
        return cls(tokenizer, M2ImageProcessor(cfg["image_size"], cfg["image_mean"], cfg["image_std"]))

    def save_pretrained(self, folder: str) -> None:
        cfg = {"processor_class": "M2Processor", "image_size": self.image_processor.image_size,
               "image_mean": self.image_processor.mean.flatten().tolist(),
               "image_std": self.image_processor.std.flatten().tolist(),
               "max_length": self.tokenizer.max_length if self.tokenizer else None}
        with open(os.path.join(folder, PROCESSOR_CONFIG), "w") as f:
            json.dump(cfg, f, indent=2)

    def __call__(self, text=None, images=None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            if self.tokenizer is None:
                raise ValueError(f"no {TOKENIZER_FILE} in this folder: cannot tokenize")
            out.update(self.tokenizer(text))
        if images is not None:
            out.update(self.image_processor(images))
        return out
