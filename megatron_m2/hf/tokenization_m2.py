"""M2-Encoder's tokenizer as a transformers tokenizer (AutoTokenizer, trust_remote_code=True).

Self-contained (transformers, sentencepiece): copied into converted folders next to tokenizer.model as remote code,
so it must never import megatron_m2. The algorithm is the official GLMChineseTokenizer's, as
megatron_m2/data/tokenizer.py documents and reproduces (tests/test_hf.py checks both give the same ids):
split on the special tokens [CLS] <|endoftext|> [MASK] [UNK] (which eat the whitespace on both sides), runs of
10..2 spaces -> <|blank_n|> per chunk, SentencePiece per chunk; `[CLS] body <|endoftext|>`; truncation removes
body tokens from the LEFT; padding with <|endoftext|> on the right. transformers does the batching, padding,
truncation and tensor conversion: `tok(texts, padding="max_length", truncation=True, return_tensors="pt")` is what
the release calls (max_length defaults to model_max_length, 52).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

from transformers import PreTrainedTokenizer

VOCAB_FILE = "tokenizer.model"
AUTO_MAP = {"AutoTokenizer": ["tokenization_m2.M2Tokenizer", None]}
# The special tokens of the release's tokenizer_config.json: never split, whitespace around them stripped
SPLIT_TOKENS = ("<|endoftext|>", "[CLS]", "[MASK]", "[UNK]")


class M2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, cls_token: str = "[CLS]", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", unk_token: Optional[str] = "[UNK]",
                 mask_token: Optional[str] = "[MASK]", max_blank: int = 10, model_max_length: int = 52,
                 truncation_side: str = "left", padding_side: str = "right",
                 clean_up_tokenization_spaces: bool = False, **kwargs: Any) -> None:
        import sentencepiece as spm

        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.max_blank = max_blank
        self._vocab: Optional[dict[str, int]] = None
        # from_pretrained passes the special tokens back as AddedToken objects
        cls_token, eos_token, pad_token = str(cls_token), str(eos_token), str(pad_token)
        unk_token = str(unk_token) if unk_token is not None else None
        mask_token = str(mask_token) if mask_token is not None else None
        for name, piece in (("cls_token", cls_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if self._piece_id(piece) is None:
                raise ValueError(f"{vocab_file} has no piece {piece!r} ({name}): not a GLM-compatible tokenizer")
        # a small SentencePiece model may lack [UNK]/[MASK]: then they are not special tokens (transformers would
        # otherwise append them to the vocabulary, with ids the model has no embedding for)
        unk_token = unk_token if unk_token and self._piece_id(unk_token) is not None else None
        mask_token = mask_token if mask_token and self._piece_id(mask_token) is not None else None
        self._split_ids = {p: self._piece_id(p) for p in SPLIT_TOKENS if self._piece_id(p) is not None}
        # longest first, so a special token that is a prefix of another cannot win (as HF's trie)
        self._split_re = re.compile("(" + "|".join(re.escape(p) for p in sorted(self._split_ids, key=len,
                                                                                 reverse=True)) + ")")
        super().__init__(cls_token=cls_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
                         mask_token=mask_token, max_blank=max_blank, model_max_length=model_max_length,
                         truncation_side=truncation_side, padding_side=padding_side,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)  # the unknown id for an absent piece: only a real match counts
        return i if self.sp.id_to_piece(i) == piece and i != self.sp.unk_id() else None

    # -- vocabulary ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        return dict(self._vocab)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(int(index))

    # -- encoding -----------------------------------------------------------------------------------------------
    def body_ids(self, text: str) -> list[int]:
        """The text's ids without [CLS]/<|endoftext|> and without truncation (the GLM rules)."""
        chunks = self._split_re.split(text) if self._split_ids else [text]
        for i, chunk in enumerate(chunks):
            if chunk in self._split_ids:
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
        ids: list[int] = []
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._split_ids:
                ids.append(self._split_ids[chunk])
                continue
            for n in range(self.max_blank, 1, -1):
                chunk = chunk.replace(" " * n, f"<|blank_{n}|>")
            ids.extend(self.sp.encode(chunk))
        return ids

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # replaces transformers' added-token splitting: the GLM rules strip whitespace around every special token,
        # which transformers' AddedToken defaults do not; pieces map back to exactly these ids
        return [self.sp.id_to_piece(i) for i in self.body_ids(text)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: Optional[list[int]] = None) -> list[int]:
        out = [self.cls_token_id, *token_ids_0, self.eos_token_id]
        return out if token_ids_1 is None else out + [*token_ids_1, self.eos_token_id]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        mask = [1] + [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int],
                                             token_ids_1: Optional[list[int]] = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # -- decoding -----------------------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decoding per run of ordinary pieces, special tokens verbatim, <|blank_n|> back to spaces."""
        special = set(self.all_special_tokens) | set(self._split_ids)
        parts, run = [], []
        for token in tokens:
            if token in special:
                if run:
                    parts.append(self._decode_run(run, after_special=bool(parts)))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self._decode_run(run, after_special=bool(parts)))
        text = "".join(parts)
        for n in range(self.max_blank, 1, -1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text

    def _decode_run(self, pieces: list[str], after_special: bool) -> str:
        # SentencePiece drops the word-boundary mark of a run's first piece; after a special token keep it as a space
        text = self.sp.decode_pieces(pieces)
        return " " + text if after_special and pieces[0].startswith("\u2581") else text

    # -- saving -------------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # name the remote code, so the folder loads with AutoTokenizer(trust_remote_code=True) however it was saved
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["auto_map"] = {**(config.get("auto_map") or {}), **AUTO_MAP}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return files
