"""The embedded digits data set: written, read back with the project's readers, bilingual, splits disjoint."""
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_m2.data.digits import DIGIT_CLASS_NAMES, render_digit, split_indices, write_digits_dataset
from megatron_m2.data.shards import iter_tar_groups, parse_group, resolve_shards
from megatron_m2.errors import ConfigError
from megatron_m2.eval.datasets import ImageFolderWithClassNames, read_retrieval_records, read_lines_file

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_dataset(str(tmp_path_factory.mktemp("digits")), image_size=32, seed=0)


@pytest.fixture(scope="module")
def train_samples(digits):
    stats = Counter()
    samples = []
    for shard in resolve_shards(digits.train_dir):
        for key, members in iter_tar_groups(shard, stats):
            assert set(members) == {"png", "txt", "json"}, key  # members grouped by key
            image, ext, caption, lang = parse_group(key, members)
            samples.append((key, image, caption, lang, json.loads(members["json"])))
    assert not stats, stats  # nothing skipped by the project's reader
    return samples


def _label_from_caption(caption, lang):
    """The digit a caption names: the numeral, else the class word (English words are whole words)."""
    numerals = re.findall(r"\d", caption)
    if numerals:
        return int(numerals[0])
    names = DIGIT_CLASS_NAMES[lang]
    found = [i for i, n in enumerate(names) if (re.search(rf"\b{n}\b", caption) if lang == "en" else n in caption)]
    assert len(found) == 1, caption
    return found[0]


def _eval_items(digits):
    items = []
    for class_dir in sorted(os.listdir(digits.eval_dir)):
        for name in sorted(os.listdir(os.path.join(digits.eval_dir, class_dir))):
            items.append((int(class_dir[:2]), int(name.split(".")[0]), os.path.join(digits.eval_dir, class_dir, name)))
    return items


def test_train_shards_are_bilingual_with_matching_captions(digits, train_samples):
    keys = [s[0] for s in train_samples]
    assert len(keys) == len(set(keys)) == 2 * digits.num_train_images
    langs_by_index = {}
    for key, image, caption, lang, meta in train_samples:
        assert meta["lang"] == lang and meta["caption"] == caption
        assert _label_from_caption(caption, lang) == meta["label"]
        has_cjk = bool(re.search(r"[\u4e00-\u9fff]", caption))
        assert has_cjk == (lang == "zh"), caption
        langs_by_index.setdefault(meta["index"], []).append(lang)
    assert all(sorted(v) == ["en", "zh"] for v in langs_by_index.values())  # each image once per language
    assert len({s[2] for s in train_samples}) >= 40  # varied templates, not one caption per class
    captions = Path(digits.captions).read_text(encoding="utf-8").splitlines()
    assert sorted(captions) == sorted(s[2] for s in train_samples)


def test_splits_are_disjoint_stratified_and_complete(digits, train_samples):
    train = {s[4]["index"] for s in train_samples}
    held_out = [index for _, index, _ in _eval_items(digits)]
    assert len(held_out) == digits.num_eval_images and not train & set(held_out)
    assert train | set(held_out) == set(range(NUM_DIGITS))
    assert digits.num_eval_images == pytest.approx(0.2 * NUM_DIGITS, abs=10)
    per_class = Counter(label for label, _, _ in _eval_items(digits))
    assert set(per_class) == set(range(10)) and min(per_class.values()) >= 30


