"""Prompt templates for zero-shot classification ("{}" is the class name).

The defaults are the full published ImageNet sets, shipped as data files in eval/prompts/ (see its README.md for
the sources): CLIP's 80 English templates (Radford et al. 2021) and Chinese-CLIP's 80 ImageNet-CN templates.
`--zeroshot-templates LANG=FILE` replaces them per language (the digits demo passes its own, data/digits.py).
Class names are substituted with str.replace, not str.format, so a class name or template containing braces cannot
break the substitution.
"""
from __future__ import annotations

from pathlib import Path

from megatron_m2.errors import ConfigError

PROMPTS_DIR = Path(__file__).parent / "prompts"
IMAGENET_TEMPLATE_FILES: dict[str, Path] = {lang: PROMPTS_DIR / f"imagenet_{lang}.txt" for lang in ("en", "zh")}


def read_templates(path: str, flag: str) -> list[str]:
    """The templates of a file, one a line, each with a "{}" (ConfigError naming `flag` otherwise)."""
    from megatron_m2.eval.datasets import read_lines_file

    templates = read_lines_file(str(path), flag)
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ConfigError(f"{flag}{path}: every template needs a {{}} for the class name, e.g. {missing[0]!r} has none")
    return templates


IMAGENET_TEMPLATES: dict[str, list[str]] = {lang: read_templates(str(path), f"built-in templates {lang}=")
                                            for lang, path in IMAGENET_TEMPLATE_FILES.items()}


def fill(template: str, class_name: str) -> str:
    """The prompt for one class: "{}" replaced by the class name."""
    return template.replace("{}", class_name)


def default_templates(lang: str) -> list[str]:
    """The ImageNet templates of a language; ConfigError for a language without built-in templates."""
    if lang not in IMAGENET_TEMPLATES:
        raise ConfigError(f"no built-in prompt templates for language {lang!r} (have {sorted(IMAGENET_TEMPLATES)}): "
                          f"pass --zeroshot-templates {lang}=FILE (one template a line, {{}} = the class name)")
    return list(IMAGENET_TEMPLATES[lang])
