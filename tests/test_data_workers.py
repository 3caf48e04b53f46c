"""Data path: worker processes with prefetch, exact resume under read-ahead, shutdown, weighted blending."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_m2.data import build_train_data, default_num_workers, parse_data_path
from megatron_m2.data.blend import BlendedStream, name_sources, normalize_sources
from megatron_m2.data.loader import ImageTextBatches
from megatron_m2.data.transforms import train_transform
from megatron_m2.errors import ConfigError
from tests.test_data import good, make_dataset, tokenizer, write_shard  # noqa: F401 - tokenizer is a fixture

ROOT = Path(__file__).resolve().parents[1]


def dataset_with_bad_samples(root: Path, num_shards: int = 3, per_shard: int = 7) -> list[str]:
    """Shards where every 5th sample's image does not decode and every 7th has no caption."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            key, members = good(f"{root.name}{s:02d}{j:04d}", i)
            if i % 5 == 3:
                members = {"jpg": b"\xff\xd8 not a jpeg", "txt": members["txt"]}
            elif i % 7 == 5:
                members = {"png": members["png"]}
            samples.append((key, members))
        paths.append(str(write_shard(root / f"shard-{s:05d}.tar", samples)))
    return paths


def take(batches, n):
    return [next(batches) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("images", "text_ids", "text_padding_mask"):
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def loader(paths, tokenizer, num_workers, batch=4, prefetch_factor=2, transform=None, seed=2, timeout=0):
    return ImageTextBatches(paths, tokenizer, transform or train_transform(8), batch, seed=seed, shuffle_window=3,
                            num_workers=num_workers, prefetch_factor=prefetch_factor, timeout=timeout)


# -- workers --------------------------------------------------------------------------------------------------

def test_batches_are_identical_for_0_1_2_workers(tmp_path, tokenizer):
    paths = dataset_with_bad_samples(tmp_path / "d")  # 21 samples, skips split batches across chunks
    runs = {}
    for n in (0, 1, 2):
        with loader(paths, tokenizer, n, prefetch_factor=3) as batches:
            runs[n] = take(batches, 9)  # 36 usable samples: two epochs and a bit
            runs[n].append(batches.stats)
    assert runs[0][0]["images"].dtype == torch.uint8 and runs[0][0]["images"].shape == (4, 3, 8, 8)
    for n in (1, 2):
        assert_same(runs[0][:-1], runs[n][:-1])
        assert runs[n][-1] == runs[0][-1]
    name = normalize_sources(paths)[0][0]
    assert runs[0][-1][f"data/{name}/skipped/corrupt_image"] > 0 and runs[0][-1][f"data/{name}/samples"] == 36


@pytest.mark.parametrize("workers_before, workers_after", [(2, 2), (2, 0), (0, 1)])
def test_resume_is_exact_with_prefetching_workers(tmp_path, tokenizer, workers_before, workers_after):
    paths = dataset_with_bad_samples(tmp_path / "d")
    with loader(paths, tokenizer, 0) as reference:
        expected = take(reference, 12)
    for n_before in (1, 5):
        with loader(paths, tokenizer, workers_before, prefetch_factor=4) as first:
            got = take(first, n_before)
            if workers_before:
                time.sleep(0.5)  # let the workers run ahead
                assert len(first._chunks) + first._records.__len__() > 0  # something is prefetched
            state = json.loads(json.dumps(first.state_dict()))  # it survives a checkpoint round trip
            stats = first.stats
        assert_same(got, expected[:n_before])
        with loader(paths, tokenizer, workers_after) as resumed:
            resumed.load_state_dict(state)
            assert resumed.stats == stats
            assert_same(take(resumed, 12 - n_before), expected[n_before:])


def test_close_then_next_goes_on_with_the_next_batch(tmp_path, tokenizer):
    paths = dataset_with_bad_samples(tmp_path / "d")
    with loader(paths, tokenizer, 0) as reference:
        expected = take(reference, 6)
    batches = loader(paths, tokenizer, 2, prefetch_factor=4)
    got = take(batches, 2)
    batches.close()  # drops what the workers read ahead
    assert batches.worker_pids == []
    got += take(batches, 4)
    batches.close()
    assert_same(got, expected)


class ExitInWorker:
    """The train transform, but it kills the worker process it runs in while the file `flag` exists."""

    takes_rng = True

    def __init__(self, flag):
        self.parent, self.flag = os.getpid(), flag

    def __call__(self, image, rng=None):
        if os.getpid() != self.parent and os.path.exists(self.flag):
            os._exit(7)
        return train_transform(8)(image, rng=rng)


class RaiseInWorker:
    takes_rng = False

    def __call__(self, image, rng=None):
        raise ValueError("a bug in the transform")


class BlockInWorker:
    """The train transform, but in a worker process it blocks forever while the file `flag` exists (a hung decode:
    a stuck network file system, a pathological image)."""

    takes_rng = True

    def __init__(self, flag):
        self.parent, self.flag = os.getpid(), flag

    def __call__(self, image, rng=None):
        if os.getpid() != self.parent and os.path.exists(self.flag):
            threading.Event().wait()
        return train_transform(8)(image, rng=rng)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead but not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_a_crashed_worker_is_an_error_not_a_hang(tmp_path, tokenizer):
    paths = make_dataset(tmp_path / "d", 2, 4)
    with loader(paths, tokenizer, 0) as reference:
        expected = take(reference, 12)
    flag = tmp_path / "crash"
    batches = loader(paths, tokenizer, 2, transform=ExitInWorker(str(flag)))
    got = take(batches, 2)
    flag.touch()  # from now on a worker dies on its next sample
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly"):
        for _ in range(10):  # what was prefetched before the flag still comes out
            before = batches.state_dict()
            got.append(next(batches))
    assert time.monotonic() - start < 60
    # The failed next() returned nothing and moved nothing: the position is that of the last batch returned.
    assert batches.state_dict() == before and batches.worker_pids == []
    flag.unlink()
    got += take(batches, 2)  # new workers, from exactly there
    batches.close()
    assert_same(got, expected[:len(got)])


def test_an_exception_in_a_worker_is_raised_and_the_workers_stop(tmp_path, tokenizer):
    paths = make_dataset(tmp_path / "d", 2, 4)
    with pytest.raises(ValueError, match="a bug in the transform"):
        with loader(paths, tokenizer, 2, transform=RaiseInWorker()) as batches:
            next(batches)
    assert batches.worker_pids == []
    # A loader that worked shuts its workers down with close() / the with block.
    with loader(paths, tokenizer, 2) as batches:
        next(batches)
        pids = batches.worker_pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert _wait_gone(pids, 5) == []


def test_sigterm_from_outside_does_not_kill_the_workers(tmp_path, tokenizer):
    # Slurm signals every process of a job step, the data workers too. A worker that died of it made the trainer
    # raise ("DataLoader worker ... killed by signal") instead of saving. Workers now end only by their own
    # trainer: its shutdown (SIGTERM from the parent, as torch's does), its death, or a kill.
    paths = make_dataset(tmp_path / "d", 2, 4)
    with loader(paths, tokenizer, 0) as reference:
        expected = take(reference, 10)
    with loader(paths, tokenizer, 2) as batches:
        got = take(batches, 2)
        pids = batches.worker_pids
        # from another process, as slurmstepd's (SIGTERM from the trainer itself is its shutdown)
        subprocess.run(["kill", "-TERM", *map(str, pids)], check=True)
        got += take(batches, 8)
        assert batches.worker_pids == pids and all(_alive(p) for p in pids)
    assert_same(got, expected)
    assert _wait_gone(pids, 15) == []  # and the loader's own shutdown still ends them


def test_a_hung_worker_ends_in_a_clear_error_after_the_timeout(tmp_path, tokenizer):
    paths = make_dataset(tmp_path / "d", 2, 4)
    with loader(paths, tokenizer, 0) as reference:
        expected = take(reference, 8)
    flag = tmp_path / "hang"
    batches = loader(paths, tokenizer, 2, transform=BlockInWorker(str(flag)), timeout=2)
    got = take(batches, 2)
    pids = batches.worker_pids
    flag.touch()  # from now on a worker blocks forever on its next sample
    with pytest.raises(RuntimeError, match=r"no micro-batch from a data worker in 2 s \(--dataloader-timeout\)"):
        for _ in range(10):  # what was prefetched before the flag still comes out
            before = batches.state_dict()
            got.append(next(batches))
    assert batches.state_dict() == before and batches.worker_pids == []
    assert _wait_gone(pids, 15) == []  # the hung worker is gone too (killed: it ignores a SIGTERM not from its trainer)
    flag.unlink()
    got += take(batches, 2)  # new workers, from exactly the batch after the last one returned
    batches.close()
    assert_same(got, expected[:len(got)])


_HUNG = """
import sys
sys.path.insert(0, {root!r})
from megatron_m2.data.loader import ImageTextBatches
from megatron_m2.data.tokenizer import GLMTokenizer
from tests.test_data_workers import BlockInWorker
open({flag!r}, "w").close()
batches = ImageTextBatches({paths!r}, GLMTokenizer({model!r}, 8), BlockInWorker({flag!r}), 2, num_workers=2,
                           timeout=1)
next(batches)
"""


def test_a_process_whose_worker_hangs_exits_non_zero(tmp_path, tokenizer):
    # so that torchrun tears the job down: the error must not end in a hang at interpreter exit (multiprocessing joins
    # its children there, and a hung worker ignores a SIGTERM that is not from its trainer)
    paths = make_dataset(tmp_path / "d", 2, 4)
    script = _HUNG.format(root=str(ROOT), paths=paths, model=tokenizer.model_path, flag=str(tmp_path / "hang"))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 1 and "--dataloader-timeout" in result.stderr, result.stderr[-2000:]


_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from megatron_m2.data.loader import ImageTextBatches
from megatron_m2.data.tokenizer import GLMTokenizer
from megatron_m2.data.transforms import train_transform
batches = ImageTextBatches({paths!r}, GLMTokenizer({model!r}, 8), train_transform(8), 2, num_workers=2)
next(batches)
print(" ".join(map(str, batches.worker_pids)), flush=True)
{ending}
"""


@pytest.mark.parametrize("how", ["sigterm", "sigkill", "exit", "exception"])
def test_workers_do_not_outlive_the_training_process(tmp_path, tokenizer, how):
    paths = make_dataset(tmp_path / "d", 2, 4)
    ending = {"sigterm": "time.sleep(120)", "sigkill": "time.sleep(120)", "exit": "",
              "exception": "raise SystemExit('boom')"}[how]
    script = _SCRIPT.format(root=str(ROOT), paths=paths, model=tokenizer.model_path, ending=ending)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "sigkill":
            proc.kill()
        proc.wait(timeout=60)
        assert _wait_gone(pids, 20) == []  # torch's workers poll their parent every 5 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_default_num_workers_from_the_cores_per_local_rank():
    assert default_num_workers(cpus=2, local_world_size=1, accelerator=True) == 1
    assert default_num_workers(cpus=2, local_world_size=4, accelerator=True) == 0
    assert default_num_workers(cpus=128, local_world_size=8, accelerator=True) == 15
    assert default_num_workers(cpus=256, local_world_size=1, accelerator=True) == 16
    assert default_num_workers(cpus=128, local_world_size=1, accelerator=False) == 0  # the cores compute the step
    assert default_num_workers() >= 0


def test_worker_and_prefetch_flags_are_checked(tmp_path, tokenizer):
    paths = make_dataset(tmp_path / "d", 1, 2)
    with pytest.raises(ConfigError, match="--num-workers"):
        loader(paths, tokenizer, -1)
    with pytest.raises(ConfigError, match="--prefetch-factor"):
        loader(paths, tokenizer, 1, prefetch_factor=0)


# -- blending -------------------------------------------------------------------------------------------------

def test_parse_data_path_forms_and_errors(tmp_path):
    zh, en = make_dataset(tmp_path / "zh", 2, 1), make_dataset(tmp_path / "en", 1, 1)
    assert parse_data_path([str(tmp_path / "zh"), en[0]]) == [(1.0, zh + en)]
    blend = parse_data_path(["7", str(tmp_path / "zh"), "3", str(tmp_path / "en")])
    assert [w for w, _ in blend] == pytest.approx([0.7, 0.3]) and [p for _, p in blend] == [zh, en]
    assert [w for w, _ in parse_data_path(["0.7", str(tmp_path / "zh"), "0.3", en[0]])] == pytest.approx([0.7, 0.3])
    for bad in (["0.7", str(tmp_path / "zh"), str(tmp_path / "en")],  # a weight missing
                [str(tmp_path / "zh"), "0.3", str(tmp_path / "en")],  # paths first, then a weight
                ["0.7", str(tmp_path / "zh"), "0.3"],  # odd count
                ["0.5", "0.5", str(tmp_path / "zh")]):  # two weights in a row
        with pytest.raises(ConfigError, match="--data-path .*either paths only, or alternating weight and path"):
            parse_data_path(bad)
    for weight in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="--data-path: weights must be positive"):
            parse_data_path([weight, str(tmp_path / "zh"), "1", str(tmp_path / "en")])
    with pytest.raises(ConfigError, match="--data-path .*no such file"):
        parse_data_path(["0.5", str(tmp_path / "fr"), "0.5", str(tmp_path / "en")])
    with pytest.raises(ConfigError, match="--data-path is empty"):
        parse_data_path([])


def test_source_names_come_from_the_folders(tmp_path):
    zh, en = make_dataset(tmp_path / "zh-shards", 2, 1), make_dataset(tmp_path / "en", 1, 1)
    sources = normalize_sources([(0.7, zh), (0.3, en)])
    assert [(n, round(w, 6)) for n, w, _ in sources] == [("zh-shards", 0.7), ("en", 0.3)]
    assert [n for n, _, _ in normalize_sources([(1, zh[:1]), (1, zh[1:])])] == ["zh-shards.0", "zh-shards.1"]


def test_sources_are_resolved_once(tmp_path):
    """The trainer resolves --data-path once; what normalize_sources made is taken as it is (no second file-system
    pass on every rank of a large job): here the shards are gone by the second call and nothing notices."""
    zh = make_dataset(tmp_path / "zh-shards", 2, 1)
    sources = name_sources(parse_data_path(["0.7", str(tmp_path / "zh-shards"), "0.3", zh[0]]))
    assert [(n, round(w, 6), p) for n, w, p in sources] == [("zh-shards.0", 0.7, zh), ("zh-shards.1", 0.3, zh[:1])]
    for path in zh:
        os.remove(path)
    assert normalize_sources(sources) == sources
    with pytest.raises(ConfigError, match="--data-path .*no such file"):
        normalize_sources([(0.7, zh), (0.3, zh[:1])])


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.9, 0.05, 0.05)])
def test_the_blend_follows_the_weights_exactly(tmp_path, weights):
    sources = [(f"s{i}", w, make_dataset(tmp_path / f"s{i}", 1, 3)) for i, w in enumerate(weights)]
    blend = BlendedStream(sources, 0, 1, seed=0, shuffle_window=2)
    counts, windows = [0] * len(weights), 0
    for n in range(1, 201):
        source, sample = next(blend)
        assert sample.source == source
        counts[source] += 1
        assert all(abs(c - w * n) < 1 for c, w in zip(counts, weights)), (n, counts)
        if all(abs(w * n - round(w * n)) < 1e-9 for w in weights):  # e.g. every 10 samples for 0.7 / 0.3
            assert counts == [round(w * n) for w in weights], (n, counts)
            windows += 1
    assert blend.counts == counts and windows >= 10


def test_blended_batches_mix_exactly_resume_exactly_and_count_per_source(tmp_path, tokenizer):
    zh = dataset_with_bad_samples(tmp_path / "zh", 2, 7)
    en = make_dataset(tmp_path / "en", 1, 4)  # a short source: it goes through many epochs
    blend = [(0.7, zh), (0.3, en)]

    def batches(workers):
        return build_train_data(blend, tokenizer, type("C", (), {"image_size": 8})(), 5, 0, 1, seed=4,
                                num_workers=workers, prefetch_factor=3)

    with batches(0) as reference:
        expected = take(reference, 10)
        end_stats = reference.stats
    # Per-source counts: every raw sample read is a usable sample or a skip, of its own source, in the 7:3 mix.
    zh_read = end_stats["data/zh/samples"] + end_stats["data/zh/skipped/corrupt_image"]
    en_read = end_stats["data/en/samples"] + end_stats["data/en/skipped/corrupt_image"]
    assert end_stats["data/samples"] == 50 and end_stats["data/en/skipped"] == 0
    assert end_stats["data/zh/skipped/corrupt_image"] > 0 and end_stats["data/zh/skipped/missing_caption"] > 0
    assert abs(zh_read - 0.7 * (zh_read + en_read)) < 1
    with batches(2) as first:
        assert_same(take(first, 4), expected[:4])
        state = json.loads(json.dumps(first.state_dict()))
    assert [s["name"] for s in state["sources"]] == ["zh", "en"]
    with batches(1) as resumed:
        resumed.load_state_dict(state)
        assert_same(take(resumed, 6), expected[4:])
        assert resumed.stats == end_stats
    # Another blend (weights or sources) must not silently take this position.
    other = build_train_data([(0.5, zh), (0.5, en)], tokenizer, type("C", (), {"image_size": 8})(), 5, 0, 1, seed=4)
    with pytest.raises(ConfigError, match="resume with the same --data-path"):
        other.load_state_dict(state)
    single = build_train_data(zh, tokenizer, type("C", (), {"image_size": 8})(), 5, 0, 1, seed=4)
    with pytest.raises(ConfigError, match="resume with the same --data-path"):
        single.load_state_dict(state)


def test_a_single_source_blend_reads_what_the_plain_source_reads(tmp_path, tokenizer):
    paths = make_dataset(tmp_path / "d", 2, 5)
    config = type("C", (), {"image_size": 8})()
    plain = build_train_data(paths, tokenizer, config, 3, 0, 1, seed=1)
    blend = build_train_data(parse_data_path(["1.0", str(tmp_path / "d")]), tokenizer, config, 3, 0, 1, seed=1)
    assert_same(take(plain, 5), take(blend, 5))
    # Source 0 keeps the seeds a single stream always had; another source draws its own shard order and crops.
    from megatron_m2.data.shards import ShardStream

    many = make_dataset(tmp_path / "many", 8, 1)
    order = [piece.shard for piece in ShardStream(many, seed=1).plan(0)]
    assert order == np.random.default_rng([1, 0]).permutation(8).tolist()
    assert [piece.shard for piece in ShardStream(many, seed=1, source=1).plan(0)] != order
    sample = next(ShardStream(many, seed=1))
    assert sample.rng_key(1) == [1, 0, sample.shard, sample.index]
