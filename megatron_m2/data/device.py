"""Batches onto the model's device: one place for training and evaluation."""
from __future__ import annotations

from typing import Optional

import torch

from megatron_m2.data.transforms import normalize


def model_images(images: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """What the model's vision embedding takes: uint8 images normalised (on their device) and cast to `dtype`,
    float images cast; None and 'meta' tensors (the image shape that later pipeline stages get instead of pixels)
    stay as they are."""
    if images is None or images.device.type == "meta":
        return images
    return (normalize(images) if images.dtype == torch.uint8 else images).to(dtype)


def to_device(batch: dict, device: torch.device, dtype: Optional[torch.dtype] = torch.float32) -> dict:
    """The batch on `device`: non-blocking copies (asynchronous from pinned host memory, which the loader uses on a
    GPU machine); uint8 images travel as uint8 (4x fewer bytes over PCIe than float32). With a `dtype` the images
    are made model inputs there (`model_images`); with dtype=None they stay uint8: the trainer holds a step's M
    micro-batches on the device like this (1 byte per pixel, what the planner counts) and normalises each one in
    its forward step. 'meta' tensors and non-tensors stay as they are."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.to(device, non_blocking=True)
            if key == "images" and dtype is not None:
                value = model_images(value, dtype)
        moved[key] = value
    return moved
