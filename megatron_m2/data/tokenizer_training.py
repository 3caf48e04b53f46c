"""Train a small bilingual SentencePiece model in the GLM layout (for the tiny preset; tools/train_tokenizer.py).

The special pieces are user-defined symbols in GLM's order (<|endoftext|>, [SEP], [CLS], [MASK], ..., <|blank_10|>
.. <|blank_2|>, <pad>), so GLMTokenizer finds them by name exactly as in the GLM model; their ids differ (the
tiny model has no 50,000 ordinary pieces before them), which is why nothing hard-codes ids. Normalisation follows
the GLM model: BPE, nmt_nfkc, dummy prefix, runs of spaces kept (they become <|blank_n|> before SentencePiece).
"""
from __future__ import annotations

import csv
import json
import os
import unicodedata
from typing import Iterator, Sequence

from megatron_m2.errors import ConfigError

GLM_SPECIAL_PIECES = ("<n>", "<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNK]", "<|endofpiece|>",
                      "<|startofpiece|>", "[gMASK]", "[sMASK]", "[dBLOCK]",
                      *(f"<|blank_{n}|>" for n in range(10, 1, -1)), "<pad>")


# CJK Unified Ideographs, Extension A, and the compatibility block (NFKC maps most of it into the first)
CJK_RANGES = (("\u4e00", "\u9fff"), ("\u3400", "\u4dbf"), ("\uf900", "\ufaff"))


def iter_captions(paths: Sequence[str], caption_key: str = "caption") -> Iterator[str]:
    """Captions from text files (one per line), JSONL ({caption_key: ...}) or CSV (a caption_key column)."""
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--input {path!r}: no such file")
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            if path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        caption = json.loads(line).get(caption_key)
                        if isinstance(caption, str) and caption.strip():
                            yield caption.strip()
            elif path.endswith(".csv"):
                reader = csv.DictReader(f)
                if caption_key not in (reader.fieldnames or []):
                    raise ConfigError(f"--input {path!r} has no {caption_key!r} column (--caption-key)")
                for row in reader:
                    if (row.get(caption_key) or "").strip():
                        yield row[caption_key].strip()
            else:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")


def cjk_characters(texts: Sequence[str]) -> list[str]:
    """The distinct CJK ideographs of `texts` after NFKC (the normalisation the model applies), in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for char in unicodedata.normalize("NFKC", text):
            if any(start <= char <= end for start, end in CJK_RANGES):
                seen.setdefault(char, None)
    return list(seen)


def train_tokenizer(inputs: Sequence[str], model_prefix: str, vocab_size: int = 1000,
                    caption_key: str = "caption", character_coverage: float = 0.9995,
                    model_type: str = "bpe", seed_sentencepiece_size: int = 100000,
                    split_cjk_characters: bool = True) -> str:
    """Train on the captions of `inputs`; writes MODEL_PREFIX.model (+ .vocab) and returns the .model path.

    split_cjk_characters: every Chinese character becomes a piece of its own (user-defined symbols are never merged),
    as in Chinese BERT / Chinese-CLIP vocabularies. Chinese has no spaces, so BPE on a small caption corpus otherwise
    fuses whole phrases into one piece ("数字七的照片"), and a prompt worded unlike the captions shares no token
    with them.
    """
    import sentencepiece as spm

    if vocab_size <= len(GLM_SPECIAL_PIECES) + 3:
        raise ConfigError(f"--vocab-size {vocab_size} leaves no room beyond the {len(GLM_SPECIAL_PIECES)} GLM "
                          "special pieces")
    captions = list(iter_captions(inputs, caption_key))
    if not captions:
        raise ConfigError(f"--input {list(inputs)}: no caption found")
    characters = cjk_characters(captions) if split_cjk_characters else []
    if len(GLM_SPECIAL_PIECES) + len(characters) + 3 > vocab_size:
        raise ConfigError(f"--vocab-size {vocab_size} cannot hold the {len(characters)} Chinese characters of the "
                          f"corpus plus {len(GLM_SPECIAL_PIECES)} special pieces; raise it or pass "
                          "--no-split-cjk-characters")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        # A small corpus may not support vocab_size pieces: take fewer rather than fail.
        hard_vocab_limit=False,
        model_type=model_type,
        character_coverage=character_coverage,
        user_defined_symbols=[*GLM_SPECIAL_PIECES, *characters],
        normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        bos_id=-1, eos_id=-1,  # GLM uses its own [CLS]/<|endoftext|>, not SentencePiece's <s></s>
        minloglevel=2,
    )
    return model_prefix + ".model"
