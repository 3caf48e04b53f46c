"""Masks of the masked-modelling objectives, drawn per sample from the sample's seed (like its augmentation), so a
resumed run (even after kill -9) masks every sample exactly as the uninterrupted run did.

CMLM (text): whole-word masking of `text_mask_prob` of the caption's tokens, as BERT's whole-word masking and
HuggingFace's DataCollatorForWholeWordMask (which VLMo, the release's training code base, uses with mlm_prob 0.15):
a budget of max(1, round(prob x body tokens)) tokens ([CLS], <|endoftext|>, padding and special pieces excluded);
whole words in random order are taken while they fit the budget (if none fits, the first word in that order); each
chosen token becomes [MASK] with probability 0.8, a random ordinary piece with 0.1, and stays with 0.1; every chosen
position is predicted.

What a word is, for a SentencePiece vocabulary (GLM's, or the demo's from data/tokenizer_training.py; HF's collator
only knows WordPiece's "##" marks and so masks SentencePiece tokens one by one):
- a piece starting with "▁" (SentencePiece's word-boundary mark) starts a word, and pieces without it continue the
  word while both are letters or digits: "▁un" "believ" "ably" is one word, so is "▁20" "23";
- Chinese has no spaces: every piece holding a CJK character is a word of its own. GLM's vocabulary learned
  frequent Chinese words as pieces ("红色的", "沙发上"), so its pieces are close to words; the demo's tokenizer
  splits Chinese into characters, so there a word is a character (as in Chinese BERT without a segmenter);
- punctuation and symbol pieces are words of their own; special pieces ([CLS], <|endoftext|>, <|blank_n|>, ...)
  are never masked and end words.

CMIM (image): exactly round(ratio x patches) patches, uniformly without replacement (MAE's random masking, which MAE
found best for pixel targets); the release masks 80 of 196 patches (--image-mask-ratio 80/196 by default).

Text and patches draw from their own generators, seeded by (sample key, stream), independent of the augmentation's
and of each other: turning one objective on or off changes neither the crops nor the other's masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_m2.errors import ConfigError

# batch keys of the masked streams (absent when the objective is off)
MASKED_TEXT_IDS = "masked_text_ids"  # int64 [b, L]: the caption with its chosen tokens replaced
TEXT_TARGETS = "text_mlm_mask"  # bool [b, L]: the positions CMLM predicts
IMAGE_PATCH_MASK = "image_patch_mask"  # bool [b, patches]: the patches CMIM masks and predicts
MASK_KEYS = (MASKED_TEXT_IDS, TEXT_TARGETS, IMAGE_PATCH_MASK)

# SeedSequence spawn keys of the two mask streams (the augmentation uses the bare sample key)
_TEXT_STREAM, _PATCH_STREAM = 1, 2
_CJK_RANGES = (("\u4e00", "\u9fff"), ("\u3400", "\u4dbf"), ("\uf900", "\ufaff"), ("\u3000", "\u303f"),
               ("\uff00", "\uffef"))  # ideographs, extension A, compatibility; CJK and full-width punctuation


def num_masked_patches(num_patches: int, ratio: float) -> int:
    return int(round(ratio * num_patches))


def check_masking(text_mask_prob: float, image_mask_ratio: float, num_patches: int) -> None:
    """ConfigError for mask rates that leave nothing to predict or nothing to see."""
    if not 0.0 < text_mask_prob < 1.0:
        raise ConfigError(f"--text-mask-prob {text_mask_prob}: must be between 0 and 1 (BERT's is 0.15)")
    masked = num_masked_patches(num_patches, image_mask_ratio)
    if not 0 < masked < num_patches:
        raise ConfigError(f"--image-mask-ratio {image_mask_ratio} masks {masked} of the model's {num_patches} "
                          "patches: it must mask at least one and leave at least one (the release's is 80/196)")


def _is_cjk(text: str) -> bool:
    return any(start <= char <= end for char in text for start, end in _CJK_RANGES)


class TextMasker:
    """Whole-word masking over a tokenizer's vocabulary (see the module docstring); picklable for data workers."""

    def __init__(self, tokenizer, prob: float) -> None:
        from megatron_m2.data.tokenizer_training import GLM_SPECIAL_PIECES

        if tokenizer.mask_id is None:
            raise ConfigError(f"--cmlm-weight needs a [MASK] piece in --tokenizer-model {tokenizer.model_path!r} "
                              "(GLM's is id 50003; tools/train_tokenizer.py adds one)")
        self.prob, self.mask_id = prob, tokenizer.mask_id
        sp, size = tokenizer.sp, tokenizer.vocab_size
        special_names = set(GLM_SPECIAL_PIECES)
        self.special = np.zeros(size, dtype=bool)  # never masked; ends the word before it
        self.alone = np.zeros(size, dtype=bool)  # a word of its own (CJK, punctuation)
        self.opens = np.zeros(size, dtype=bool)  # starts a word ("▁")
        for i in range(size):
            piece = sp.id_to_piece(i)
            text = piece.replace("\u2581", "")
            if piece in special_names or sp.is_control(i) or sp.is_unknown(i) or not text:
                self.special[i] = True
                continue
            self.opens[i] = piece.startswith("\u2581")
            self.alone[i] = _is_cjk(text) or not text.isalnum()
        self.special[[tokenizer.cls_id, tokenizer.eot_id, tokenizer.pad_id, self.mask_id]] = True
        self.replacements = np.flatnonzero(~self.special)  # the 10% random tokens: ordinary pieces

    def words(self, ids: np.ndarray) -> list[list[int]]:
        """The caption's words as lists of positions (special pieces excluded)."""
        words: list[list[int]] = []
        previous_continues = False  # may the previous piece be continued?
        for position, token in enumerate(ids.tolist()):
            if self.special[token]:
                previous_continues = False
                continue
            if self.opens[token] or self.alone[token] or not previous_continues:
                words.append([position])
            else:
                words[-1].append(position)
            previous_continues = not self.alone[token]
        return words

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, targets) of one caption's ids [L] (padding included: special pieces are never chosen)."""
        words = self.words(ids)
        targets = np.zeros(len(ids), dtype=bool)
        masked = ids.copy()
        if not words:
            return masked, targets
        budget = max(1, int(round(self.prob * sum(len(w) for w in words))))
        chosen: list[int] = []
        order = rng.permutation(len(words))
        for index in order:
            if len(chosen) >= budget:
                break
            if len(chosen) + len(words[index]) <= budget:
                chosen.extend(words[index])
        if not chosen:
            chosen = list(words[order[0]])
        targets[chosen] = True
        draws = rng.random(len(chosen))
        random_ids = self.replacements[rng.integers(len(self.replacements), size=len(chosen))]
        for position, draw, random_id in zip(chosen, draws, random_ids):
            if draw < 0.8:
                masked[position] = self.mask_id
            elif draw < 0.9:
                masked[position] = random_id
        return masked, targets


