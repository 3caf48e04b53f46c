"""GLM-compatible tokenizer: the same ids as M2-Encoder's GLMChineseTokenizer (see megatron_m2/data/tokenizer.py).

Expected ids come from SentencePiece pieces written out by hand, so the tests pin the wrapping, truncation,
special-token and blank logic, not SentencePiece itself.
"""
import pytest
import torch

from megatron_m2.data.tokenizer import GLMTokenizer, check_vocab, encode_whitespaces
from megatron_m2.errors import ConfigError
from tests.glm import GLM_MODEL, needs_glm


@pytest.fixture(scope="module")
def glm():
    return GLMTokenizer(str(GLM_MODEL), max_length=52)


def _ids(tok, pieces):
    ids = [tok.sp.piece_to_id(p) for p in pieces]
    assert all(i != tok.sp.unk_id() for i in ids), pieces
    return ids


@needs_glm
def test_special_ids_are_the_glm_layout(glm):
    assert (glm.vocab_size, glm.cls_id, glm.eot_id, glm.pad_id) == (115244, 50002, 50000, 50000)


@needs_glm
@pytest.mark.parametrize("text, pieces", [
    ("a photo of a cat", ["▁a", "▁photo", "▁of", "▁a", "▁cat"]),
    ("一只猫的照片", ["▁一只", "猫", "的照片"]),
    ("a photo of 一只猫", ["▁a", "▁photo", "▁of", "▁一只", "猫"]),
    # 2 spaces -> <|blank_2|>; 12 -> <|blank_10|><|blank_2|>; 11 -> <|blank_10|> + a single space (a ▁).
    ("a  b", ["▁a", "<|blank_2|>", "b"]),
    ("a" + " " * 12 + "b", ["▁a", "<|blank_10|>", "<|blank_2|>", "b"]),
    ("a" + " " * 11 + "b", ["▁a", "<|blank_10|>", "▁b"]),
    # A literal special token is one id and eats the spaces around it; each side is encoded on its own.
    ("hello  [CLS]  world", ["▁hello", "[CLS]", "▁world"]),
    ("", []),
])
def test_encode_matches_hand_checked_pieces(glm, text, pieces):
    assert glm.encode(text) == [50002] + _ids(glm, pieces) + [50000]


@needs_glm
def test_left_truncation_keeps_cls_eot_and_the_caption_end():
    tok = GLMTokenizer(str(GLM_MODEL), max_length=6)
    words = ["▁one", "▁two", "▁three", "▁four", "▁five", "▁six"]
    ids = tok.encode("one two three four five six")
    assert ids == [tok.cls_id] + _ids(tok, words[-4:]) + [tok.eot_id]
    # Exactly full is not truncated.
    assert tok.encode("three four five six") == ids


@needs_glm
def test_batch_pads_with_eot_and_masks_padding(glm):
    ids, mask = glm(["a photo of a cat", "", "x" * 400])
    assert ids.shape == mask.shape == (3, 52) and ids.dtype == torch.long and mask.dtype == torch.bool
    row0 = glm.encode("a photo of a cat")
    assert ids[0, :len(row0)].tolist() == row0
    assert (ids[0, len(row0):] == 50000).all()
    assert mask[0].tolist() == [False] * len(row0) + [True] * (52 - len(row0))
    assert ids[1, :2].tolist() == [50002, 50000] and mask[1, 2:].all() and not mask[1, :2].any()
    assert not mask[2].any() and ids[2, 0] == 50002 and ids[2, -1] == 50000


def test_encode_whitespaces_longest_first():
    assert encode_whitespaces("a" + " " * 23 + "b") == "a<|blank_10|><|blank_10|><|blank_3|>b"
    assert encode_whitespaces("a b") == "a b"


def test_missing_or_bad_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        GLMTokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        GLMTokenizer(str(bad))


@needs_glm
def test_check_vocab(glm):
    check_vocab(glm, 115244)
    with pytest.raises(ConfigError, match="tokenizer has 115244 pieces, the model's vocab_size is 1024"):
        check_vocab(glm, 1024)


