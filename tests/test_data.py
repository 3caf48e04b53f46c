"""Data path: shard resolution, tar reading with skip counters, DP sharding, exact resume, transforms."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_m2.data.loader import ImageTextBatches
from megatron_m2.data.shards import ShardStream, expand_braces, resolve_shards
from megatron_m2.data.transforms import eval_transform, normalize, random_resized_crop_box, to_tensor, train_transform
from megatron_m2.errors import ConfigError


def image_bytes(color, size=(12, 10), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list) -> Path:
    """samples: (key, {extension: bytes}) in file order, as webdataset writes them."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str, i: int) -> tuple:
    # Noise, not a flat colour: a different crop or flip must give a different tensor.
    pixels = np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return key, {"png": buf.getvalue(), "txt": f"caption {i}".encode()}


def make_dataset(root: Path, num_shards: int, per_shard: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = [good(f"{s:02d}{j:04d}", s * per_shard + j) for j in range(per_shard)]
        paths.append(str(write_shard(root / f"shard-{s:05d}.tar", samples)))
    return paths


def keys(stream, n):
    return [next(stream).key for _ in range(n)]


# -- shard specs ----------------------------------------------------------------------------------------------

def test_expand_braces():
    assert expand_braces("d/s-{000..002}.tar") == ["d/s-000.tar", "d/s-001.tar", "d/s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    # What the hand-written expansion got wrong: steps, letter ranges, nested braces, zero padding across widths.
    assert expand_braces("s-{0..10..5}.tar") == ["s-0.tar", "s-5.tar", "s-10.tar"]
    assert expand_braces("s-{000..010..4}") == ["s-000", "s-004", "s-008"]
    assert expand_braces("{a..d}") == ["a", "b", "c", "d"]
    assert expand_braces("{zh,en/{x,y}}.tar") == ["zh.tar", "en/x.tar", "en/y.tar"]
    assert expand_braces("{08..11}") == ["08", "09", "10", "11"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    with pytest.raises(ConfigError, match="--data-path .*unbalanced braces"):
        expand_braces("s-{000..002.tar")


def test_resolve_shards_braces_then_globs_and_directories(tmp_path):
    zh, en = make_dataset(tmp_path / "zh", 2, 1), make_dataset(tmp_path / "en", 2, 1)
    assert resolve_shards(str(tmp_path / "{zh,en}")) == zh + en  # braces expand into directories
    assert resolve_shards(str(tmp_path / "{en,zh}" / "*-0000[1].tar")) == [en[1], zh[1]]
    assert resolve_shards(str(tmp_path / "zh" / "shard-{00000..00001..1}.tar")) == zh
    with pytest.raises(ConfigError, match=r"--data-path .*1 of 2 shards are missing"):
        resolve_shards(str(tmp_path / "{zh,fr}"))


def test_resolve_shards_dir_brace_glob_and_errors(tmp_path):
    paths = make_dataset(tmp_path / "d", 3, 1)
    assert resolve_shards(str(tmp_path / "d")) == paths
    assert resolve_shards(str(tmp_path / "d" / "shard-{00000..00002}.tar")) == paths
    assert resolve_shards([str(tmp_path / "d" / "shard-*.tar"), paths[0]]) == paths  # duplicates dropped
    with pytest.raises(ConfigError, match=r"--data-path .*1 of 4 shards are missing"):
        resolve_shards(str(tmp_path / "d" / "shard-{00000..00003}.tar"))
    with pytest.raises(ConfigError, match="--data-path .*no such file"):
        resolve_shards([str(tmp_path / "nope.tar")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--data-path .*no \\*.tar shard"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="--data-path"):
        resolve_shards([])


# -- reading and skipping -------------------------------------------------------------------------------------

def test_reader_groups_members_and_counts_skips(tmp_path):
    caption_json = json.dumps({"caption": " 一只猫 ", "lang": "zh", "url": "x"}).encode()
    shard = write_shard(tmp_path / "a.tar", [
        ("sub/k0", {"jpg": image_bytes("red", fmt="JPEG"), "txt": b"a red square", "json": b'{"lang": "en"}'}),
        ("sub/k1", {"png": image_bytes("blue"), "json": caption_json}),
        ("sub/k2", {"txt": b"no image"}),
        ("sub/k3", {"jpg": image_bytes("red", fmt="JPEG")}),
        ("sub/k4", {"jpg": image_bytes("red", fmt="JPEG"), "txt": b"  \n"}),
        ("sub/k5", {"jpg": image_bytes("red", fmt="JPEG"), "txt": b"\xff\xfe caf\xe9"}),
        ("sub/k6", {"jpg": image_bytes("red", fmt="JPEG"), "json": b"{not json"}),
        ("sub/k7", {"webp": image_bytes("green", fmt="WEBP"), "txt": "绿色".encode()}),
    ])
    stream = ShardStream([str(shard)], shuffle_window=1)
    got = [next(stream) for _ in range(3)]
    assert [(s.key, s.image_ext, s.caption, s.lang) for s in got] == [
        ("sub/k0", "jpg", "a red square", "en"), ("sub/k1", "png", "一只猫", "zh"), ("sub/k7", "webp", "绿色", None)]
    assert Image.open(io.BytesIO(got[1].image)).getpixel((0, 0)) == (0, 0, 255)
    assert dict(stream.stats) == {"missing_image": 1, "missing_caption": 1, "empty_caption": 1, "bad_utf8": 1,
                                  "bad_json": 1}
    assert keys(stream, 3) == ["sub/k0", "sub/k1", "sub/k7"]  # second epoch; skips are counted again
    assert stream.epoch == 1 and stream.stats["missing_image"] == 2 and stream.stats["bad_json"] == 2


def test_corrupt_image_and_truncated_shard_are_skipped_and_counted(tmp_path, tokenizer):
    shard = write_shard(tmp_path / "a.tar", [good("k0", 0), ("k1", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"x"}),
                                             good("k2", 2), good("k3", 3)])
    cut = write_shard(tmp_path / "b.tar", [good("m0", 5), good("m1", 6)])
    with tarfile.open(cut) as tar:
        m1 = tar.getmember("m1.png")
    cut.write_bytes(cut.read_bytes()[:m1.offset_data + m1.size // 2])  # a copy that stopped inside m1.png
    batches = ImageTextBatches([str(shard), str(cut)], tokenizer, eval_transform(8), micro_batch_size=3,
                               shuffle_window=1)
    batch = next(batches)
    assert batch["images"].shape == (3, 3, 8, 8)
    name = batches.names[0]
    assert batches.stats[f"data/{name}/skipped/corrupt_image"] == 1 and batches.stats[f"data/{name}/samples"] == 3
    next(batches)  # reads the truncated shard and wraps into the next epoch
    assert batches.stats[f"data/{name}/skipped/corrupt_shard"] >= 1
    assert batches.stats["data/skipped"] == batches.stats[f"data/{name}/skipped"] >= 2


def test_an_epoch_without_usable_samples_is_an_error(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [("k0", {"txt": b"no image"})])
    with pytest.raises(ConfigError, match="--data-path: data-parallel rank 0 found no usable sample"):
        next(ShardStream([str(shard)]))


# -- data-parallel split and epochs ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards, dp_size", [(4, 2), (2, 4), (3, 2)])
def test_dp_ranks_read_disjoint_shares_covering_the_epoch(tmp_path, num_shards, dp_size):
    paths = make_dataset(tmp_path, num_shards, 5)
    everything = {f"{s:02d}{j:04d}" for s in range(num_shards) for j in range(5)}
    seen = []
    for rank in range(dp_size):
        stream = ShardStream(paths, rank, dp_size, seed=3, shuffle_window=4)
        got = []
        while True:
            sample = next(stream)
            if stream.epoch > 0:
                break
            got.append(sample.key)
        seen.append(got)
        # The same (seed, rank) gives the same stream: TP/PP peers of a replica read identical data.
        twin = ShardStream(paths, rank, dp_size, seed=3, shuffle_window=4)
        assert keys(twin, len(got)) == got
    flat = [k for got in seen for k in got]
    assert len(flat) == len(set(flat)) and set(flat) == everything
    if num_shards >= dp_size:  # whole shards per rank
        for got in seen:
            assert len({k[:2] for k in got}) == len(got) // 5


def test_epochs_reshuffle_with_seed(tmp_path):
    paths = make_dataset(tmp_path, 6, 4)
    stream = ShardStream(paths, seed=0, shuffle_window=4)
    epoch0, epoch1 = keys(stream, 24), keys(stream, 24)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert stream.plan(0) != stream.plan(1)  # the shard order itself changes per epoch
    assert keys(ShardStream(paths, seed=0, shuffle_window=4), 24) == epoch0
    assert keys(ShardStream(paths, seed=1, shuffle_window=4), 24) != epoch0
    # Within-shard windows are shuffled too, not only the shard order.
    assert [k[2:] for k in epoch0[:4]] != ["0000", "0001", "0002", "0003"] or \
        [k[2:] for k in epoch0[4:8]] != ["0000", "0001", "0002", "0003"]


# -- exact resume ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_m2.data.tokenizer import GLMTokenizer

    from tests.glm import GLM_MODEL

    if not GLM_MODEL.exists():
        pytest.skip(f"GLM SentencePiece model not found at {GLM_MODEL} (set M2_GLM_MODEL)")
    return GLMTokenizer(str(GLM_MODEL), max_length=8)


@pytest.mark.parametrize("num_shards, dp_rank, dp_size, n_before", [(3, 0, 1, 2), (3, 1, 2, 3), (1, 1, 2, 4)])
def test_resume_continues_with_exactly_the_next_batches(tmp_path, tokenizer, num_shards, dp_rank, dp_size,
                                                        n_before):
    # 7 samples per shard, window 3, batch 2: saves land mid-window, mid-shard and across epochs.
    paths = make_dataset(tmp_path, num_shards, 7)

    def batches():
        return ImageTextBatches(paths, tokenizer, train_transform(8), 2, dp_rank, dp_size, seed=5, shuffle_window=3)

    first = batches()
    for _ in range(n_before):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint round trip
    expected = [next(first) for _ in range(6)]
    resumed = batches()
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(6))):
        for name in ("images", "text_ids", "text_padding_mask"):
            assert torch.equal(want[name], got[name]), name
    assert resumed.stats == first.stats
    # Augmentation is random: the same sample in another epoch gets another crop.
    assert not torch.equal(expected[0]["images"], expected[-1]["images"])


def test_a_position_saved_before_blending_still_resumes(tmp_path, tokenizer):
    paths = make_dataset(tmp_path, 2, 4)
    first = ImageTextBatches(paths, tokenizer, train_transform(8), 3, seed=5, shuffle_window=3)
    next(first), next(first)
    stream = first.state_dict()["sources"][0]["stream"]
    old = {**stream, "stats": {**stream["stats"], "samples": 6}}  # the old format: one ShardStream's state
    old.pop("source")
    resumed = ImageTextBatches(paths, tokenizer, train_transform(8), 3, seed=5, shuffle_window=3)
    resumed.load_state_dict(old)
    want, got = next(first), next(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want) and resumed.stats == first.stats


def test_resume_with_another_layout_is_refused(tmp_path, tokenizer):
    paths = make_dataset(tmp_path, 2, 3)
    state = ShardStream(paths, 0, 2, seed=1).state_dict()
    with pytest.raises(ConfigError, match="--seed"):
        ShardStream(paths, 0, 1, seed=1).load_state_dict(state)


# -- transforms -----------------------------------------------------------------------------------------------

def test_eval_transform_resizes_shorter_side_and_center_crops():
    # Three vertical bands red | green | blue on a 3:1 image: the center crop is all green.
    image = Image.new("RGB", (48, 16))
    for x0, color in ((0, (255, 0, 0)), (16, (0, 255, 0)), (32, (0, 0, 255))):
        image.paste(color, (x0, 0, x0 + 16, 16))
    out = eval_transform(8)(image)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32  # evaluation batches stay float
    assert torch.allclose(out[:, 2:6, 2:6], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1), atol=1e-5)
    # square=True (the official release's inference transform) keeps all three bands, squashed.
    squashed = eval_transform(9, square=True)(image)
    assert squashed.shape == (3, 9, 9)
    for column, channel in ((0, 0), (4, 1), (8, 2)):
        expected = -torch.ones(3)
        expected[channel] = 1.0
        assert torch.allclose(squashed[:, 4, column], expected, atol=0.05)


@pytest.mark.parametrize("mode, color", [("L", 128), ("RGBA", (10, 20, 30, 0)), ("P", 3), ("RGB", (1, 2, 3))])
def test_transforms_convert_any_mode_to_normalised_rgb(mode, color):
    image = Image.new(mode, (20, 14), color)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)[0, 0] / 255
    # The train transform gives uint8 (normalised on the device), the eval transform float.
    for transform, post in ((eval_transform(8), lambda x: x), (train_transform(8, 0), normalize)):
        out = transform(image)
        assert out.shape == (3, 8, 8)
        assert torch.allclose(post(out)[:, 4, 4], torch.from_numpy((rgb - 0.5) / 0.5), atol=1e-5)


def test_train_transform_is_uint8_and_normalize_matches_the_float_path():
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = train_transform(16)(image, rng=np.random.default_rng(3))
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16) and out.is_contiguous()
    # The same crop through the float path: normalize(uint8) is bit-identical to the old normalised tensor.
    left, top, w, h = random_resized_crop_box(40, 30, np.random.default_rng(3))
    crop = image.resize((16, 16), Image.BICUBIC, box=(left, top, left + w, top + h))
    flip = np.random.default_rng(3)
    random_resized_crop_box(40, 30, flip)
    if flip.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    assert torch.equal(normalize(out), to_tensor(crop))
    assert torch.equal(normalize(out[None].expand(2, -1, -1, -1)), to_tensor(crop)[None].expand(2, -1, -1, -1))


def test_random_resized_crop_box_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(100, 100, rng)
        assert 0.8 * 10000 * 0.97 <= w * h <= 10000 and 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 100


def test_train_transform_flips_and_is_deterministic_given_rng():
    image = Image.new("RGB", (32, 32))
    image.paste((255, 255, 255), (16, 0, 32, 32))  # left black, right white
    transform = train_transform(16)
    lefts = [transform(image, rng=np.random.default_rng(i))[0, 8, 0].item() for i in range(40)]
    assert {0, 255} <= set(lefts)  # both orientations occur
    a = transform(image, rng=np.random.default_rng(7))
    assert torch.equal(a, transform(image, rng=np.random.default_rng(7)))
    assert torch.equal(train_transform(16, 3)(image), train_transform(16, 3)(image))


def test_no_hflip_keeps_the_orientation_and_the_same_crops():
    image = Image.new("RGB", (32, 32))
    image.paste((255, 255, 255), (16, 0, 32, 32))  # left black, right white
    flipping, keeping = train_transform(16), train_transform(16, hflip=False)
    outputs = [(flipping(image, rng=np.random.default_rng(i)), keeping(image, rng=np.random.default_rng(i)))
               for i in range(40)]
    assert all(kept[0, 8, 0].item() == 0 for _, kept in outputs)
    # The flip is still drawn, so both transforms crop alike: equal up to the mirror.
    assert all(torch.equal(kept, flipped) or torch.equal(kept.flip(-1), flipped) for flipped, kept in outputs)
    assert any(not torch.equal(kept, flipped) for flipped, kept in outputs)


# -- tools/make_shards.py -------------------------------------------------------------------------------------

def test_make_shards_from_csv_and_read_back(tmp_path, tokenizer, capsys):
    import csv

    from tools.make_shards import main

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(7):
        pixels = np.random.default_rng(i).integers(0, 256, (9, 11, 3), dtype=np.uint8)
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")][i % 4]
        Image.fromarray(pixels).save(images / f"{i}.{ext}", format=fmt)
        rows.append({"image": f"images/{i}.{ext}", "caption": f"图片 {i} picture", "lang": "zh" if i % 2 else "en"})
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.insert(2, {"image": "images/corrupt.jpg", "caption": "corrupt", "lang": ""})
    rows.insert(4, {"image": "images/0.jpg", "caption": "   ", "lang": ""})
    rows.append({"image": "images/missing.png", "caption": "missing", "lang": ""})
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["image", "caption", "lang"])
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "shards"
    assert main([str(tmp_path / "pairs.csv"), "--output-dir", str(out), "--samples-per-shard", "3",
                 "--log-every", "2"]) == 0
    printed = capsys.readouterr()
    assert "samples/s" in printed.out and "wrote 7 samples in 3 shards" in printed.out
    assert "skipped row 4: unreadable image" in printed.err and "skipped row 6: empty caption" in printed.err
    assert "image not found" in printed.err
    shards = resolve_shards(str(out / "shard-{00000..00002}.tar"))
    assert not list(out.glob("*.tmp"))

    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        # JPEG and PNG are copied byte for byte; WebP and BMP re-encoded.
        assert tar.extractfile("000000000.jpg").read() == (images / "0.jpg").read_bytes()
        assert tar.extractfile("000000001.png").read() == (images / "1.png").read_bytes()
        assert "000000002.jpg" in names
    stream = ShardStream(shards, shuffle_window=1)
    got = sorted((next(stream) for _ in range(7)), key=lambda s: s.key)  # the shard order is shuffled
    assert [s.key for s in got] == [f"{i:09d}" for i in range(7)]
    assert [(s.caption, s.lang) for s in got] == [(r["caption"], r["lang"] or None) for r in rows
                                                  if r["caption"].strip() and "corrupt" not in r["image"]
                                                  and "missing" not in r["image"]]
    assert sum(stream.stats.values()) == 0
    batch = next(ImageTextBatches(shards, tokenizer, train_transform(8), 4, seed=0))
    assert batch["images"].shape == (4, 3, 8, 8) and batch["text_ids"].shape == (4, 8)