def test_images_are_the_right_digits(digits, train_samples):
    from sklearn.datasets import load_digits

    source = load_digits()
    for label, index, path in _eval_items(digits)[::37]:
        assert source.target[index] == label
        image = Image.open(path)
        assert image.mode == "RGB" and image.size == (32, 32)
        assert np.array_equal(np.asarray(image), np.asarray(render_digit(source.images[index], 32)))
    # Pixels and caption agree: nearest class centroid of the train images (labels read from the captions)
    # classifies the held-out images far above chance, so images, captions and folders are aligned.
    centroids = np.zeros((10, 32 * 32))
    counts = np.zeros(10)
    for _, image, caption, lang, _ in train_samples[::2]:
        label = _label_from_caption(caption, lang)
        centroids[label] += np.asarray(Image.open(io.BytesIO(image)).convert("L"), dtype=float).ravel()
        counts[label] += 1
    centroids /= counts[:, None]
    items = _eval_items(digits)
    pixels = np.stack([np.asarray(Image.open(p).convert("L"), dtype=float).ravel() for _, _, p in items])
    predicted = ((pixels[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == np.array([label for label, _, _ in items])).mean() > 0.8


def test_eval_files_read_by_the_eval_readers(digits):
    ds = ImageFolderWithClassNames(digits.eval_dir, digits.classnames, lambda image: image,
                                   template_files=digits.templates)
    assert len(ds) == digits.num_eval_images
    assert ds.class_names == DIGIT_CLASS_NAMES and set(ds.templates) == {"en", "zh"}
    assert ds.class_dirs[7] == "07_seven"
    records = read_retrieval_records(digits.retrieval)
    assert len(records) == 10
    for label, record in enumerate(records):
        assert f"/{label:02d}_" in record.image and len(record.captions) == 4
        assert [bool(re.search(r"[\u4e00-\u9fff]", c)) for c in record.captions] == [False, False, True, True]
        assert all(_label_from_caption(c, "zh" if i >= 2 else "en") == label for i, c in enumerate(record.captions))
    assert read_lines_file(digits.captions, "--input")


def test_deterministic_given_the_seed(digits, tmp_path):
    again = write_digits_dataset(str(tmp_path / "a"), seed=0)
    for ours, theirs in zip(digits.train_shards, again.train_shards):
        assert Path(ours).read_bytes() == Path(theirs).read_bytes()
    assert Path(digits.retrieval).read_text() == Path(again.retrieval).read_text()
    # Another seed, another split; written over the first with larger shards: no stale shard is left behind.
    other = write_digits_dataset(str(tmp_path / "a"), seed=1, samples_per_shard=10000)
    assert Path(other.retrieval).read_text() != Path(digits.retrieval).read_text()
    assert resolve_shards(other.train_dir) == other.train_shards and len(other.train_shards) == 1


def test_split_indices_errors_and_keeps_a_held_out_image_per_class():
    labels = np.repeat(np.arange(10), 3)
    train, held_out = split_indices(labels, 0.99, seed=0)
    assert sorted(Counter(labels[held_out]).values()) == [1] * 10 and len(train) == 20
    with pytest.raises(ConfigError, match="--train-fraction"):
        split_indices(labels, 1.0, seed=0)


def test_digit_templates_name_no_other_digit():
    from megatron_m2.data.digits import DIGIT_CAPTION_TEMPLATES, DIGIT_TEMPLATES

    # "一张" (a) would also name the digit 1 in every Chinese caption.
    for lang, names in DIGIT_CLASS_NAMES.items():
        for template in DIGIT_TEMPLATES[lang] + DIGIT_CAPTION_TEMPLATES[lang]:
            bare = template.replace("{}", "").replace("{name}", "").replace("{digit}", "")
            assert not re.search(r"\d", bare) and not any(
                (re.search(rf"\b{n}\b", bare) if lang == "en" else n in bare) for n in names), template


def test_composites_for_training_and_the_fine_grained_pairs(tmp_path):
    """Composites: train ones of train-split scans with captions that name them; held-out pairs whose captions differ
    only in position (the same two scans swapped) or count (two copies against three), read by the evaluator."""
    from megatron_m2.data.digits import COUNT_WORDS
    from megatron_m2.eval.fine_grained import read_fine_grained_records

    digits = write_digits_dataset(str(tmp_path / "d"), image_size=32, seed=0, composites=30, fine_grained_pairs=12)
    stats = Counter()
    samples = []
    for shard in resolve_shards(digits.train_dir):
        for key, members in iter_tar_groups(shard, stats):
            image, _, caption, lang = parse_group(key, members)
            samples.append((key, image, caption, lang, json.loads(members["json"])))
    composites = [s for s in samples if "kind" in s[4]]
    singles = [s for s in samples if "kind" not in s[4]]
    assert len(composites) == 60 and len(singles) == 2 * digits.num_train_images
    train = {s[4]["index"] for s in singles}
    for _, image, caption, lang, meta in composites:
        assert set(meta["indices"]) <= train and Image.open(io.BytesIO(image)).size == (32, 32)
        names = [DIGIT_CLASS_NAMES[lang][label] for label in meta["labels"]]
        if meta["kind"] == "count":
            assert COUNT_WORDS[lang][len(meta["labels"])] in caption and names[0] in caption, caption
        else:
            assert all(n in caption or str(label) in caption for n, label in zip(names, meta["labels"])), caption

    records = [json.loads(line) for line in Path(digits.fine_grained).read_text(encoding="utf-8").splitlines()]
    held_out = {index for _, index, _ in _eval_items(digits)}
    assert [r["kind"] for r in records].count("count") == 4 and len(records) == 12
    for record in records:
        first, second = record["indices"]
        assert set(first) | set(second) <= held_out
        if record["kind"] == "position":
            assert second == first[::-1]
            assert record["captions"]["en"][1] == " left of ".join(record["captions"]["en"][0][:-1].split(
                " left of ")[::-1]) + "."
        else:
            assert len(first) == 2 and second[:2] == first and len(second) == 3
    pairs = read_fine_grained_records(digits.fine_grained)
    assert len(pairs) == 12 and all(Path(p).is_file() for pair in pairs for p in pair.images)
