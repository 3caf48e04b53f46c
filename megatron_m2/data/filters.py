"""The M2-Encoder paper's data cleaning as a per-sample filter: drop pairs whose caption has fewer than N characters or
whose image is more than R times wider than tall (or taller than wide). The paper uses 5 and 3; both are off by default.

The filter looks at the caption and the image's header only (Pillow reads the size without decoding the pixels), so it
runs where the shards are read, before any decode, and a filtered sample costs the reader a few microseconds. It is a
function of the sample alone, so batches stay the same for any worker count and a resume continues exactly.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

from megatron_m2.errors import ConfigError

# Skip reasons, counted like the corrupt-sample reasons of data/shards.py.
FILTER_REASONS = ("short_caption", "aspect_ratio")


def image_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from the encoded image's header, or None when Pillow cannot read it (the decoder then counts
    the sample as a corrupt image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # Pillow raises many types for a bad header
        return None


@dataclass(frozen=True)
class SampleFilter:
    """min_caption_chars: keep captions with at least this many characters (after stripping; 0 = off).
    max_aspect_ratio: keep images whose longer side is at most this times the shorter one (0 = off)."""

    min_caption_chars: int = 0
    max_aspect_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.min_caption_chars < 0:
            raise ConfigError(f"--min-caption-chars must be >= 0 (0 = off), got {self.min_caption_chars}")
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ConfigError(f"--max-aspect-ratio must be >= 1 (longer side / shorter side; 0 = off), got "
                              f"{self.max_aspect_ratio}")

    @property
    def active(self) -> bool:
        return bool(self.min_caption_chars or self.max_aspect_ratio)

    def reject_caption(self, caption: str) -> Optional[str]:
        if self.min_caption_chars and len(caption.strip()) < self.min_caption_chars:
            return "short_caption"
        return None

    def reject_size(self, width: int, height: int) -> Optional[str]:
        if self.max_aspect_ratio and min(width, height) > 0 and \
                max(width, height) > self.max_aspect_ratio * min(width, height):
            return "aspect_ratio"
        return None

    def reject(self, caption: str, image: bytes) -> Optional[str]:
        """The reason to drop this pair, or None to keep it."""
        reason = self.reject_caption(caption)
        if reason is None and self.max_aspect_ratio:
            size = image_size(image)
            if size is not None:
                reason = self.reject_size(*size)
        return reason


def sample_filter_from_args(args) -> Optional[SampleFilter]:
    """The filter the flags ask for (--min-caption-chars, --max-aspect-ratio), or None when both are off."""
    sample_filter = SampleFilter(args.min_caption_chars, args.max_aspect_ratio)
    return sample_filter if sample_filter.active else None
