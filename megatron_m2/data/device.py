"""Batches onto the model's device: one function for training and evaluation."""
from __future__ import annotations

import torch

from megatron_m2.data.transforms import normalize


def to_device(batch: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """The batch on `device`: non-blocking copies (asynchronous from pinned host memory, which the loader uses on a
    GPU machine), uint8 images normalised there (4x fewer bytes over PCIe than float32) and images cast to the model's
    `dtype`. Tensors on the 'meta' device (the image shape that later pipeline stages get instead of pixels) and
    non-tensors stay as they are."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.to(device, non_blocking=True)
            if key == "images":
                value = (normalize(value) if value.dtype == torch.uint8 else value).to(dtype)
        moved[key] = value
    return moved
