"""The evaluation protocols (eval/protocol.py) on tiny hand-made retrieval sets whose recalls are computed by hand,
the full prompt sets, and the flags that choose them (--eval-protocol, --zeroshot-templates)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from megatron_m2.config import load_config
from megatron_m2.errors import ConfigError
from megatron_m2.eval.retrieval import evaluate_retrieval
from tests.test_eval import _encode_images, _make_folder, _to_tensor

E0, E1, E2 = torch.eye(3)


def _encoder(table: dict[str, torch.Tensor]):
    """Texts -> embeddings by exact string (what the model would see after normalisation)."""
    return lambda texts: torch.stack([table[t] for t in texts])


def _recalls_at_1(scores: dict) -> tuple[float, float]:
    assert all(scores[f"{d}_R@{k}"] == 100.0 for d in ("t2i", "i2t") for k in (5, 10))  # 3 images: always in top 5
    return round(scores["t2i_R@1"], 2), round(scores["i2t_R@1"], 2)


def _rows(captions: list[list[str]]) -> list[dict]:
    return [{"image": f"val/n0{i}/img0.png", "captions": c} for i, c in enumerate(captions)]


def test_a_caption_shared_by_two_images_matches_both_under_the_release_protocol(tmp_path):
    """COCO-CN's case: images 0 and 1 have the same caption. Images are e0, e1, e2; "two dogs" scores .6 with image
    0, .8 with image 1.
    strict: t2i: text 0 ranks image 1 (.8) above its image 0 (.6): miss; texts 1, 2 hit -> 2/3. i2t: image 0's
      caption (.6) ties with text 1, a negative for it: miss; image 1 likewise (.8 = .8): miss; image 2 hits -> 1/3.
    release: both copies match both images: every query hits -> 100 / 100."""
    _make_folder(tmp_path)
    rows = _rows([["two dogs"], ["two dogs"], ["a bird"]])
    encode = _encoder({"two dogs": torch.tensor([0.6, 0.8, 0.0]), "a bird": E2})
    run = lambda shared: evaluate_retrieval(rows, _encode_images, encode, _to_tensor,  # noqa: E731
                                            image_root=str(tmp_path), shared_captions_match=shared)
    assert _recalls_at_1(run(False)) == (66.67, 33.33)
    assert _recalls_at_1(run(True)) == (100.0, 100.0)
    assert run(False)["MR"] == pytest.approx((200 / 3 + 100 / 3 + 400) / 6) and run(True)["MR"] == 100.0


def test_the_release_protocol_lower_cases_before_matching(tmp_path):
    """Image 0: "A dog"; image 1: "a dog", "a cat"; image 2: "a bird". Embeddings by string: "A dog" e0 (a
    case-sensitive tokenizer sees another text), "a dog" e1, "a cat" (0, .6, .8), "a bird" e2.
    strict: t2i hits for texts 0, 1, 3, "a cat" ranks image 2 first -> 3/4; i2t: every image's best caption is its
      own top text -> 3/3.
    strict + --caption-normalization official: text 0 becomes "a dog" = e1, a match only for image 0, which scores
      0 (images 1 and 2 rank before or with it): t2i 2/4; i2t: image 0 scores 0 everywhere: miss; image 1's "a dog"
      (1) ties with text 0, a negative for it: miss -> 1/3.
    release: "a dog" matches images 0 and 1: text 0 hits (image 1); t2i 3/4; i2t: image 0 still scores 0 for its
      captions, tied with "a cat" and "a bird": miss; image 1 hits (text 0 now matches it too) -> 2/3."""
    _make_folder(tmp_path)
    rows = _rows([["A dog"], ["a dog", "a cat"], ["a bird"]])
    encode = _encoder({"A dog": E0, "a dog": E1, "a cat": torch.tensor([0.0, 0.6, 0.8]), "a bird": E2})

    def run(normalization: str, shared: bool) -> tuple[float, float]:
        return _recalls_at_1(evaluate_retrieval(rows, _encode_images, encode, _to_tensor, image_root=str(tmp_path),
                                                caption_normalization=normalization, shared_captions_match=shared))

    assert run("none", False) == (75.0, 100.0)
    assert run("official", False) == (50.0, 33.33)
    assert run("official", True) == (75.0, 66.67)


def _eval_args(tmp_path, *flags: str, squash: bool = False) -> argparse.Namespace:
    from megatron_m2.config import M2Config
    from megatron_m2.eval.flags import add_eval_data_arguments, check_eval_data_arguments

    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    args = parser.parse_args(list(flags))
    check_eval_data_arguments(args)
    config = load_config("tiny")
    args.model_config = M2Config(**{**config.to_dict(), "image_resize_mode": "squash"}) if squash else config
    return args


def test_auto_protocol_follows_the_models_preprocessing(tmp_path, monkeypatch, capsys):
    """The trainer's and the standalone evaluator's evaluation (make_eval_fn): imported release weights (squash)
    get the release's protocol, models trained here the strict one, unless --eval-protocol says otherwise."""
    from megatron_m2.eval import runner

    _make_folder(tmp_path)
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows([["A dog"], ["a dog", "a cat"], ["a bird"]])))
    encode = _encoder({"A dog": E0, "a dog": E1, "a cat": torch.tensor([0.0, 0.6, 0.8]), "a bird": E2})
    monkeypatch.setattr(runner, "make_encoders", lambda *a, **k: (_encode_images, encode))
    flags = ("--retrieval-data", str(jsonl), "--retrieval-image-root", str(tmp_path))
    for extra, squash, expected, name in (((), False, (75.0, 100.0), "strict"),
                                          ((), True, (75.0, 66.67), "release"),
                                          (("--eval-protocol", "release"), False, (75.0, 66.67), "release"),
                                          (("--eval-protocol", "strict"), True, (75.0, 100.0), "strict"),
                                          (("--caption-normalization", "official"), False, (50.0, 33.33), "strict")):
        scores = runner.make_eval_fn(_eval_args(tmp_path, *flags, *extra, squash=squash))(None, None, None)
        assert _recalls_at_1({k.removeprefix("retrieval/"): v for k, v in scores.items()}) == expected, extra
        assert f"evaluation protocol: {name}" in capsys.readouterr().out


