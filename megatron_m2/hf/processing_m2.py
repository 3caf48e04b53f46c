"""Tokenizer + image preprocessing for M2-Encoder, self-contained (sentencepiece, torch, Pillow, numpy).

Copied into converted folders next to tokenizer.model; load it there with
    transformers.dynamic_module_utils.get_class_from_dynamic_module("processing_m2.M2Processor", folder)
Text rules: those of the official GLMChineseTokenizer (see M2Tokenizer), padded with <|endoftext|> to max_length.
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


class M2Tokenizer:
    """The GLM tokenizer's algorithm (megatron_m2/data/tokenizer.py documents it; that module must not be imported
    here, remote code is self-contained; tests/test_hf.py checks both give the same ids):
    split on the special tokens (which eat the whitespace around them), runs of 10..2 spaces -> <|blank_n|> per
    chunk, SentencePiece per chunk, body truncated from the left to max_length - 2, [CLS] body <|endoftext|>."""

    SPECIAL = ("<|endoftext|>", "[CLS]", "[MASK]", "[UNK]")

    def __init__(self, model_path: str, max_length: int = 52, max_blank: int = 10):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.max_length = max_length
        self.max_blank = max_blank
        self.cls_id = self._piece_id("[CLS]")
        self.eos_id = self._piece_id("<|endoftext|>")
        if self.cls_id is None or self.eos_id is None:
            raise ValueError(f"{model_path} lacks [CLS] or <|endoftext|>: not a GLM-compatible tokenizer model")
        self.pad_id = self.eos_id
        self._special = {p: self._piece_id(p) for p in self.SPECIAL if self._piece_id(p) is not None}
        self._split = re.compile("(" + "|".join(re.escape(p) for p in sorted(self._special, key=len, reverse=True))
                                 + ")")

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece and i != self.sp.unk_id() else None

    def _pieces(self, chunk: str) -> list[int]:
        for n in range(self.max_blank, 1, -1):
            chunk = chunk.replace(" " * n, f"<|blank_{n}|>")
        return self.sp.encode(chunk)

    def encode(self, text: str) -> list[int]:
        """[CLS] + body + <|endoftext|>, unpadded, at most max_length ids (body truncated from the left)."""
        chunks = self._split.split(text)
        for i, chunk in enumerate(chunks):
            if chunk in self._special:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
        body: list[int] = []
        for chunk in chunks:
            if chunk:
                body.extend([self._special[chunk]] if chunk in self._special else self._pieces(chunk))
        keep = self.max_length - 2
        body = body[len(body) - keep:] if len(body) > keep else body
        return [self.cls_id, *body, self.eos_id]

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