# -- the small bilingual tokenizer of the tiny preset -----------------------------------------------------------

def _corpus(tmp_path):
    import json
    import random

    rng = random.Random(0)
    en = ["a photo of the digit {}", "a handwritten {}", "the number {} written by hand"]
    zh = ["数字{}的照片", "手写的{}", "一张{}的图片"]
    digits_en = "zero one two three four five six seven eight nine".split()
    digits_zh = "零一二三四五六七八九"
    txt, jsonl = tmp_path / "captions.txt", tmp_path / "captions.jsonl"
    txt.write_text("\n".join(rng.choice(en).format(rng.choice(digits_en)) for _ in range(300)) + "\n")
    jsonl.write_text("\n".join(json.dumps({"caption": rng.choice(zh).format(rng.choice(digits_zh)), "lang": "zh"},
                                          ensure_ascii=False) for _ in range(300)) + "\n")
    return [str(txt), str(jsonl)]


def test_train_tokenizer_tool_gives_a_glm_layout_model_for_the_tiny_preset(tmp_path, capsys):
    from megatron_m2.config import load_config
    from tools.train_tokenizer import main

    inputs = _corpus(tmp_path)
    assert main(["--input", *inputs, "--output", str(tmp_path / "tok" / "tiny"), "--vocab-size", "1000"]) == 0
    tok = GLMTokenizer(str(tmp_path / "tok" / "tiny.model"), max_length=16)
    check_vocab(tok, load_config("tiny").vocab_size)
    assert tok.vocab_size <= 1000 and f"{tok.vocab_size} pieces" in capsys.readouterr().out
    ids = tok.encode("a photo of  七")
    assert ids[0] == tok.cls_id and ids[-1] == tok.eot_id
    assert tok.sp.piece_to_id("<|blank_2|>") in ids and tok.sp.unk_id() not in ids
    assert tok.decode(ids) == "a photo of  七"
    # Too many pieces for the model is refused before training.
    assert main(["--input", *inputs, "--output", str(tmp_path / "x"), "--vocab-size", "2000"]) == 2
    assert "--vocab-size 2000 exceeds --model-vocab-size 1024" in capsys.readouterr().err


def test_chinese_characters_are_pieces_of_their_own_unless_disabled(tmp_path, capsys):
    from tools.train_tokenizer import main

    inputs = _corpus(tmp_path)
    assert main(["--input", *inputs, "--output", str(tmp_path / "split"), "--vocab-size", "200"]) == 0
    assert main(["--input", *inputs, "--output", str(tmp_path / "fused"), "--vocab-size", "200",
                 "--no-split-cjk-characters"]) == 0
    split = GLMTokenizer(str(tmp_path / "split.model"))
    fused = GLMTokenizer(str(tmp_path / "fused.model"))
    # A prompt worded unlike any caption still shares the numeral's piece with the captions.
    pieces = split.sp.encode("七的照片", out_type=str)
    assert [p.lstrip("▁") for p in pieces if p != "▁"] == ["七", "的", "照", "片"]
    assert any(len(p.lstrip("▁")) > 1 for p in fused.sp.encode("数字七的照片", out_type=str))
    # Room for the characters is checked before training.
    assert main(["--input", *inputs, "--output", str(tmp_path / "small"), "--vocab-size", "30"]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size 30 cannot hold the" in err and "--no-split-cjk-characters" in err


def test_a_model_without_the_glm_pieces_is_a_config_error(tmp_path):
    import sentencepiece as spm

    inputs = _corpus(tmp_path)
    spm.SentencePieceTrainer.train(input=inputs[0], model_prefix=str(tmp_path / "plain"), vocab_size=60,
                                   hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ConfigError, match=r"--tokenizer-model .* lacks the GLM special pieces \['\[CLS\]'"):
        GLMTokenizer(str(tmp_path / "plain.model"))
