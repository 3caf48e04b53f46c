"""Training micro-batches from tar shards: decode, augment, tokenize, stack; single process, exactly resumable.

Every rank of a model replica (its TP and PP peers) builds the same iterator with the same DP rank, so they read
identical batches without any communication. No DataLoader worker processes: the position of one in-process
stream is the whole state, and augmentation is seeded per sample from (seed, epoch, shard, index); optional
threads (num_workers) only decode and augment, so they change the speed, never the batches.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megatron_m2.data.shards import RawSample, ShardStream, resolve_shards
from megatron_m2.data.tokenizer import GLMTokenizer
from megatron_m2.data.transforms import to_rgb, train_transform
from megatron_m2.errors import ConfigError


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so a truncated file fails here and not inside the transform
    return image


class ImageTextBatches:
    """Iterator of dict(images [b,3,H,W] float32, text_ids [b,L] int64, text_padding_mask [b,L] bool)."""

    def __init__(self, shards: Union[str, Sequence[str]], tokenizer: GLMTokenizer, transform: Callable,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_window: int = 512, num_workers: int = 0) -> None:
        self.stream = ShardStream(resolve_shards(shards), dp_rank, dp_size, seed, shuffle_window)
        self.tokenizer, self.transform = tokenizer, transform
        self.micro_batch_size, self.seed = micro_batch_size, seed
        # Threads decode and augment the samples of a batch in parallel (Pillow and numpy release the GIL).
        # The stream is still read in one thread and each sample's augmentation is seeded by its identity,
        # so batches are identical for any num_workers.
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="m2-data") if num_workers > 0 else None
        self._last_good_epoch = self.stream.epoch

    @property
    def stats(self) -> dict[str, int]:
        """Usable samples ("samples") and skipped ones by reason, on this rank since the start of the run."""
        return dict(self.stream.stats)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._last_good_epoch = self.stream.epoch

    def _image(self, sample: RawSample) -> Optional[torch.Tensor]:
        """The augmented image, or None if the file does not decode."""
        try:
            image = to_rgb(decode_image(sample.image))
        except Exception:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            return None
        if getattr(self.transform, "takes_rng", False):
            rng = np.random.default_rng([self.seed, sample.epoch, sample.shard, sample.index])
            return self.transform(image, rng=rng)
        return self.transform(image)

    def __iter__(self) -> "ImageTextBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        images, captions = [], []
        while len(images) < self.micro_batch_size:
            samples = [next(self.stream) for _ in range(self.micro_batch_size - len(images))]
            decoded = self._pool.map(self._image, samples) if self._pool else map(self._image, samples)
            for sample, image in zip(samples, decoded):
                if image is None:
                    self.stream.reject("corrupt_image", sample)
                    if sample.epoch >= self._last_good_epoch + 2:  # a whole epoch without one decodable image
                        raise ConfigError(f"--data-path: data-parallel rank {self.stream.dp_rank} decoded no "
                                          f"image in a whole epoch; skipped: {self.stats}")
                    continue
                self._last_good_epoch = sample.epoch
                images.append(image)
                captions.append(sample.caption)
                self.stream.stats["samples"] += 1
        text_ids, text_padding_mask = self.tokenizer(captions)
        # One numpy copy (see transforms.to_tensor for why not torch.stack).
        images = torch.from_numpy(np.stack([image.numpy() for image in images]))
        return dict(images=images, text_ids=text_ids, text_padding_mask=text_padding_mask)


def build_train_data(shards: Union[str, Sequence[str]], tokenizer: GLMTokenizer, config, micro_batch_size: int,
                     dp_rank: int, dp_size: int, seed: int, num_workers: int = 0,
                     hflip: bool = True) -> ImageTextBatches:
    """The training iterator for a model config (its image_size), with the train augmentation."""
    return ImageTextBatches(shards, tokenizer, train_transform(config.image_size, hflip=hflip), micro_batch_size,
                            dp_rank, dp_size, seed, num_workers=num_workers)
