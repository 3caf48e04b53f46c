"""Zero-shot and retrieval metrics on hand-made embeddings with known answers; the folder and JSONL readers."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from megatron_m2.data.digits import DIGIT_TEMPLATES
from megatron_m2.errors import ConfigError
from megatron_m2.eval import retrieval as retrieval_module
from megatron_m2.eval.datasets import ImageFolderWithClassNames, read_retrieval_records
from megatron_m2.eval.retrieval import evaluate_retrieval, retrieval_metrics
from megatron_m2.eval.templates import IMAGENET_TEMPLATES, default_templates, fill
from megatron_m2.eval.zeroshot import build_classifier, evaluate_zero_shot, zero_shot_accuracy


def _onehot(index, n):
    return F.one_hot(torch.as_tensor(index), n).float()


# ---------------------------------------------------------------- zero-shot metrics

def test_zero_shot_perfect_embeddings_score_100():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 1])
    scores = zero_shot_accuracy(_onehot(labels, 7), labels, torch.eye(7))
    assert scores == {"top1": 100.0, "top5": 100.0}


def test_zero_shot_known_top1_and_top5():
    # 10 classes; image i's scores rank its true class at position rank[i] (0 = best).
    ranks = torch.tensor([0, 0, 1, 2, 4, 5, 9, 3])
    labels = torch.tensor([3, 7, 0, 9, 5, 1, 2, 8])
    logits = torch.zeros(len(labels), 10)
    for i, (rank, label) in enumerate(zip(ranks.tolist(), labels.tolist())):
        others = [c for c in range(10) if c != label]
        order = others[:rank] + [label] + others[rank:]
        logits[i, order] = torch.linspace(1.0, 0.1, 10)
    # classifier = identity, so logits are the image embeddings themselves.
    scores = zero_shot_accuracy(logits, labels, torch.eye(10), topk=(1, 5))
    assert scores["top1"] == pytest.approx(100 * 2 / 8)
    assert scores["top5"] == pytest.approx(100 * 6 / 8)  # ranks 0,0,1,2,4,3 < 5


def test_zero_shot_shuffled_labels_known_value():
    torch.manual_seed(0)
    labels = torch.arange(20) % 5
    shuffled = labels[torch.randperm(20)]
    scores = zero_shot_accuracy(_onehot(labels, 5), shuffled, torch.eye(5), topk=(1,))
    assert scores["top1"] == pytest.approx(100 * (labels == shuffled).float().mean().item())
    assert scores["top1"] < 100


def test_zero_shot_ties_count_against_the_model():
    # A collapsed encoder (all images and classes the same vector) must not look perfect.
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    scores = zero_shot_accuracy(torch.ones(6, 4) / 2, labels, torch.ones(6, 4) / 2, topk=(1, 5))
    assert scores == {"top1": 0.0, "top5": 0.0}


def test_zero_shot_leaves_out_k_above_class_count():
    assert set(zero_shot_accuracy(torch.eye(3), torch.arange(3), torch.eye(3), topk=(1, 5))) == {"top1"}


def test_build_classifier_ensembles_templates_and_batches(monkeypatch):
    torch.manual_seed(0)
    table = {}
    calls = []

    def encode_texts(texts):
        calls.append(len(texts))
        return torch.stack([table.setdefault(t, torch.randn(6)) for t in texts])  # deliberately NOT normalised

    names, templates = ["cat", "dog", "fish"], ["a {}.", "the {} here.", "{}!"]
    classifier = build_classifier(names, templates, encode_texts, batch_size=4)
    assert max(calls) <= 4 and sum(calls) == 9
    expected = torch.stack([F.normalize(torch.stack([F.normalize(table[fill(t, n)], dim=0) for t in templates])
                                        .mean(0), dim=0) for n in names])
    torch.testing.assert_close(classifier, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(build_classifier(names, templates, encode_texts, batch_size=100), classifier)


def test_templates():
    assert fill("a photo of a {}.", "cat") == "a photo of a cat."
    assert fill("{}的照片。", "猫") == "猫的照片。"
    for table in (IMAGENET_TEMPLATES, DIGIT_TEMPLATES):
        assert set(table) == {"en", "zh"} and all("{}" in t for ts in table.values() for t in ts)
    with pytest.raises(ConfigError, match="fr"):
        default_templates("fr")


# ---------------------------------------------------------------- retrieval metrics

def test_retrieval_perfect_embeddings_with_several_captions():
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11])
    scores = retrieval_metrics(torch.eye(12), _onehot(text_to_image, 12), text_to_image)
    assert all(v == 100.0 for v in scores.values())
    assert set(scores) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"MR"}


def test_retrieval_known_values_any_caption_counts_for_i2t():
    # 3 images (one-hot), 5 texts. Caption 0 of image 0 points at image 1; its caption 1 is right.
    # Image 1's only caption points at image 2. Image 2's two captions are right.
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    texts = torch.stack([_onehot(1, 3), _onehot(0, 3), _onehot(2, 3) * 0.9, _onehot(2, 3), _onehot(2, 3)])
    images = torch.eye(3)
    scores = retrieval_metrics(images, texts, text_to_image)
    # t2i: texts 1, 3, 4 rank their image first; texts 0 and 2 score their image 0, tied with the other 2 -> rank 2.
    assert scores["t2i_R@1"] == pytest.approx(100 * 3 / 5)
    # i2t: image 0 scores texts [0, 1, 0, 0, 0]: own best = 1 (text 1), no other text >= 1 -> hit.
    # image 1 scores [1, 0, 0, 0, 0]: own (text 2) = 0, other texts 0, 3, 4 score >= 0 -> rank 4 -> miss at 1.
    # image 2 scores [0, 0, .9, 1, 1]: own best 1 -> hit.
    assert scores["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert scores["i2t_R@5"] == 100.0 and scores["t2i_R@5"] == 100.0
    assert scores["MR"] == pytest.approx((100 * 3 / 5 + 100 * 2 / 3 + 4 * 100) / 6)


def test_retrieval_i2t_uses_best_caption_not_first():
    # image 0's first caption is bad, its second good: still an R@1 hit.
    text_to_image = torch.tensor([0, 0, 1])
    texts = torch.stack([_onehot(1, 2) * 0.5, _onehot(0, 2), _onehot(1, 2)])
    scores = retrieval_metrics(torch.eye(2), texts, text_to_image)
    assert scores["i2t_R@1"] == 100.0
    assert scores["t2i_R@1"] == pytest.approx(100 * 2 / 3)


def test_retrieval_chunking_gives_the_same_answer(monkeypatch):
    torch.manual_seed(0)
    images = F.normalize(torch.randn(37, 8), dim=-1)
    text_to_image = torch.cat([torch.arange(37), torch.randint(0, 37, (40,))])
    texts = F.normalize(images[text_to_image] + 0.8 * torch.randn(77, 8), dim=-1)
    full = retrieval_metrics(images, texts, text_to_image)
    monkeypatch.setattr(retrieval_module, "_CHUNK", 5)
    assert retrieval_metrics(images, texts, text_to_image) == full
    assert 0 < full["t2i_R@1"] < 100 and 0 < full["i2t_R@1"] < 100


def test_retrieval_rejects_an_image_without_caption():
    with pytest.raises(ValueError, match="caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))


# ---------------------------------------------------------------- readers + end to end with fake encoders

NAMES = {"en": ["red", "green", "blue"], "zh": ["红", "绿", "蓝"]}
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255)


def _encode_images(images):  # the dominant colour channel is the class
    return _onehot(images.mean(dim=(2, 3)).argmax(dim=1), 3)


def _encode_texts(texts):
    labels = [next(i for i in range(3) if NAMES["en"][i] in t or NAMES["zh"][i] in t) for t in texts]
    return _onehot(labels, 3)


def _make_folder(tmp_path, per_class=(2, 3, 1)):
    root = tmp_path / "val"
    for label, count in enumerate(per_class):
        d = root / f"n{label:02d}"
        d.mkdir(parents=True)
        for j in range(count):
            Image.new("RGB", (6, 4), COLOURS[label]).save(d / f"img{j}.png")
    (root / "n01" / "notes.txt").write_text("not an image")
    files = {}
    for lang, names in NAMES.items():
        files[lang] = tmp_path / f"classnames_{lang}.txt"
        files[lang].write_text("\n".join(names) + "\n\n", encoding="utf-8")
    return root, files


def test_image_folder_reads_the_imagenet_layout(tmp_path):
    root, files = _make_folder(tmp_path)
    ds = ImageFolderWithClassNames(str(root), {k: str(v) for k, v in files.items()}, _to_tensor)
    assert len(ds) == 6 and [label for _, label in ds.samples] == [0, 0, 1, 1, 1, 2]
    assert ds.class_names == NAMES
    image, label = ds[5]
    assert label == 2 and image.shape == (3, 4, 6) and image[2].mean() == 1.0


def test_evaluate_zero_shot_end_to_end(tmp_path):
    root, files = _make_folder(tmp_path)
    ds = ImageFolderWithClassNames(str(root), {k: str(v) for k, v in files.items()}, _to_tensor)
    scores = evaluate_zero_shot(ds, ds.class_names, _encode_images, _encode_texts, batch_size=4)
    assert scores == {"en/top1": 100.0, "zh/top1": 100.0}
    # Names shifted by one: every image is classified as the wrong class.
    wrong = {lang: names[1:] + names[:1] for lang, names in NAMES.items()}
    assert evaluate_zero_shot(ds, wrong, _encode_images, _encode_texts, batch_size=4)["zh/top1"] == 0.0


def test_evaluate_zero_shot_uses_template_files(tmp_path):
    root, files = _make_folder(tmp_path)
    (tmp_path / "t_en.txt").write_text("colour {} here\n")
    ds = ImageFolderWithClassNames(str(root), {"en": str(files["en"])}, _to_tensor,
                                   template_files={"en": str(tmp_path / "t_en.txt")})
    seen = []
    evaluate_zero_shot(ds, ds.class_names, _encode_images, lambda t: seen.extend(t) or _encode_texts(t))
    assert seen == ["colour red here", "colour green here", "colour blue here"]


@pytest.mark.parametrize("problem, match", [
    ("missing_file", "--zeroshot-classnames zh=.*no such file"),
    ("wrong_count", "--zeroshot-classnames en=.*2 names but .* 3 class directories"),
    ("blank_line", "--zeroshot-classnames en=.*empty line"),
    ("missing_root", "--zeroshot-data .*no such directory"),
    ("empty_class", "--zeroshot-data: class directory .* holds no image"),
    ("no_files", "--zeroshot-classnames is empty"),
])
def test_image_folder_errors(tmp_path, problem, match):
    root, files = _make_folder(tmp_path)
    files = {k: str(v) for k, v in files.items()}
    if problem == "missing_file":
        files["zh"] = str(tmp_path / "nope.txt")
    elif problem == "wrong_count":
        (tmp_path / "classnames_en.txt").write_text("red\ngreen\n")
    elif problem == "blank_line":
        (tmp_path / "classnames_en.txt").write_text("red\n\ngreen\nblue\n")
    elif problem == "missing_root":
        root = tmp_path / "missing"
    elif problem == "empty_class":
        (root / "n03").mkdir()
    elif problem == "no_files":
        files = {}
    with pytest.raises(ConfigError, match=match):
        ImageFolderWithClassNames(str(root), files, _to_tensor)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")


def test_retrieval_jsonl_end_to_end(tmp_path, monkeypatch):
    root, _ = _make_folder(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    jsonl = data / "test.jsonl"
    _write_jsonl(jsonl, [{"image": "../val/n00/img0.png", "captions": ["a red square", "红色"]},
                         {"image": str(root / "n01" / "img0.png"), "captions": ["green"]},
                         {"image": "../val/n02/img0.png", "captions": ["蓝", "blue", "blue again"]}])
    records = read_retrieval_records(str(jsonl))
    assert [len(r.captions) for r in records] == [2, 1, 3]
    assert records[0].image == str(data / "../val/n00/img0.png")
    monkeypatch.chdir(tmp_path)  # relative paths of a JSONL do not depend on the cwd
    scores = evaluate_retrieval(str(jsonl), _encode_images, _encode_texts, _to_tensor, batch_size=2)
    assert scores["MR"] == 100.0
    # Records given directly resolve against image_root.
    rows = [{"image": "val/n00/img0.png", "captions": ["blue"]}, {"image": "val/n02/img0.png", "captions": ["red"]}]
    scores = evaluate_retrieval(rows, _encode_images, _encode_texts, _to_tensor, image_root=str(tmp_path))
    assert scores["t2i_R@1"] == 0.0 and scores["i2t_R@1"] == 0.0


@pytest.mark.parametrize("row, match", [
    ("{not json", r"test.jsonl:2: not valid JSON"),
    ({"image": "missing.png", "captions": ["x"]}, r"test.jsonl:2: image .*missing.png.* not found"),
    ({"image": "../val/n00/img0.png", "captions": []}, r"test.jsonl:2: expected"),
    ({"img": "../val/n00/img0.png", "captions": ["x"]}, r"test.jsonl:2: expected"),
])
def test_retrieval_jsonl_errors(tmp_path, row, match):
    _make_folder(tmp_path)
    (tmp_path / "data").mkdir()
    jsonl = tmp_path / "data" / "test.jsonl"
    _write_jsonl(jsonl, [{"image": "../val/n00/img0.png", "captions": ["x"]}, row])
    with pytest.raises(ConfigError, match="--retrieval-data " + ".*" + match):
        read_retrieval_records(str(jsonl))
    with pytest.raises(ConfigError, match="no such file"):
        read_retrieval_records(str(tmp_path / "absent.jsonl"))


def test_retrieval_reads_the_release_files_as_shipped(tmp_path):
    """f30k-cn_test.jsonl & co.: key "caption" (a list, or one string), paths relative to --retrieval-image-root;
    lines naming the same image are one image (else its captions would count hits against a copy of itself)."""
    root, _ = _make_folder(tmp_path)
    jsonl = tmp_path / "release" / "f30k-cn_test.jsonl"
    jsonl.parent.mkdir()
    _write_jsonl(jsonl, [{"caption": ["a red square", "红色"], "image": "n00/img0.png"},
                         {"caption": "green", "image": "n01/img0.png"},
                         {"caption": ["蓝"], "image": "n02/img0.png"},
                         {"caption": "blue again", "image": "n02/img0.png"}])
    with pytest.raises(ConfigError, match="--retrieval-image-root"):  # relative to the JSONL's folder by default
        read_retrieval_records(str(jsonl))
    records = read_retrieval_records(str(jsonl), image_root=str(root))
    assert [r.image for r in records] == [str(root / f"n0{i}" / "img0.png") for i in range(3)]
    assert [r.captions for r in records] == [["a red square", "红色"], ["green"], ["蓝", "blue again"]]
    scores = evaluate_retrieval(str(jsonl), _encode_images, _encode_texts, _to_tensor, image_root=str(root))
    assert scores["MR"] == 100.0
    for bad in ({"caption": [], "image": "n00/img0.png"}, {"caption": "x", "captions": ["y"], "image": "n00/img0.png"},
                {"caption": ["ok", 3], "image": "n00/img0.png"}):
        _write_jsonl(jsonl, [bad])
        with pytest.raises(ConfigError, match=r"f30k-cn_test.jsonl:1: expected"):
            read_retrieval_records(str(jsonl), image_root=str(root))


def test_caption_normalization_official_is_the_releases_rule():
    """eval_retrieval.py: text.lower().replace("“", '"').replace("”", '"'), nothing else."""
    from megatron_m2.eval.datasets import normalize_caption

    text = " A “Quoted” DOG’s ‘toy’ 「猫」 ÄÖ İ\t"
    assert normalize_caption(text, "official") == ' a "quoted" dog’s ‘toy’ 「猫」 äö i̇\t'
    assert normalize_caption(text, "official") == text.lower().replace("\u201c", '"').replace("\u201d", '"')
    assert normalize_caption(text, "none") == text.strip()
    with pytest.raises(ConfigError, match="--caption-normalization"):
        normalize_caption(text, "lower")


def test_retrieval_flags_reach_the_reader(tmp_path, monkeypatch):
    """--retrieval-image-root and --caption-normalization reach evaluate_retrieval through make_eval_fn (the trainer's
    and the standalone evaluator's evaluation), and are refused without --retrieval-data."""
    import argparse

    from megatron_m2.config import load_config
    from megatron_m2.eval import retrieval, runner
    from megatron_m2.eval.flags import add_eval_data_arguments, check_eval_data_arguments

    root, _ = _make_folder(tmp_path)
    jsonl = tmp_path / "test.jsonl"
    _write_jsonl(jsonl, [{"caption": ["A “RED” one"], "image": "n00/img0.png"}])
    parser = argparse.ArgumentParser()
    add_eval_data_arguments(parser)
    seen = []
    monkeypatch.setattr(retrieval, "evaluate_retrieval",
                        lambda path, *a, image_root=None, caption_normalization=None, **k: seen.append(
                            read_retrieval_records(path, image_root, caption_normalization)) or {})
    monkeypatch.setattr(runner, "make_encoders", lambda *a, **k: (None, None))
    for flags, captions in ((["--caption-normalization", "official"], ['a "red" one']), ([], ["A “RED” one"])):
        args = parser.parse_args(["--retrieval-data", str(jsonl), "--retrieval-image-root", str(root), *flags])
        check_eval_data_arguments(args)
        args.model_config = load_config("tiny")
        runner.make_eval_fn(args)(None, None, None)
        [record] = seen.pop()
        assert record.image == str(root / "n00" / "img0.png") and record.captions == captions
    for flags, match in ((["--retrieval-image-root", str(root)], "--retrieval-image-root applies to"),
                         (["--caption-normalization", "official"], "--caption-normalization applies to"),
                         (["--retrieval-data", str(jsonl), "--retrieval-image-root", str(tmp_path / "no")],
                          "--retrieval-image-root .*no such directory")):
        with pytest.raises(ConfigError, match=match):
            check_eval_data_arguments(parser.parse_args(flags))


def test_evaluator_transform_follows_the_model_config():
    """Old checkpoints (no preprocessing fields) keep shorter-side + crop; the release's weights squash."""
    from megatron_m2.config import M2Config, load_config
    from megatron_m2.eval.datasets import model_eval_transform

    old = {k: v for k, v in load_config("tiny").to_dict().items() if not k.startswith("image_")
           or k == "image_size"}
    config = M2Config(**old)
    assert config.image_resize_mode == "crop" and model_eval_transform(config).square is False
    squash = M2Config(**{**old, "image_resize_mode": "squash", "image_mean": [0.5] * 3})
    assert model_eval_transform(squash).square is True
    assert squash.image_mean == (0.5, 0.5, 0.5) and M2Config(**squash.to_dict()) == squash
    for field, value, match in (("image_resize_mode", "pad", "image_resize_mode 'pad'"),
                                ("image_interpolation", "bilinear", "image_interpolation"),
                                ("image_mean", [0.48, 0.46, 0.41], "image_mean")):
        bad = M2Config(**{**old, field: value})
        with pytest.raises(ConfigError, match=match):
            bad.validate()
        with pytest.raises(ConfigError, match=match):
            model_eval_transform(bad)


def test_retrieval_with_negative_similarities():
    # Image 0's only caption scores -0.5 against it, image 1's caption -0.2: a miss, whatever the sign.
    texts = torch.tensor([[-0.5, 0.0], [-0.2, 1.0]])
    scores = retrieval_metrics(torch.eye(2), texts, torch.tensor([0, 1]))
    assert scores["i2t_R@1"] == 50.0 and scores["t2i_R@1"] == 50.0


# ---------------------------------------------------------------- the demo's plot

def test_plot_training_curves_writes_a_png(tmp_path):
    from megatron_m2.plot import plot_training_curves

    evals = [{"iteration": 0, "en/top1": 9.0, "zh/top1": 11.0}, {"iteration": 50, "en/top1": 70.0, "zh/top1": 60.0}]
    history = {"iteration": list(range(0, 60, 10)), "loss": [4.0, 3.0, 2.5, 2.0, 1.8, 1.7], "eval": evals}
    path = plot_training_curves(history, str(tmp_path / "curves.png"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (900, 340)
        pixels = np.asarray(image.convert("RGB"))
    # Each curve was drawn, in its colour: loss tab:blue (left), en tab:orange and zh tab:red (right).
    for rgb, columns in (([31, 119, 180], slice(0, 450)), ([255, 127, 14], slice(450, None)),
                         ([214, 39, 40], slice(450, None))):
        assert (np.abs(pixels[:, columns].astype(int) - rgb).sum(-1) < 30).sum() > 20, rgb


# ---------------------------------------------------------------- python -m megatron_m2.eval: flag errors

@pytest.mark.parametrize("flags,message", [
    ([], "nothing to evaluate"),
    (["--zeroshot-data", "x"], "--zeroshot-classnames"),
    (["--retrieval-data", "r.jsonl", "--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--retrieval-data", "r.jsonl"], "no complete checkpoint"),
    (["--retrieval-data", "r.jsonl", "--iteration", "7"], "no complete checkpoint for --iteration 7"),
])
def test_evaluate_cli_errors_before_any_model(tmp_path, capsys, flags, message):
    from megatron_m2.eval.__main__ import main

    code = main(["--load", str(tmp_path / "ckpt"), "--tokenizer-model", "tok.model", *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_hard_negative_accuracy_scores_both_directions_and_counts_ties_against():
    from megatron_m2.eval.fine_grained import hard_negative_accuracy

    basis = torch.eye(4)
    images = torch.stack([basis[[0, 1]], basis[[2, 3]]])  # [pairs, 2, d]
    text, image = hard_negative_accuracy(images, images.clone())
    assert text.tolist() == [1.0, 1.0] and image.tolist() == [1.0, 1.0]
    text, image = hard_negative_accuracy(images, images.flip(1))  # captions swapped: every choice wrong
    assert text.tolist() == [0.0, 0.0] and image.tolist() == [0.0, 0.0]
    text, image = hard_negative_accuracy(torch.ones(2, 2, 4), torch.ones(2, 2, 4))  # collapsed: ties lose
    assert text.tolist() == [0.0, 0.0] and image.tolist() == [0.0, 0.0]
    # the two images of a pair look the same: each caption ties between them (image score 0) and both images
    # prefer the first caption (text score: right for image 0, wrong for image 1)
    text, image = hard_negative_accuracy(torch.stack([basis[[0, 0]], basis[[2, 2]]]), images)
    assert text.tolist() == [0.5, 0.5] and image.tolist() == [0.0, 0.0]


def test_evaluate_fine_grained_per_language_and_kind(tmp_path):
    from megatron_m2.eval.fine_grained import evaluate_fine_grained

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (128, 128, 128)}
    for name, colour in colours.items():
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{name}.png")
    rows = [{"kind": "position", "images": ["red.png", "green.png"],
             "captions": {"en": ["red", "green"], "zh": ["红", "绿"]}},
            {"kind": "count", "images": ["blue.png", "grey.png"],
             "captions": {"en": ["blue", "grey"], "zh": ["蓝", "绿"]}}]  # zh: the second caption is wrong
    _write_jsonl(tmp_path / "fine.jsonl", rows)
    vectors = {"red": 0, "green": 1, "blue": 2, "grey": 3, "红": 0, "绿": 1, "蓝": 2}

    def encode_images(batch):  # an image's embedding: its colour's basis vector
        keys = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]
        rgb = [tuple(int(round(v)) for v in ((image[:, 0, 0] * 0.5 + 0.5) * 255).tolist()) for image in batch]
        return torch.eye(4)[[keys.index(c) for c in rgb]]

    def encode_texts(texts):
        return torch.eye(4)[[vectors[t] for t in texts]]

    from megatron_m2.data.transforms import eval_transform

    results = evaluate_fine_grained(str(tmp_path / "fine.jsonl"), encode_images, encode_texts, eval_transform(4),
                                    batch_size=3)
    assert results["en/position"] == results["en/count"] == results["zh/position"] == 100.0
    # zh count pair: grey's caption is 绿 (green): grey scores 0 with both captions (a tie: wrong), and 绿 prefers
    # neither image (wrong); blue's side is right: text 1/2, image 1/2
    assert results["zh/count"] == 50.0 and results["zh/mean"] == 75.0 and results["mean"] == 87.5


def test_fine_grained_file_errors(tmp_path):
    from megatron_m2.eval.fine_grained import read_fine_grained_records

    with pytest.raises(ConfigError, match="--fine-grained-data .*no such file"):
        read_fine_grained_records(str(tmp_path / "missing.jsonl"))
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    for row, match in (({"kind": "x", "images": ["a.png"], "captions": {"en": ["1", "2"]}}, "exactly two images"),
                       ({"kind": "x", "images": ["a.png", "b.png"], "captions": {"en": ["1", "2"]}}, "not found"),
                       ({"images": ["a.png", "a.png"]}, "expected")):
        _write_jsonl(tmp_path / "bad.jsonl", [row])
        with pytest.raises(ConfigError, match=match):
            read_fine_grained_records(str(tmp_path / "bad.jsonl"))
