"""A run resumed at another data-parallel size continues the data (data/reshard.py), as Megatron-LM's
consumed-samples sampler does: no sample the old ranks read comes again before its epoch ends, every sample of
those epochs is read exactly once, and a blend keeps its exact mix."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_m2.data.blend import BlendedStream
from megatron_m2.data.loader import ImageTextBatches
from megatron_m2.data.reshard import reshard_loader_states, reshard_stream_positions
from megatron_m2.data.shards import ShardStream
from megatron_m2.data.transforms import train_transform
from tests.test_data import good, make_dataset, tokenizer, write_shard  # noqa: F401 - tokenizer is a fixture
from tests.test_data_workers import dataset_with_bad_samples


def _stream(paths, rank, size, state=None):
    stream = ShardStream(paths, rank, size, seed=3, shuffle_window=3)
    if state is not None:
        stream.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    return stream


def _usable_keys(paths) -> set:
    stream, keys = _stream(paths, 0, 1), set()
    while (sample := next(stream)).epoch == 0:
        keys.add(sample.key)
    return keys


@pytest.mark.parametrize("num_shards, old_size, new_size, reads", [
    (5, 2, 1, 8),  # whole shards per rank; the new rank takes both old ranks' remaining pieces
    (5, 2, 3, 8),  # more ranks than before
    (3, 2, 1, 10),  # old rank 1 reads one shard per epoch, rank 0 two: at the save they are in different epochs
    (2, 3, 2, 4),  # fewer shards than old ranks: every old rank kept one slot in three of every shard
    (3, 2, 4, 9),  # fewer remaining pieces than new ranks: pieces split into strided parts
])
def test_the_epochs_in_progress_are_read_exactly_once(tmp_path, num_shards, old_size, new_size, reads):
    paths = dataset_with_bad_samples(tmp_path / "d", num_shards, 7)  # skips too: corrupt images, no caption
    everything = _usable_keys(paths)
    read = Counter()  # (epoch, key) -> times read, old and new ranks together
    states = []
    for rank in range(old_size):
        stream = _stream(paths, rank, old_size)
        read.update((s.epoch, s.key) for s in (next(stream) for _ in range(reads)))
        states.append(stream.state_dict())
    last_epoch = max(state["epoch"] for state in states)
    for rank in range(new_size):
        stream = _stream(paths, rank, new_size, reshard_stream_positions(states, rank, new_size))
        while (sample := next(stream)).epoch <= last_epoch:
            read[sample.epoch, sample.key] += 1
        assert stream.epoch == last_epoch + 1  # and then the next epoch, at the new size
    for epoch in range(last_epoch + 1):
        assert {key for (e, key), n in read.items() if e == epoch} == everything, epoch
    assert set(read.values()) == {1}, [k for k, n in read.items() if n > 1]


def test_a_second_resize_continues_the_explicit_plan(tmp_path):
    paths = make_dataset(tmp_path / "d", 4, 6)
    everything = _usable_keys(paths)
    read, states = Counter(), []
    for rank in range(2):
        stream = _stream(paths, rank, 2)
        read.update((s.epoch, s.key) for s in (next(stream) for _ in range(5)))
        states.append(stream.state_dict())
    middle = []  # 2 -> 3 ranks, a few samples each (one finishes its share of epoch 0), then 3 -> 1
    for rank in range(3):
        stream = _stream(paths, rank, 3, reshard_stream_positions(states, rank, 3))
        read.update((s.epoch, s.key) for s in (next(stream) for _ in range(2)))
        middle.append(stream.state_dict())
    assert {state["epoch"] for state in middle} == {0, 1}
    stream = _stream(paths, 0, 1, reshard_stream_positions(middle, 0, 1))
    while (sample := next(stream)).epoch <= 1:
        read[sample.epoch, sample.key] += 1
    for epoch in (0, 1):
        assert {key for e, key in read if e == epoch} == everything
    assert set(read.values()) == {1}


def _blend(sources, rank, size):
    return BlendedStream(sources, rank, size, seed=4, shuffle_window=3)


def test_a_blend_resumed_at_another_size_keeps_its_mix_and_reads_nothing_twice(tmp_path):
    sources = [("zh", 0.7, dataset_with_bad_samples(tmp_path / "zh", 4, 7)),
               ("en", 0.3, make_dataset(tmp_path / "en", 2, 5))]
    read, states = Counter(), []
    for rank in range(2):  # DP 2, three steps of five samples
        blend = _blend(sources, rank, 2)
        read.update((i, s.epoch, s.key) for i, s in (next(blend) for _ in range(15)))
        states.append(blend)
    resumed = _blend(sources, 0, 1)  # DP 1
    for i, stream in enumerate(resumed.streams):
        stream.load_state_dict(reshard_stream_positions([b.streams[i].state_dict() for b in states], 0, 1))
    counts = [0, 0]
    for n in range(1, 41):
        i, sample = next(resumed)
        counts[i] += 1
        assert all(abs(c - w * n) < 1 for c, (_, w, _) in zip(counts, sources)), (n, counts)  # the exact mix
        if sample.epoch == 0:
            assert (i, 0, sample.key) not in read, (i, sample.key)  # not seen again before its epoch ends
        read[i, sample.epoch, sample.key] += 1
    assert set(read.values()) == {1}


def _captioned(root, prefix: str, num_shards: int, per_shard: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = []
        for j in range(per_shard):
            key, members = good(f"{s:02d}{j:04d}", s * per_shard + j)
            samples.append((key, {**members, "txt": f"{prefix}{s * per_shard + j}".encode()}))
        paths.append(str(write_shard(root / f"shard-{s:05d}.tar", samples)))
    return paths


def test_dp2_to_step_3_then_dp1_continues_the_loader(tmp_path, tokenizer):
    # the trainer's path (training/loop.py): every old rank's loader state from the checkpoint -> the new rank's
    blend = [(0.7, _captioned(tmp_path / "zh", "z", 6, 7)), (0.3, _captioned(tmp_path / "en", "e", 2, 10))]

    def loader(rank, size, workers=0):
        return ImageTextBatches(blend, tokenizer, train_transform(8), 5, rank, size, seed=4, shuffle_window=3,
                                num_workers=workers)

    seen, states, stats = set(), [], Counter()
    for rank in range(2):
        with loader(rank, 2) as batches:
            for _ in range(3):
                seen.update(map(tuple, next(batches)["text_ids"].tolist()))
            states.append(json.loads(json.dumps(batches.state_dict())))
            stats.update(batches.stats)
    assert len(seen) == 30
    with loader(0, 1, workers=2) as resumed:
        resumed.load_state_dict(reshard_loader_states(states, 0, 1))
        assert resumed.stats == dict(stats)  # the job's sample and skip counts go on
        for _ in range(3):  # within both sources' first epochs (21 of 42 and 9 of 20 samples read)
            rows = set(map(tuple, next(resumed)["text_ids"].tolist()))
            assert len(rows) == 5 and not rows & seen
            seen |= rows
        counts = [source["consumed"] for source in resumed.state_dict()["sources"]]
        assert sum(counts) == 15 and all(abs(c - w * 15) < 1 for c, (w, _) in zip(counts, blend))  # exact mix