def test_make_shards_rejects_a_csv_without_the_columns(tmp_path, capsys):
    from tools.make_shards import main

    (tmp_path / "pairs.csv").write_text("path,text\na.jpg,hello\n")
    assert main([str(tmp_path / "pairs.csv"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "lacks the column(s) ['image', 'caption']" in capsys.readouterr().err


@pytest.mark.parametrize("num_samples", [1, 2, 9])  # epochs shorter than, within and longer than a batch
def test_only_corrupt_images_is_an_error_not_a_hang(tmp_path, tokenizer, num_samples):
    shard = write_shard(tmp_path / "a.tar", [(f"k{i}", {"jpg": b"garbage", "txt": b"x"}) for i in range(num_samples)])
    batches = ImageTextBatches([str(shard)], tokenizer, eval_transform(8), 4)
    with pytest.raises(ConfigError, match="--data-path: data-parallel rank 0 .* in a whole epoch"):
        next(batches)


def test_make_shards_from_jsonl_keeps_lang_and_reports_bad_lines(tmp_path, capsys):
    from tools.make_shards import main

    Image.new("RGB", (9, 7), "red").save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": "红色", "lang": "zh"}, ensure_ascii=False), "{broken",
             json.dumps({"image": str(tmp_path / "a.png"), "caption": "red"})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main([str(tmp_path / "pairs.jsonl"), "--output-dir", str(tmp_path / "out")]) == 0
    assert "skipped row 2: not JSON" in capsys.readouterr().err
    stream = ShardStream(resolve_shards(str(tmp_path / "out")), shuffle_window=1)
    assert [(s.caption, s.lang, s.image_ext) for s in (next(stream), next(stream))] == [
        ("红色", "zh", "png"), ("red", None, "png")]


# -- in a real process layout: one decode per model replica -------------------------------------------------

def _replica_batches(shard_dir: str, tokenizer_path: str, tp: int, pp: int, num_batches: int = 3,
                     corrupt_dir: str = "") -> dict:
    """On every rank: build this rank's training data at TP x PP, count its decodes, take a few micro-batches."""
    from megatron.core import parallel_state

    from megatron_m2 import parallel
    from megatron_m2.config import load_config
    from megatron_m2.data import build_replica_train_data, load_tokenizer, loader

    parallel.initialize_model_parallel(tp, pp)
    config = load_config("tiny")
    decodes, built = [0], [0]
    real_decode, real_init = loader.decode_image, loader.ImageTextBatches.__init__

    def counting_decode(data):
        decodes[0] += 1
        return real_decode(data)

    def counting_init(self, *args, **kwargs):
        built[0] += 1
        real_init(self, *args, **kwargs)

    loader.decode_image, loader.ImageTextBatches.__init__ = counting_decode, counting_init
    try:
        tokenizer = load_tokenizer(tokenizer_path, config.max_text_length)
        data = build_replica_train_data(shard_dir, tokenizer, config, 2, seed=11)
        batches = [next(data) for _ in range(num_batches)]
        result = {"rank": torch.distributed.get_rank(), "dp_rank": parallel_state.get_data_parallel_rank(),
                  "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                  "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                  "decodes": decodes[0], "built": built[0], "reader": data.is_reader,
                  "image_devices": {b["images"].device.type for b in batches},
                  "image_shapes": {tuple(b["images"].shape) for b in batches},
                  "text_ids": torch.cat([b["text_ids"] for b in batches]),
                  "text_padding_mask": torch.cat([b["text_padding_mask"] for b in batches]),
                  "stats_keys": sorted(data.stats), "state": data.state_dict()}
        if data.is_reader or batches[0]["images"].device.type != "meta":
            result["images"] = torch.cat([b["images"] for b in batches])
        data.load_state_dict(result["state"])  # harmless on every rank
        if corrupt_dir:  # the reader fails: its peers must raise too, not wait in the broadcast
            bad = build_replica_train_data(corrupt_dir, tokenizer, config, 2, seed=11)
            try:
                next(bad)
                result["error"] = None
            except Exception as exc:  # noqa: BLE001 - reported back, so the pool stays up
                result["error"] = f"{type(exc).__name__}: {exc}"
        data.close()
        return result
    finally:
        loader.decode_image, loader.ImageTextBatches.__init__ = real_decode, real_init


@pytest.mark.slow  # starts the shared 4-process pool if no other test has (about 30 s on 2 busy cores)
def test_tp_peers_read_identical_batches_and_dp_ranks_disjoint_ones(tmp_path, tokenizer):
    from megatron_m2.testing import run_distributed

    make_dataset(tmp_path / "shards", 4, 3)  # 12 samples; DP=2 reads 6 each
    results = run_distributed(4, _replica_batches, str(tmp_path / "shards"), tokenizer.model_path, 2, 1)
    by_dp = {}
    for result in results:
        by_dp.setdefault(result["dp_rank"], []).append(result)
    assert sorted(by_dp) == [0, 1] and all(len(peers) == 2 for peers in by_dp.values())
    for first, second in by_dp.values():
        assert torch.equal(first["images"], second["images"]) and torch.equal(first["text_ids"], second["text_ids"])
        # one decode per replica: TP rank 0 reads, its peer receives
        assert (first["tp_rank"], first["decodes"], first["built"]) == (0, 6, 1)
        assert (second["tp_rank"], second["decodes"], second["built"]) == (1, 0, 0)
    captions = [{tuple(row.tolist()) for row in by_dp[r][0]["text_ids"]} for r in (0, 1)]
    assert len(captions[0]) == len(captions[1]) == 6 and not captions[0] & captions[1]


@pytest.mark.slow
def test_one_decode_per_replica_at_tp2_pp2(tmp_path, tokenizer):
    from megatron_m2.testing import run_distributed

    make_dataset(tmp_path / "shards", 2, 5)
    (tmp_path / "bad").mkdir()
    bad = write_shard(tmp_path / "bad" / "a.tar", [(f"k{i}", {"jpg": b"garbage", "txt": b"x"}) for i in range(3)])
    results = run_distributed(4, _replica_batches, str(tmp_path / "shards"), tokenizer.model_path, 2, 2,
                              corrupt_dir=str(bad.parent))
    by_coords = {(r["pp_rank"], r["tp_rank"]): r for r in results}
    assert sorted(by_coords) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    reader = by_coords[(0, 0)]
    # Only the reader decodes (3 micro-batches of 2) and only it builds a shard reader.
    assert [(by_coords[c]["decodes"], by_coords[c]["built"], by_coords[c]["reader"]) for c in sorted(by_coords)] == [
        (6, 1, True), (0, 0, False), (0, 0, False), (0, 0, False)]
    # Its TP peer on the first stage gets the same pixels; stage 2 gets the same text and meta images of the shape.
    assert torch.equal(by_coords[(0, 1)]["images"], reader["images"]) and reader["images"].dtype == torch.uint8
    for c, r in by_coords.items():
        assert torch.equal(r["text_ids"], reader["text_ids"]), c
        assert torch.equal(r["text_padding_mask"], reader["text_padding_mask"]), c
        assert r["image_shapes"] == {(2, 3, 32, 32)}, c  # the tiny preset's image size
        assert r["image_devices"] == ({"meta"} if c[0] == 1 else {"cpu"}), c
        assert r["stats_keys"] == reader["stats_keys"]  # the same keys everywhere, for reduce_stats
    assert "sources" in reader["state"] and by_coords[(1, 1)]["state"] == {"reader": False}
    # A failing reader raises its own error; its three peers raise instead of hanging in the broadcast.
    assert reader["error"].startswith("ConfigError: --data-path: data-parallel rank 0 decoded no image")
    for c in [(0, 1), (1, 0), (1, 1)]:
        assert by_coords[c]["error"].startswith("RuntimeError: rank ") and "data-reading rank 0" in \
            by_coords[c]["error"], by_coords[c]["error"]
