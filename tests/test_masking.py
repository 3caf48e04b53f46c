"""Masks of the masked-modelling objectives (data/masking.py): whole words of GLM's and of the demo's vocabulary, the
budget and BERT's 80/10/10 rule, patches, and masks as a function of the sample's key through the data loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_m2.data.masking import (IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS, Masker, PatchMasker,
                                      TextMasker, build_masker, check_masking, num_masked_patches)
from megatron_m2.errors import ConfigError
from tests.glm import GLM_MODEL, needs_glm


@pytest.fixture(scope="module")
def glm():
    from megatron_m2.data.tokenizer import GLMTokenizer

    if not GLM_MODEL.exists():
        pytest.skip(f"GLM SentencePiece model not found at {GLM_MODEL} (set M2_GLM_MODEL)")
    return GLMTokenizer(str(GLM_MODEL), max_length=52)


@pytest.fixture(scope="module")
def glm_masker(glm):
    return TextMasker(glm, 0.15)


def _word_pieces(tokenizer, masker, text):
    ids, _ = tokenizer([text])
    return [[tokenizer.sp.id_to_piece(int(ids[0, p])) for p in word] for word in masker.words(ids[0].numpy())]


@needs_glm
def test_words_of_glm_pieces(glm, glm_masker):
    assert glm.mask_id == 50003
    words = _word_pieces(glm, glm_masker, "一只猫坐在红色的沙发上, unbelievably 2023年!")
    # Chinese pieces are words of their own (GLM learned words as pieces), punctuation too; "▁" starts an English word
    # and letter/digit pieces without it continue it
    assert words == [["▁一只"], ["猫"], ["坐在"], ["红色的"], ["沙发上"], [","], ["▁unbelievably"],
                     ["▁20", "23"], ["年"], ["!"]], words
    split = _word_pieces(glm, glm_masker, "xylophonists")
    assert len(split) == 1 and len(split[0]) > 1, split  # one word, several pieces


def test_words_of_the_demo_tokenizer(demo_data):
    from megatron_m2.data.tokenizer import GLMTokenizer

    tokenizer = GLMTokenizer(str(demo_data / "tokenizer.model"), max_length=16)
    masker = TextMasker(tokenizer, 0.15)
    assert tokenizer.mask_id is not None and masker.special[tokenizer.mask_id]
    words = _word_pieces(tokenizer, masker, "数字七的照片。")
    assert [len(w) for w in words] == [1] * 7 and "".join(p for w in words for p in w).replace("\u2581", "") \
        == "数字七的照片。"  # the demo vocabulary has one piece per character: a Chinese word is a character


@needs_glm
def test_whole_words_budget_and_the_80_10_10_rule(glm, glm_masker):
    text = "a photo of the unbelievably xylophonists 2023 红色的沙发上 " * 2
    ids, padding = glm([text])
    ids = ids[0].numpy()
    words = glm_masker.words(ids)
    body = sum(len(w) for w in words)
    kinds = {"mask": 0, "random": 0, "kept": 0}
    for seed in range(400):
        masked, targets = glm_masker(ids, np.random.default_rng(seed))
        chosen = set(np.flatnonzero(targets).tolist())
        assert 0 < len(chosen) <= max(1, round(0.15 * body))
        for word in words:  # whole words only
            assert set(word) <= chosen or not set(word) & chosen, (word, chosen)
        assert not targets[padding[0].numpy()].any() and not targets[0]  # never [CLS] or padding
        assert (masked[~targets] == ids[~targets]).all()
        for position in chosen:
            kinds["mask" if masked[position] == glm.mask_id else "kept" if masked[position] == ids[position]
                  else "random"] += 1
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.05 and abs(kinds["random"] / total - 0.1) < 0.04, kinds


def test_patch_mask_counts_and_rate_checks():
    assert num_masked_patches(196, 80 / 196) == 80 and num_masked_patches(16, 80 / 196) == 7
    masks = [PatchMasker(196, 80)(np.random.default_rng(seed)) for seed in range(3)]
    assert all(m.sum() == 80 for m in masks) and not np.array_equal(masks[0], masks[1])
    for prob, ratio in ((0.0, 0.4), (1.0, 0.4), (0.15, 0.01), (0.15, 1.0)):
        with pytest.raises(ConfigError):
            check_masking(prob, ratio, 16)
    check_masking(0.15, 80 / 196, 16)


def test_masks_are_a_function_of_the_sample_key_and_each_stream_its_own(demo_data):
    from megatron_m2.data.tokenizer import GLMTokenizer

    tokenizer = GLMTokenizer(str(demo_data / "tokenizer.model"), max_length=16)
    ids, _ = tokenizer(["a handwritten seven.", "数字七的照片。", "the number two, written by hand."])
    keys = [[7, 0, 0, i] for i in range(3)]
    both = build_masker(tokenizer, 16, 0.5, 0.4)
    first, again = both(ids, keys), both(ids, keys)
    assert set(first) == {MASKED_TEXT_IDS, TEXT_TARGETS, IMAGE_PATCH_MASK}
    for key in first:
        assert torch.equal(first[key], again[key]), key
    other = both(ids, [[7, 1, 0, i] for i in range(3)])  # another epoch: other masks
    assert not all(torch.equal(first[k], other[k]) for k in first)
    text_only, patches_only = build_masker(tokenizer, 16, 0.5, None)(ids, keys), Masker(
        None, PatchMasker(16, num_masked_patches(16, 0.4)))(ids, keys)
    assert set(text_only) == {MASKED_TEXT_IDS, TEXT_TARGETS} and set(patches_only) == {IMAGE_PATCH_MASK}
    assert torch.equal(text_only[TEXT_TARGETS], first[TEXT_TARGETS])  # turning CMIM on changes no text mask
    assert torch.equal(patches_only[IMAGE_PATCH_MASK], first[IMAGE_PATCH_MASK])
    assert build_masker(tokenizer, 16) is None


def test_a_tokenizer_without_mask_piece_is_refused_for_cmlm(tmp_path):
    import sentencepiece as spm

    from megatron_m2.data.tokenizer import GLMTokenizer
    from megatron_m2.data.tokenizer_training import GLM_SPECIAL_PIECES

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"a caption number {i} of some words" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "t"), vocab_size=80,
                                   user_defined_symbols=[p for p in GLM_SPECIAL_PIECES if p != "[MASK]"],
                                   minloglevel=2, hard_vocab_limit=False)
    tokenizer = GLMTokenizer(str(tmp_path / "t.model"), max_length=16)
    assert tokenizer.mask_id is None
    with pytest.raises(ConfigError, match="needs a \\[MASK\\] piece"):
        build_masker(tokenizer, 16, 0.15, None)
    assert build_masker(tokenizer, 16, None, 0.4) is not None  # CMIM alone needs no [MASK]


def test_the_loader_adds_masks_without_changing_the_batches_and_resumes_them(tmp_path, demo_data):
    from megatron_m2.config import load_config
    from megatron_m2.data import build_train_data
    from megatron_m2.data.tokenizer import GLMTokenizer

    config = load_config("tiny")
    tokenizer = GLMTokenizer(str(demo_data / "tokenizer.model"), max_length=config.max_text_length)
    masker = build_masker(tokenizer, config.num_patches, 0.15, 80 / 196)
    shards = str(demo_data / "data" / "train")

    def take(n, workers, masker=None, state=None):
        with build_train_data(shards, tokenizer, config, 4, 0, 1, seed=5, num_workers=workers,
                              masker=masker) as data:
            if state is not None:
                data.load_state_dict(state)
            return [next(data) for _ in range(n)], data.state_dict()

    plain, _ = take(3, 0)
    masked, _ = take(3, 2, masker)
    for a, b in zip(plain, masked):
        assert set(b) == set(a) | {MASKED_TEXT_IDS, TEXT_TARGETS, IMAGE_PATCH_MASK}
        for key in a:  # the augmentation draws what it drew without masks
            assert torch.equal(a[key], b[key]), key
        assert (b[IMAGE_PATCH_MASK].sum(1) == 7).all() and (b[TEXT_TARGETS].sum(1) >= 1).all()
    first, state = take(1, 0, masker)
    resumed, _ = take(2, 1, masker, state)  # a resumed loader masks the next samples as the uninterrupted one did
    for a, b in zip(masked[1:], resumed):
        for key in b:
            assert torch.equal(a[key], b[key]), key
