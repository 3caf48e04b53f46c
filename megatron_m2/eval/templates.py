"""Prompt templates for zero-shot classification ("{}" is the class name) and the digits demo's captions.

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

# The digits demo: class names are "zero".."nine" / "零".."九" (megatron_m2/data/digits.py).
DIGIT_CLASS_NAMES: dict[str, list[str]] = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "zh": list("零一二三四五六七八九"),
}

# Zero-shot prompts for the digits (only the class name varies).
DIGIT_TEMPLATES: dict[str, list[str]] = {
    "en": ["a photo of the digit {}.", "a handwritten {}.", "the number {}, written by hand."],
    "zh": ["数字{}的照片。", "手写的{}。", "手写数字{}的图片。"],
}

# Training captions for the digits: {name} is the word ("seven" / "七"), {digit} the numeral ("7"). No "一张" /
# "一个" (a, one): 一 is also the class name of 1.
DIGIT_CAPTION_TEMPLATES: dict[str, list[str]] = {
    "en": [
        "a photo of the digit {name}.",
        "a handwritten {digit}.",
        "the number {name}, written by hand.",
        "a scan of a handwritten {name}.",
        "a blurry picture of the number {digit}.",
        "a small black and white image of a {name}.",
    ],
    "zh": [
        "数字{name}的照片。",
        "手写的数字{digit}。",
        "手写数字{name}的图片。",
        "手写的{name}。",
        "数字{digit}的扫描图。",
        "模糊的数字{name}。",
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
