#!/usr/bin/env python
"""Train a small bilingual (Chinese + English) SentencePiece tokenizer in the GLM layout.

The result works with --tokenizer-model like the GLM model M2-Encoder uses: the same special pieces
([CLS], <|endoftext|>, <|blank_2|>..<|blank_10|>, ...), looked up by name. Its piece count must not exceed the
model's vocab_size (the tiny preset has 1024), which is checked here and again when training starts.

    python tools/train_tokenizer.py --input captions.txt data.jsonl --output runs/tok/tokenizer --vocab-size 1000
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_m2.errors import ConfigError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="caption sources: .txt (one caption per line), .jsonl (objects with the --caption-key "
                        "field) or .csv (a --caption-key column); several files are concatenated")
    p.add_argument("--output", required=True,
                   help="model prefix: writes OUTPUT.model (pass it as --tokenizer-model) and OUTPUT.vocab")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="the most pieces the model may have, special pieces included (a small corpus may give "
                        "fewer); must be <= the model config's vocab_size")
    p.add_argument("--model-vocab-size", type=int, default=1024,
                   help="vocab_size of the model that will use the tokenizer (tiny preset: 1024); checked")
    p.add_argument("--caption-key", default="caption", help="JSONL field / CSV column holding the caption")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                   help="SentencePiece algorithm (the GLM model is BPE)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; rarer ones map to <unk> (0.9995 suits Chinese)")
    p.add_argument("--split-cjk-characters", action=argparse.BooleanOptionalAction, default=True,
                   help="make every Chinese character a piece of its own, as Chinese BERT/Chinese-CLIP vocabularies "
                        "do (without it, BPE on a small corpus fuses whole Chinese phrases into single pieces)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_m2.data.tokenizer import GLMTokenizer, check_vocab
    from megatron_m2.data.tokenizer_training import train_tokenizer

    args = parse_args(argv)
    try:
        if args.vocab_size > args.model_vocab_size:
            raise ConfigError(f"--vocab-size {args.vocab_size} exceeds --model-vocab-size {args.model_vocab_size}")
        path = train_tokenizer(args.input, args.output, args.vocab_size, args.caption_key,
                               args.character_coverage, args.model_type,
                               split_cjk_characters=args.split_cjk_characters)
        tokenizer = GLMTokenizer(path)
        check_vocab(tokenizer, args.model_vocab_size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {tokenizer.vocab_size} pieces, [CLS] = {tokenizer.cls_id}, "
          f"<|endoftext|> = {tokenizer.eot_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
