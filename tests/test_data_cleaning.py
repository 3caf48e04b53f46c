"""The M2 paper's data cleaning (--min-caption-chars, --max-aspect-ratio) and the release's RandAugment: what they
drop or change, their counts, and that batches stay identical for any worker count and after a resume."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.data.filters import SampleFilter, image_size
from megatron_m2.data.loader import ImageTextBatches
from megatron_m2.data.randaugment import OPS, RandAugment
from megatron_m2.data.shards import ShardStream
from megatron_m2.data.transforms import train_transform
from megatron_m2.errors import ConfigError
from tests.test_data import tokenizer, write_shard  # noqa: F401 - tokenizer is a fixture
from tests.test_data_workers import assert_same, take

# (width, height, caption): 4 of every 8 fail a rule of SampleFilter(5, 3), two per rule
_SHAPES = [(12, 10, "a red square"), (40, 10, "far too wide"), (12, 10, "abc"), (10, 12, "tall enough"),
           (10, 31, "far too tall"), (30, 10, "exactly three"), (12, 12, " 四个字  "), (12, 12, "五个汉字啊")]


def _jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _shards(root, num_shards=3, per_shard=8) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = []
        for j in range(per_shard):
            width, height, caption = _SHAPES[j % len(_SHAPES)]
            samples.append((f"{s:02d}{j:04d}", {"jpg": _jpeg(width, height, s * per_shard + j),
                                                "txt": caption.encode()}))
        paths.append(str(write_shard(root / f"shard-{s:05d}.tar", samples)))
    return paths


def test_the_rules_and_their_reasons():
    rules = SampleFilter(min_caption_chars=5, max_aspect_ratio=3)
    kept = [(w, h, c) for w, h, c in _SHAPES if rules.reject(c, _jpeg(w, h, 0)) is None]
    assert [c for _, _, c in kept] == ["a red square", "tall enough", "exactly three", "五个汉字啊"]
    assert rules.reject("abc", _jpeg(40, 10, 0)) == "short_caption"  # the caption is checked first
    assert rules.reject("long enough", _jpeg(40, 10, 0)) == "aspect_ratio"
    assert rules.reject("long enough", b"not an image") is None  # left to the decoder (corrupt_image)
    assert image_size(_jpeg(40, 10, 0)) == (40, 10)
    assert not SampleFilter().active and SampleFilter(0, 3).active
    for bad in (dict(min_caption_chars=-1), dict(max_aspect_ratio=0.5)):
        with pytest.raises(ConfigError, match="--m"):
            SampleFilter(**bad)


def test_filtered_samples_are_skipped_and_counted_per_reason(tmp_path):
    paths = _shards(tmp_path / "d")
    stream = ShardStream(paths, shuffle_window=4, sample_filter=SampleFilter(5, 3))
    captions = [next(stream).caption for _ in range(12)]  # one epoch holds 3 x 4 usable samples
    assert sorted(set(captions)) == sorted({"a red square", "tall enough", "exactly three", "五个汉字啊"})
    assert stream.stats["short_caption"] == 6 and stream.stats["aspect_ratio"] == 6
    unfiltered = ShardStream(paths, shuffle_window=4)
    assert len({next(unfiltered).caption for _ in range(24)}) == 8 and sum(unfiltered.stats.values()) == 0


def _loader(paths, tokenizer, num_workers, randaugment=(2, 7)):
    return ImageTextBatches(paths, tokenizer, train_transform(16, randaugment=randaugment), 4, seed=5,
                            shuffle_window=3, num_workers=num_workers, prefetch_factor=3,
                            sample_filter=SampleFilter(5, 3))


def test_filters_and_randaugment_keep_batches_identical_for_any_worker_count_and_resume(tmp_path, tokenizer):
    paths = _shards(tmp_path / "d")
    with _loader(paths, tokenizer, 0) as reference:
        expected = take(reference, 9)  # 36 samples: three epochs of 12
        stats = reference.stats
    name = next(k for k in stats if k.endswith("/skipped/aspect_ratio")).split("/")[1]
    for reason in ("short_caption", "aspect_ratio"):  # two epochs read whole (6 each), the third in part
        assert 12 <= stats[f"data/{name}/skipped/{reason}"] <= 18
    assert stats[f"data/{name}/samples"] == 36
    for workers in (1, 2):
        with _loader(paths, tokenizer, workers) as batches:
            assert_same(take(batches, 9), expected)
            assert batches.stats == stats
    with _loader(paths, tokenizer, 2) as first:
        take(first, 4)
        state = json.loads(json.dumps(first.state_dict()))
    with _loader(paths, tokenizer, 1) as resumed:
        resumed.load_state_dict(state)
        assert_same(take(resumed, 5), expected[4:])
    with _loader(paths, tokenizer, 0, randaugment=None) as plain:  # RandAugment changed the pixels, not the crops
        unaugmented = take(plain, 9)
    assert all(torch.equal(a["text_ids"], b["text_ids"]) for a, b in zip(unaugmented, expected))
    assert not all(torch.equal(a["images"], b["images"]) for a, b in zip(unaugmented, expected))


def test_randaugment_is_a_function_of_the_generator_and_follows_the_release():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    augment = RandAugment(2, 7)
    outputs = [np.asarray(augment(image, np.random.default_rng([1, k]))) for k in range(40)]
    again = [np.asarray(augment(image, np.random.default_rng([1, k]))) for k in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(outputs, again))
    unchanged = sum(np.array_equal(o, np.asarray(image)) for o in outputs)
    # each of the 2 draws applies with probability 1/2 (and Identity is 1 of 10 ops): ~1/4 + a little unchanged
    assert 3 <= unchanged <= 20 and len({o.tobytes() for o in outputs}) > 15
    assert list(OPS) == ["Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                         "TranslateX", "TranslateY", "Rotate"]
    flat = Image.new("RGB", (24, 24), (200, 100, 50))
    brighter = np.asarray(OPS["Brightness"](flat, 7, np.random.default_rng(0)))
    assert tuple(brighter[0, 0]) == (255, 136, 68)  # factor 0.7 * 1.8 + 0.1 = 1.36
    shifted = np.asarray(OPS["TranslateX"](flat, 7, np.random.default_rng(0)))  # 7 pixels, grey fill
    assert (shifted == 128).all(axis=2).sum(axis=1).tolist() == [7] * 24
    for bad in ((0, 7), (2, 11), (2, -1)):
        with pytest.raises(ConfigError, match="--randaugment"):
            RandAugment(*bad)


def test_flags_are_checked_before_anything_is_built():
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.config import load_config

    def check(*flags):
        args = build_parser().parse_args(["--data-path", "x", "--tokenizer-model", "y", *flags])
        args.model_config = load_config(args.model)
        return validate_args(args, world_size=1), args

    assert check("--randaugment", "2", "7")[1].randaugment == (2, 7.0)
    for flags, match in ((["--randaugment", "2.5", "7"], "whole number"), (["--randaugment", "2", "12"], "0, 10"),
                         (["--min-caption-chars", "-1"], "--min-caption-chars"),
                         (["--max-aspect-ratio", "0.5"], "--max-aspect-ratio")):
        with pytest.raises(ConfigError, match=match):
            check(*flags)


def test_make_shards_applies_the_papers_cleaning(tmp_path, capsys):
    import csv

    from tools.make_shards import main

    (tmp_path / "images").mkdir()
    rows = []
    for i, (width, height, caption) in enumerate(_SHAPES):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(_jpeg(width, height, i))
        rows.append({"image": f"images/{i}.jpg", "caption": caption})
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    assert main([str(tmp_path / "pairs.csv"), "--output-dir", str(tmp_path / "out"), "--min-caption-chars", "5",
                 "--max-aspect-ratio", "3"]) == 0
    printed = capsys.readouterr()
    assert "wrote 4 samples" in printed.out and "'short caption': 2" in printed.out
    assert "'aspect ratio': 2" in printed.out and "--max-aspect-ratio 3" in printed.err
