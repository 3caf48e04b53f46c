"""Prompt templates for zero-shot classification ("{}" is the class name). The digits demo's prompts and captions
live with its data (megatron_m2/data/digits.py).

English: a short subset of CLIP's 80 ImageNet templates (Radford et al. 2021, notebooks/Prompt_Engineering);
Chinese: in the style of Chinese-CLIP's ImageNet-CN templates. Class names are substituted with str.replace, not
str.format, so a class name or template containing braces cannot break the substitution.
"""
from __future__ import annotations

from megatron_m2.errors import ConfigError

IMAGENET_TEMPLATES: dict[str, list[str]] = {
    "en": [
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "a cropped photo of a {}.",
        "a bright photo of a {}.",
        "a close-up photo of a {}.",
        "a rendition of a {}.",
        "itap of a {}.",
        "a good photo of a {}.",
        "a drawing of a {}.",
        "art of the {}.",
    ],
    "zh": [
        "{}的照片。",
        "一张{}的照片。",
        "一张{}的图片。",
        "一张模糊的{}的照片。",
        "一张清晰的{}的照片。",
        "一张{}的特写照片。",
        "一张裁剪过的{}的照片。",
        "一张小{}的照片。",
        "一张大{}的照片。",
        "一幅{}的画。",
        "{}的艺术作品。",
        "一张好看的{}的照片。",
    ],
}


def fill(template: str, class_name: str) -> str:
    """The prompt for one class: "{}" replaced by the class name."""
    return template.replace("{}", class_name)


def default_templates(lang: str) -> list[str]:
    """The ImageNet-style templates of a language; ConfigError for a language without built-in templates."""
    if lang not in IMAGENET_TEMPLATES:
        raise ConfigError(f"no built-in prompt templates for language {lang!r} (have {sorted(IMAGENET_TEMPLATES)}): "
                          "use en/zh in --zeroshot-classnames LANG=FILE or pass templates for it")
    return list(IMAGENET_TEMPLATES[lang])
