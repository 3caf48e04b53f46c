"""GLM-compatible SentencePiece tokenizer: the same ids as M2-Encoder's GLMChineseTokenizer.

The original (alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder/vlmo/tokenizer/tokenization_glm.py, run under
transformers 4.17 as pinned in its requirements.txt) is a slow HF tokenizer called as
`tok(texts, padding="max_length", truncation=True, max_length=52)`. Its algorithm, reproduced here:

1. HF `tokenize()` splits the text on the special tokens of tokenizer_config.json ([CLS], <|endoftext|>,
   [MASK], [UNK]); a special token given as a plain string strips the whitespace on both sides of it, and each
   special token maps straight to its id.
2. Each remaining chunk goes through `encode_whitespaces` (runs of 10..2 spaces -> <|blank_n|>, longest first)
   and then SentencePiece, chunk by chunk (so every chunk gets SentencePiece's dummy-prefix space).
3. Truncation: `truncation_side = "left"` and HF truncates the body BEFORE adding special tokens, so the body
   keeps its last max_length - 2 ids and [CLS] ... <|endoftext|> are always kept.
4. `[CLS] body <|endoftext|>`, right-padded with <|endoftext|> (pad_token); attention mask 0 on padding.
"""
from __future__ import annotations

import os
import re

import torch

from megatron_m2.errors import ConfigError

CLS_PIECE = "[CLS]"
EOT_PIECE = "<|endoftext|>"
MASK_PIECE = "[MASK]"
# The special tokens of M2-Encoder's tokenizer_config.json (pad == eos), which HF never lets SentencePiece split.
NO_SPLIT_PIECES = (EOT_PIECE, CLS_PIECE, MASK_PIECE, "[UNK]")
MAX_BLANK = 10


def encode_whitespaces(text: str, max_blank: int = MAX_BLANK) -> str:
    """Runs of n spaces (2 <= n <= max_blank) -> <|blank_n|>, longest first, as the original does."""
    for n in range(max_blank, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


class GLMTokenizer:
    """`encode(text)` -> `[CLS] ... <|endoftext|>` ids; `__call__(texts)` -> padded ids and padding mask."""

    def __init__(self, model_path: str, max_length: int = 52) -> None:
        import sentencepiece as spm

        if not model_path or not os.path.isfile(model_path):
            raise ConfigError(f"--tokenizer-model {model_path!r}: no such file; pass a SentencePiece .model "
                              "(tools/train_tokenizer.py trains a small one)")
        if max_length < 2:
            raise ConfigError(f"--max-text-length {max_length}: must be >= 2 to hold [CLS] and <|endoftext|>")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"--tokenizer-model {model_path!r} is not a readable SentencePiece model: {exc}")
        self.model_path = model_path
        self.max_length = max_length
        self.vocab_size: int = self.sp.get_piece_size()
        missing = [p for p in (CLS_PIECE, EOT_PIECE) + tuple(f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1))
                   if self._piece_id(p) is None]
        if missing:
            raise ConfigError(f"--tokenizer-model {model_path!r} lacks the GLM special pieces {missing}; train one "
                              "with tools/train_tokenizer.py or pass the GLM model")
        self.cls_id: int = self._piece_id(CLS_PIECE)
        self.eot_id: int = self._piece_id(EOT_PIECE)
        self.pad_id: int = self.eot_id
        # [MASK] (GLM's 50003) replaces masked tokens for CMLM (data/masking.py); None if the model has no such piece
        self.mask_id = self._piece_id(MASK_PIECE)
        self._special_ids = {p: self._piece_id(p) for p in NO_SPLIT_PIECES if self._piece_id(p) is not None}
        # Longest first, so that a special token that is a prefix of another cannot win (HF's trie does the same).
        alternatives = "|".join(re.escape(p) for p in sorted(self._special_ids, key=len, reverse=True))
        self._split_re = re.compile(f"({alternatives})")

    def _piece_id(self, piece: str):
        # piece_to_id answers the unknown id for an absent piece; only a real match counts.
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece and i != self.sp.unk_id() else None

    def tokenize_body(self, text: str) -> list[int]:
        """The text's ids without [CLS]/<|endoftext|> and without truncation."""
        chunks = self._split_re.split(text)
        # Special tokens eat the whitespace on both sides (HF's default for plain-string special tokens).
        for i, chunk in enumerate(chunks):
            if chunk in self._special_ids:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
        ids: list[int] = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._special_ids:
                ids.append(self._special_ids[chunk])
            else:
                ids.extend(self.sp.encode(encode_whitespaces(chunk)))
        return ids

    def encode(self, text: str) -> list[int]:
        body = self.tokenize_body(text)
        keep = self.max_length - 2
        # Left truncation of the body only: the caption's end survives, [CLS] and <|endoftext|> are kept.
        if len(body) > keep:
            body = body[len(body) - keep:]
        return [self.cls_id] + body + [self.eot_id]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n, max_length] (padded with <|endoftext|>) and padding_mask [n, max_length] (True = padding)."""
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        padding_mask = torch.ones((len(texts), self.max_length), dtype=torch.bool)
        for row, text in enumerate(texts):
            encoded = self.encode(text)
            ids[row, :len(encoded)] = torch.tensor(encoded, dtype=torch.long)
            padding_mask[row, :len(encoded)] = False
        return ids, padding_mask

    def decode(self, ids: list[int]) -> str:
        """Ids back to text (special ids dropped, <|blank_n|> back to spaces): for logs and debugging."""
        drop = {self.cls_id, self.eot_id}
        text = self.sp.decode([i for i in ids if i not in drop])
        for n in range(MAX_BLANK, 1, -1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text


def load_tokenizer(model_path: str, max_length: int = 52) -> GLMTokenizer:
    return GLMTokenizer(model_path, max_length)


def check_vocab(tokenizer: GLMTokenizer, model_vocab_size: int) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} pieces, the model's vocab_size is "
                          f"{model_vocab_size}: pass a matching --tokenizer-model or model config")
