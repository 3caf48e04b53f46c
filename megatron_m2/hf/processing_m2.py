"""M2-Encoder's processor (tokenizer + image processor) as a transformers processor (AutoProcessor, trust_remote_code).

Self-contained (transformers, sentencepiece, numpy, Pillow, torch): copied into converted folders as remote code, so
it must never import megatron_m2. Used as CLIP's:

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length", truncation=True)
    outputs = AutoModel.from_pretrained(folder, trust_remote_code=True)(**inputs)

Keyword arguments named like an image-processor option (CLIPImageProcessor's keys) go to the image processor, the
rest (padding, truncation, max_length, ...) to the tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_m2 import _OPTIONS as IMAGE_OPTIONS
from .image_processing_m2 import M2ImageProcessor
from .tokenization_m2 import M2Tokenizer

PROCESSOR_CONFIG = "processor_config.json"
AUTO_MAP = {"AutoProcessor": "processing_m2.M2Processor"}
REMOTE_CODE = ("processing_m2.py", "tokenization_m2.py", "image_processing_m2.py")
# from_pretrained arguments that say where the files are; the components get only these
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class M2Processor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]  # transformers 4.x reads this; 5.x reads __init__'s parameters

    def __init__(self, image_processor: Optional[M2ImageProcessor] = None, tokenizer: Optional[M2Tokenizer] = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> "M2Processor":
        # the components are this folder's own classes: load them directly rather than through the Auto classes,
        # whose lookup rules differ between transformers versions
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        return cls(image_processor=M2ImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub),
                   tokenizer=M2Tokenizer.from_pretrained(pretrained_model_name_or_path, **hub))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> list[str]:
        """preprocessor_config.json, tokenizer files, processor_config.json (with auto_map) and this remote code."""
        os.makedirs(save_directory, exist_ok=True)
        files = list(self.image_processor.save_pretrained(save_directory))
        files += list(self.tokenizer.save_pretrained(save_directory))
        path = os.path.join(save_directory, PROCESSOR_CONFIG)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"processor_class": type(self).__name__, "auto_map": AUTO_MAP}, f, indent=2)
            f.write("\n")
        here = os.path.dirname(os.path.abspath(__file__))
        for name in REMOTE_CODE:
            source, target = os.path.join(here, name), os.path.join(save_directory, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        return files + [path]

    def __call__(self, text: Any = None, images: Any = None, return_tensors: Optional[str] = None,
                 **kwargs: Any) -> BatchFeature:
        """input_ids + attention_mask (text) and/or pixel_values (images); `model(**inputs)` takes them as they are."""
        if text is None and images is None:
            raise ValueError("M2Processor needs text and/or images")
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in IMAGE_OPTIONS}
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **image_kwargs))
        return BatchFeature(data=data)  # the components already converted to return_tensors

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
