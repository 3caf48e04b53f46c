"""Image preprocessing for M2-Encoder as a transformers image processor (AutoImageProcessor, trust_remote_code=True).

Self-contained (transformers, numpy, Pillow, torch): copied into converted folders as remote code, so it must never
import megatron_m2. The config uses CLIPImageProcessor's keys; a model's preprocessing is one of two modes:
  squash (M2-Encoder's release): size {"height": s, "width": s}, do_center_crop false: the whole image to s x s;
  crop: size {"shortest_edge": s}, do_center_crop true, crop_size {"height": s, "width": s}: the shorter side to s,
    the longer side truncated (torchvision's Resize(int)), then a center crop with torchvision's offset rounding.
Then rescale by 1/255 and normalise with image_mean/image_std (0.5 for M2-Encoder).
The arithmetic is that of megatron_m2.data.transforms.EvalTransform, what the evaluator uses; tests/test_hf.py checks
they agree within 1e-6. It is written out here instead of inheriting CLIPImageProcessor because that class rounds the
crop offset differently (floor, not round) and, with torchvision installed, resizes with torch ops instead of PIL.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

# PIL.Image.Resampling values, which is what transformers stores as `resample`
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
AUTO_MAP = {"AutoImageProcessor": "image_processing_m2.M2ImageProcessor"}
_OPTIONS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _to_pil(image: Any) -> Image.Image:
    """PIL images as they are; uint8 or [0, 1] float arrays/tensors, HWC or CHW, as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


class M2ImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, do_resize: bool = True, size: Optional[dict] = None, resample: int = RESAMPLE["bicubic"],
                 do_center_crop: bool = False, crop_size: Optional[dict] = None, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 do_convert_rgb: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = dict(size) if size else {"height": 224, "width": 224}
        self.resample = int(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = dict(crop_size) if crop_size else None
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def for_model(cls, image_size: int, resize_mode: str = "squash", interpolation: str = "bicubic",
                  image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                  image_std: Sequence[float] = (0.5, 0.5, 0.5)) -> "M2ImageProcessor":
        """The processor of a model config's image_size / image_resize_mode / image_interpolation / mean / std."""
        if interpolation not in RESAMPLE:
            raise ValueError(f"image_interpolation {interpolation!r}: use one of {sorted(RESAMPLE)}")
        square = {"height": image_size, "width": image_size}
        if resize_mode == "squash":
            geometry = dict(size=square, do_center_crop=False, crop_size=None)
        elif resize_mode == "crop":
            geometry = dict(size={"shortest_edge": image_size}, do_center_crop=True, crop_size=square)
        else:
            raise ValueError(f"image_resize_mode {resize_mode!r}: use 'squash' or 'crop'")
        return cls(resample=RESAMPLE[interpolation], image_mean=image_mean, image_std=image_std, **geometry)

    def _resize(self, image: Image.Image, size: dict, resample: int) -> Image.Image:
        if "shortest_edge" in size:
            # torchvision's Resize(int): the shorter side becomes `edge`, the longer one is truncated, not rounded
            edge, (width, height) = size["shortest_edge"], image.size
            if width <= height:
                new = (edge, int(edge * height / width))
            else:
                new = (int(edge * width / height), edge)
            return image if new == image.size else image.resize(new, resample)
        return image.resize((size["width"], size["height"]), resample)

    @staticmethod
    def _center_crop(image: Image.Image, crop_size: dict) -> Image.Image:
        # torchvision's CenterCrop offsets: round((W - w) / 2), which differs from floor division for odd margins
        width, height = image.size
        left = int(round((width - crop_size["width"]) / 2.0))
        top = int(round((height - crop_size["height"]) / 2.0))
        return image.crop((left, top, left + crop_size["width"], top + crop_size["height"]))

    def preprocess_one(self, image: Any, **options: Any) -> np.ndarray:
        """One image -> float32 [C, H, W]; options override this processor's settings (CLIPImageProcessor's keys)."""
        o = {name: options.get(name, getattr(self, name)) for name in _OPTIONS}
        image = _to_pil(image)
        if o["do_convert_rgb"] and image.mode != "RGB":
            image = image.convert("RGB")
        if o["do_resize"]:
            image = self._resize(image, o["size"], int(o["resample"]))
        if o["do_center_crop"] and o["crop_size"]:
            image = self._center_crop(image, o["crop_size"])
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[..., None]
        if o["do_rescale"]:
            array = array * np.float32(o["rescale_factor"])
        if o["do_normalize"]:
            mean = np.asarray(o["image_mean"], dtype=np.float32)
            std = np.asarray(o["image_std"], dtype=np.float32)
            array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def preprocess(self, images: Any, return_tensors: Optional[str] = None, **options: Any) -> BatchFeature:
        """pixel_values: a list of [C, H, W] arrays, or one [B, C, H, W] tensor with return_tensors ("pt", "np")."""
        unknown = sorted(set(options) - set(_OPTIONS) - {"data_format", "input_data_format"})
        if unknown:
            raise ValueError(f"M2ImageProcessor got unknown arguments {unknown}; it accepts {list(_OPTIONS)}")
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
            images = [image for group in images for image in group]  # transformers' nested batch layout
        elif not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values = [self.preprocess_one(image, **options) for image in images]
        if return_tensors is not None:
            pixel_values = np.stack(pixel_values)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images: Any, return_tensors: Optional[str] = None, **options: Any) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **options)

    def to_dict(self) -> dict[str, Any]:
        # always name the remote code, so a folder saved from this object loads with AutoImageProcessor again
        out = super().to_dict()
        out["auto_map"] = {**AUTO_MAP, **(out.get("auto_map") or {})}
        return out