def test_full_prompt_sets_are_shipped_with_their_sources():
    from pathlib import Path

    from megatron_m2.eval.templates import IMAGENET_TEMPLATE_FILES, IMAGENET_TEMPLATES, default_templates

    en, zh = default_templates("en"), default_templates("zh")
    assert len(en) == len(zh) == 80 and len(set(en)) == 80 and len(set(zh)) == 78  # as published
    assert en[0] == "a bad photo of a {}." and en[-1] == "a tattoo of the {}." and "itap of a {}." in en
    assert zh[0] == "{}的照片。" and zh[-1] == "{}的刺青。"
    readme = (Path(IMAGENET_TEMPLATE_FILES["en"]).parent / "README.md").read_text()
    assert "openai/CLIP" in readme and "OFA-Sys/Chinese-CLIP" in readme
    assert IMAGENET_TEMPLATES["en"] == en


def test_prompts_are_normalised_like_captions(tmp_path):
    from megatron_m2.eval.datasets import ImageFolderWithClassNames
    from megatron_m2.eval.zeroshot import evaluate_zero_shot
    from tests.test_eval import _encode_texts

    root, files = _make_folder(tmp_path)
    (tmp_path / "t_en.txt").write_text("A “Photo” Of {} Here\n")
    ds = ImageFolderWithClassNames(str(root), {"en": str(files["en"])}, _to_tensor,
                                   template_files={"en": str(tmp_path / "t_en.txt")})
    for normalization, first in (("official", 'a "photo" of red here'), ("none", "A “Photo” Of red Here")):
        seen: list[str] = []
        evaluate_zero_shot(ds, ds.class_names, _encode_images, lambda t: seen.extend(t) or _encode_texts(t),
                           caption_normalization=normalization)
        assert seen[0] == first and len(seen) == 3
    # the built-in sets by default: 80 prompts per class
    ds = ImageFolderWithClassNames(str(root), {"en": str(files["en"])}, _to_tensor)
    seen = []
    evaluate_zero_shot(ds, ds.class_names, _encode_images, lambda t: seen.extend(t) or _encode_texts(t))
    assert len(seen) == 3 * 80 and seen[0] == "a bad photo of a red."


def test_zeroshot_templates_flag(tmp_path, monkeypatch):
    from megatron_m2.eval import runner
    from tests.test_eval import _encode_texts

    root, files = _make_folder(tmp_path)
    (tmp_path / "t_zh.txt").write_text("{}色的图。\n")
    args = _eval_args(tmp_path, "--zeroshot-data", str(root), "--zeroshot-classnames", f"en={files['en']}",
                      f"zh={files['zh']}", "--zeroshot-templates", f"zh={tmp_path / 't_zh.txt'}")
    seen: list[str] = []

    monkeypatch.setattr(runner, "make_encoders", lambda *a, **k: (
        _encode_images, lambda texts: seen.extend(texts) or _encode_texts(texts)))
    scores = runner.make_eval_fn(args)(None, None, None)
    assert scores["zh/top1"] == 100.0 and scores["en/top1"] == 100.0
    assert seen.count("红色的图。") == 1 and len(seen) == 3 * 80 + 3  # en: the built-in set; zh: the file
    for flags, match in ((["--zeroshot-templates", "zh=x.txt"], "--zeroshot-templates applies to --zeroshot-data"),
                         (["--zeroshot-data", str(root), "--zeroshot-classnames", f"en={files['en']}",
                           "--zeroshot-templates", "zh"], "--zeroshot-templates expects LANG=FILE")):
        with pytest.raises(ConfigError, match=match):
            _eval_args(tmp_path, *flags)
    bad = _eval_args(tmp_path, "--zeroshot-data", str(root), "--zeroshot-classnames", f"en={files['en']}",
                     "--zeroshot-templates", f"zh={tmp_path / 't_zh.txt'}")
    with pytest.raises(ConfigError, match="--zeroshot-templates zh=: no --zeroshot-classnames"):
        runner.make_eval_fn(bad)
    (tmp_path / "t_en.txt").write_text("no placeholder\n")
    bad = _eval_args(tmp_path, "--zeroshot-data", str(root), "--zeroshot-classnames", f"en={files['en']}",
                     "--zeroshot-templates", f"en={tmp_path / 't_en.txt'}")
    with pytest.raises(ConfigError, match=r"--zeroshot-templates en=.*needs a \{\}"):
        runner.make_eval_fn(bad)
