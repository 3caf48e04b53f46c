"""RandAugment as M2-Encoder's release trains with it, in Pillow (no torchvision, no OpenCV).

The release's training transform (VLMo's `square_transform_randaug`) is RandomResizedCrop + horizontal flip, then
ALBEF's `RandomAugment(2, 7, isPIL=True, augs=[Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX,
ShearY, TranslateX, TranslateY, Rotate])` on the crop. Its semantics, kept here:
- N operations drawn uniformly WITH replacement from the list; each is applied with probability 0.5;
- the magnitude M is on ALBEF's 0-10 scale (MAX_LEVEL = 10): at level M, Brightness and Sharpness enhance by
  M/10 * 1.8 + 0.1 (1.36 at M = 7), shears are M/10 * 0.3, translations M/10 * 10 pixels, rotations M/10 * 30
  degrees, each of the geometric ones with a random sign; uncovered pixels are grey (128, 128, 128).
ALBEF computes with OpenCV ("same output as PIL" by its own comments); here Pillow does the same operations
(its affine transform takes the inverse map, which only flips signs that are random anyway).

Every draw comes from the numpy Generator the caller passes (the loader's per-sample generator), so augmentation is
a function of (seed, sample) and batches do not depend on the worker count or a resume.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from megatron_m2.errors import ConfigError

MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_PIXELS = 10  # ALBEF's translate_const: pixels at the maximum level
APPLY_PROBABILITY = 0.5


def _enhance(kind) -> Callable:
    def op(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        return kind(image).enhance(level / MAX_LEVEL * 1.8 + 0.1)
    return op


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def _affine(coefficients: Callable[[float], tuple]) -> Callable:
    def op(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        return image.transform(image.size, Image.AFFINE, coefficients(_signed(level, rng)),
                               resample=Image.BILINEAR, fillcolor=FILL)
    return op


OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "Identity": lambda image, level, rng: image,
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _affine(lambda level: (1, level / MAX_LEVEL * 0.3, 0, 0, 1, 0)),
    "ShearY": _affine(lambda level: (1, 0, 0, level / MAX_LEVEL * 0.3, 1, 0)),
    "TranslateX": _affine(lambda level: (1, 0, level / MAX_LEVEL * TRANSLATE_PIXELS, 0, 1, 0)),
    "TranslateY": _affine(lambda level: (1, 0, 0, 0, 1, level / MAX_LEVEL * TRANSLATE_PIXELS)),
    "Rotate": lambda image, level, rng: image.rotate(_signed(level / MAX_LEVEL * 30, rng), resample=Image.BILINEAR,
                                                     fillcolor=FILL),
}
RELEASE_OPS = tuple(OPS)  # the release's list, in its order


class RandAugment:
    """`RandAugment(num_ops, magnitude)(image, rng)` -> the augmented RGB image (see the module docstring)."""

    def __init__(self, num_ops: int = 2, magnitude: float = 7, ops: Sequence[str] = RELEASE_OPS) -> None:
        if num_ops < 1:
            raise ConfigError(f"--randaugment N M: N (operations per image) must be >= 1, got {num_ops}")
        if not 0 <= magnitude <= MAX_LEVEL:
            raise ConfigError(f"--randaugment N M: M (magnitude) must be in [0, {MAX_LEVEL}] (ALBEF's scale, as the "
                              f"release), got {magnitude}")
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            raise ConfigError(f"RandAugment operations {unknown} are unknown; known: {list(OPS)}")
        self.num_ops, self.magnitude, self.ops = num_ops, magnitude, tuple(ops)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for index in rng.integers(len(self.ops), size=self.num_ops):
            if rng.random() > APPLY_PROBABILITY:
                continue
            image = OPS[self.ops[int(index)]](image, self.magnitude, rng)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude})"
