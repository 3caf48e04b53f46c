"""The evaluation-data flags, shared by the trainer (--eval-interval) and `python -m megatron_m2.eval`."""
from __future__ import annotations

import argparse
import os

from megatron_m2.errors import ConfigError
from megatron_m2.eval.datasets import CAPTION_NORMALIZATIONS
from megatron_m2.eval.protocol import EVAL_PROTOCOLS


def add_eval_data_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--zeroshot-data", default=None,
                       help="folder-per-class image tree (ImageNet layout) for zero-shot classification")
    group.add_argument("--zeroshot-classnames", nargs="+", default=[], metavar="LANG=FILE",
                       help="class-name files, one name per line in class-folder order, e.g. en=names_en.txt "
                            "zh=names_zh.txt")
    group.add_argument("--zeroshot-templates", nargs="+", default=[], metavar="LANG=FILE",
                       help="prompt templates per language, one a line with {} for the class name, e.g. "
                            "en=templates_en.txt; a language without a file uses the full ImageNet set: CLIP's 80 "
                            "English templates, Chinese-CLIP's 80 Chinese ones (megatron_m2/eval/prompts/)")
    group.add_argument("--retrieval-data", default=None,
                       help='retrieval JSONL: one {"image": path, "captions": [...]} per line, or the release\'s '
                            'files as shipped ("caption": a string or a list)')
    group.add_argument("--retrieval-image-root", default=None, metavar="DIR",
                       help="relative image paths of --retrieval-data start here (default: the JSONL's folder); "
                            "e.g. the folder holding flickr30k_images/ for the release's f30k-cn_test.jsonl")
    group.add_argument("--eval-protocol", default="auto", choices=EVAL_PROTOCOLS,
                       help="release: M2-Encoder's released evaluation (captions and prompts lower-cased, curly "
                            "double quotes made straight; a caption text shared by several images matches each of "
                            "them); strict: captions and prompts as written, a caption matches only its own image; "
                            "auto: release for models carrying the release's preprocessing (imported weights), "
                            "strict otherwise")
    group.add_argument("--caption-normalization", default=None, choices=CAPTION_NORMALIZATIONS,
                       help="override the protocol's normalisation of captions and prompts before tokenising: none "
                            "(strip whitespace) or official (the release's: lower-case, curly double quotes to "
                            "straight); default: the --eval-protocol's")
    group.add_argument("--fine-grained-data", default=None,
                       help='fine-grained retrieval against hard negatives: JSONL of {"kind", "images": [2 paths], '
                            '"captions": {lang: [2 captions]}} pairs whose captions differ only in position or count '
                            "(the demo writes one from held-out digits: data/fine_grained.jsonl); chance 50%%")
    group.add_argument("--eval-batch-size", type=int, default=64, help="images or texts per evaluation forward")


def check_eval_data_arguments(args: argparse.Namespace) -> None:
    """ConfigError for inconsistent evaluation flags (files are read later, by the evaluation itself)."""
    if args.zeroshot_data and not args.zeroshot_classnames:
        raise ConfigError("--zeroshot-data needs --zeroshot-classnames LANG=FILE [LANG=FILE ...]")
    for flag, items in (("--zeroshot-classnames", args.zeroshot_classnames),
                        ("--zeroshot-templates", args.zeroshot_templates)):
        for item in items:
            if "=" not in item:
                raise ConfigError(f"{flag} expects LANG=FILE, got {item!r}")
    if args.zeroshot_templates and not args.zeroshot_data:
        raise ConfigError("--zeroshot-templates applies to --zeroshot-data, which is not given: pass it or drop "
                          "--zeroshot-templates")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    image_root = args.retrieval_image_root
    if args.caption_normalization is not None and not (args.retrieval_data or args.zeroshot_data):
        raise ConfigError("--caption-normalization applies to --retrieval-data and --zeroshot-data, neither is "
                          "given: pass one or drop --caption-normalization")
    if not args.retrieval_data:
        if image_root is not None:
            raise ConfigError("--retrieval-image-root applies to --retrieval-data, which is not given: pass it or "
                              "drop --retrieval-image-root")
        return
    if image_root is not None and not os.path.isdir(image_root):
        raise ConfigError(f"--retrieval-image-root {image_root!r}: no such directory")