@dataclass(frozen=True)
class PatchMasker:
    num_patches: int
    num_masked: int

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.permutation(self.num_patches)[:self.num_masked]] = True
        return mask


def _generator(key: Sequence[int], stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key), spawn_key=(stream,)))


class Masker:
    """The masks of a chunk of samples: `masker(text_ids [n, L], keys)` -> the batch entries of the enabled objectives
    (MASKED_TEXT_IDS and TEXT_TARGETS for CMLM, IMAGE_PATCH_MASK for CMIM); keys are the samples' rng keys."""

    def __init__(self, text: Optional[TextMasker] = None, patches: Optional[PatchMasker] = None) -> None:
        self.text, self.patches = text, patches

    @property
    def keys(self) -> tuple[str, ...]:
        return (MASKED_TEXT_IDS, TEXT_TARGETS) * (self.text is not None) + (IMAGE_PATCH_MASK,) * (
            self.patches is not None)

    def __call__(self, text_ids: torch.Tensor, keys: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.text is not None:
            pairs = [self.text(ids, _generator(key, _TEXT_STREAM)) for ids, key in zip(text_ids.numpy(), keys)]
            out[MASKED_TEXT_IDS] = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.int64))
            out[TEXT_TARGETS] = torch.from_numpy(np.stack([p[1] for p in pairs]))
        if self.patches is not None:
            out[IMAGE_PATCH_MASK] = torch.from_numpy(np.stack([self.patches(_generator(key, _PATCH_STREAM))
                                                               for key in keys]))
        return out


def build_masker(tokenizer, num_patches: int, text_mask_prob: Optional[float] = None,
                 image_mask_ratio: Optional[float] = None) -> Optional[Masker]:
    """The masker of the enabled objectives (text_mask_prob for CMLM, image_mask_ratio for CMIM; None = off), or
    None when both are off."""
    if text_mask_prob is None and image_mask_ratio is None:
        return None
    text = TextMasker(tokenizer, text_mask_prob) if text_mask_prob is not None else None
    patches = (PatchMasker(num_patches, num_masked_patches(num_patches, image_mask_ratio))
               if image_mask_ratio is not None else None)
    return Masker(text, patches)
