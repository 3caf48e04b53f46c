"""Image transforms with Pillow + numpy (no torchvision): PIL.Image -> FloatTensor [3, H, W], mean = std = 0.5;
the train transform returns uint8 [3, H, W] instead (4x fewer bytes to copy), normalised by `normalize` on the device.

train: random resized crop (scale 0.8-1.0, ratio 3/4-4/3, torchvision's sampling) + horizontal flip, bicubic, then
optionally RandAugment on the crop (data/randaugment.py; the release's RandAugment(2, 7)).
eval: resize the shorter side to image_size (bicubic) + center crop; `square=True` instead squashes the whole image
to image_size x image_size (bicubic), which is what M2-Encoder's release does at inference
(vlmo/transforms/square_transform.py: Resize((size, size), BICUBIC); the model applies mean/std 0.5 itself).
Randomness comes from a numpy Generator; the batch iterator passes one derived from (seed, epoch, sample) per call
so augmentation is reproducible after a resume, whatever was prefetched.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

MEAN = STD = 0.5


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 image -> normalised float32 [3, H, W]."""
    # numpy, not torch ops: torch's intra-op threads make these small copies 10-30x slower on a busy CPU.
    array = (np.asarray(image, dtype=np.float32) * (1 / (255.0 * STD)) - MEAN / STD).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB uint8 image -> uint8 [3, H, W], not normalised (training batches travel as uint8; see normalize)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (0-255) -> float32 (x / 255 - mean) / std, on whatever device they are (the trainer
    copies uint8 to the GPU and normalises there: 4x fewer bytes than float32)."""
    return images.float().mul_(1 / (255.0 * std)).sub_(mean / std)


def to_rgb(image: Image.Image) -> Image.Image:
    # Grayscale, palette, RGBA, CMYK, 16-bit ...: the model always sees 3 channels.
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.8, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop: torchvision's RandomResizedCrop.get_params with a numpy Generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest center crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """Random resized crop + horizontal flip (unless hflip=False: for digits or text, a mirror changes the meaning),
    then `randaugment` if given; `transform(image, rng)` uses rng, else its own generator. Returns uint8 [3, H, W]
    (normalize() on the device)."""

    takes_rng = True

    def __init__(self, image_size: int, rng: Union[np.random.Generator, int, None] = None,
                 scale: tuple[float, float] = (0.8, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: bool = True, randaugment: Optional[Callable] = None) -> None:
        self.image_size = image_size
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.scale, self.ratio, self.hflip, self.randaugment = scale, ratio, hflip, randaugment

    def __call__(self, image: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        rng = self.rng if rng is None else rng
        image = to_rgb(image)
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5 and self.hflip:  # draw either way, so the crops do not depend on hflip
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:  # after the crop and flip, as the release (draws after theirs)
            image = self.randaugment(image, rng)
        return to_uint8_tensor(image)


class EvalTransform:
    """Resize the shorter side to image_size (bicubic), center crop image_size x image_size; or squash (square)."""

    takes_rng = False

    def __init__(self, image_size: int, square: bool = False) -> None:
        self.image_size, self.square = image_size, square

    def __call__(self, image: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        image = to_rgb(image)
        size, (width, height) = self.image_size, image.size
        if self.square:
            return to_tensor(image.resize((size, size), Image.BICUBIC))
        # torchvision's Resize(int): the shorter side becomes `size`, the longer one is truncated, not rounded.
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        return to_tensor(image.crop((left, top, left + size, top + size)))


def train_transform(image_size: int, rng: Union[np.random.Generator, int, None] = None, hflip: bool = True,
                    randaugment: Optional[tuple[int, float]] = None) -> TrainTransform:
    """randaugment: (N, M) for RandAugment(N, M) after the crop (data/randaugment.py), or None."""
    from megatron_m2.data.randaugment import RandAugment

    return TrainTransform(image_size, rng, hflip=hflip,
                          randaugment=RandAugment(*randaugment) if randaugment else None)


def eval_transform(image_size: int, square: bool = False) -> EvalTransform:
    return EvalTransform(image_size, square)
