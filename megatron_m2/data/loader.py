"""Training micro-batches from tar shards: read in the training process, decode/augment/tokenise in worker
processes, exactly resumable, identical batches for any number of workers.

How (torch's DataLoader with the stream as its "sampler"):
- the main process reads the tar shards (`BlendedStream` over one `ShardStream` per source: cheap, sequential) and
  cuts the raw samples into chunks of micro-batch size; the chunks are the DataLoader's "indices", so its worker
  processes receive the encoded bytes, decode (Pillow), augment (seeded per sample from (seed, epoch, shard,
  index)), tokenise and return uint8 tensors through shared memory; `prefetch_factor` chunks per worker are in
  flight. The DataLoader keeps the order, pins memory (when CUDA is available), reports a dead worker as an error
  (RuntimeError "DataLoader worker ... exited unexpectedly") and stops its workers with the iterator; a hung one
  ends in DataTimeoutError after `timeout` seconds. Workers ignore a SIGTERM that is not their trainer's
  (data/workers.py: Slurm signals every process of a job).
- the main process assembles micro-batches from the chunks in stream order, dropping images that do not decode
  (counted as corrupt_image). What a batch holds therefore depends only on the stream, never on the worker count.
- the position: after every raw sample the reader keeps a snapshot of its source's position (a few ints); a sample
  "commits" its snapshot when the batch it belongs to is returned. `state_dict()` is made of committed snapshots, so it
  is the position after the last batch returned by `next()`, however far the workers have read ahead.
"""
from __future__ import annotations

import collections
import functools
import io
import logging
import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from megatron_m2.data import workers
from megatron_m2.data.blend import BlendedStream, ShardsOrBlend, normalize_sources, stat_keys
from megatron_m2.data.filters import SampleFilter
from megatron_m2.data.masking import Masker
from megatron_m2.data.shards import SKIP_REASONS
from megatron_m2.data.tokenizer import GLMTokenizer
from megatron_m2.data.transforms import to_rgb, train_transform
from megatron_m2.errors import ConfigError

logger = logging.getLogger(__name__)

_MAX_WORKERS = 16
_MAX_CORRUPT_WARNINGS = 20


def cores_per_local_rank(cpus: Optional[int] = None, local_world_size: Optional[int] = None) -> int:
    """The CPU cores this process may use, shared equally by the ranks of its node (torchrun's LOCAL_WORLD_SIZE)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return cpus // max(1, local_world_size)


def default_num_workers(cpus: Optional[int] = None, local_world_size: Optional[int] = None,
                        accelerator: Optional[bool] = None) -> int:
    """--num-workers when not given. With a GPU (accelerator None: CUDA available): the CPU cores per local rank,
    less one for the training process, at most 16: the GPU computes and the cores decode. Without one: 0, because
    the cores ARE the compute: a worker takes a core from the step (on 2 cores a compute-bound step took 1.6x as long
    with 1 worker as with 0, BENCHMARKS.md "Trainer overhead"); decode-heavy CPU runs can still ask for workers."""
    if accelerator is None:
        accelerator = torch.cuda.is_available()
    if not accelerator:
        return 0
    return max(0, min(_MAX_WORKERS, cores_per_local_rank(cpus, local_world_size) - 1))


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so a truncated file fails here and not inside the transform
    return image


class _Decoder(torch.utils.data.Dataset):
    """Runs in the workers: chunk of (image bytes, caption, rng key) -> the usable samples as tensors + an ok mask,
    with the masked-modelling masks of the enabled objectives (data/masking.py), drawn from each sample's key."""

    def __init__(self, tokenizer: GLMTokenizer, transform: Callable, masker: Optional[Masker] = None) -> None:
        self.tokenizer, self.transform, self.masker = tokenizer, transform, masker

    def _image(self, data: bytes, key: list[int]) -> Optional[torch.Tensor]:
        try:
            image = to_rgb(decode_image(data))
        except Exception:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            return None
        if getattr(self.transform, "takes_rng", False):
            return self.transform(image, rng=np.random.default_rng(key))
        return self.transform(image)

    def __getitem__(self, chunk: list) -> dict:
        images, captions, keys, ok = [], [], [], []
        for data, caption, key in chunk:
            image = self._image(data, key)
            ok.append(image is not None)
            if image is not None:
                images.append(image)
                captions.append(caption)
                keys.append(key)
        out = {"ok": torch.tensor(ok, dtype=torch.bool)}
        if images:
            out["text_ids"], out["text_padding_mask"] = self.tokenizer(captions)
            # One numpy copy (see transforms.to_tensor for why not torch.stack).
            out["images"] = torch.from_numpy(np.stack([image.numpy() for image in images]))
            if self.masker is not None:
                out.update(self.masker(out["text_ids"], keys))
        return out


def _identity(x):
    return x


class _Chunks:
    """The DataLoader's sampler: yields chunks of raw samples read from the blend, in order, and remembers for
    every raw sample (source, position snapshot after it, epoch, where) until the batch assembler consumes it."""

    def __init__(self, loader: "ImageTextBatches") -> None:
        self.loader = loader

    def __iter__(self):
        loader, blend = self.loader, self.loader.blend
        while True:
            chunk, records = [], []
            for _ in range(loader.micro_batch_size):
                source, sample = next(blend)
                stream = blend.streams[source]
                chunk.append((sample.image, sample.caption, sample.rng_key(loader.seed)))
                records.append((source, stream.position_dict(), sample.epoch,
                                f"{stream.shards[sample.shard]}:{sample.key}"))
            loader._records.append(records)
            yield chunk


class ImageTextBatches:
    """Iterator of dict(images [b,3,H,W] (uint8 from the train transform), text_ids [b,L] int64,
    text_padding_mask [b,L] bool), plus the masker's entries (data/masking.py) when one is given; see the module
    docstring. Use `close()` or `with` to stop the workers."""

    def __init__(self, shards: ShardsOrBlend, tokenizer: GLMTokenizer, transform: Callable,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_window: int = 512, num_workers: Optional[int] = 0, prefetch_factor: int = 2,
                 pin_memory: Optional[bool] = None, sample_filter: Optional[SampleFilter] = None,
                 timeout: float = 0, masker: Optional[Masker] = None) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be >= 1")
        num_workers = default_num_workers() if num_workers is None else num_workers
        if num_workers < 0:
            raise ConfigError(f"--num-workers {num_workers}: must be >= 0")
        if prefetch_factor < 1:
            raise ConfigError(f"--prefetch-factor {prefetch_factor}: must be >= 1")
        sources = normalize_sources(shards)
        self.blend = BlendedStream(sources, dp_rank, dp_size, seed, shuffle_window, sample_filter)
        self.names = self.blend.names
        self.tokenizer, self.transform, self.masker = tokenizer, transform, masker
        self.batch_keys = ("images", "text_ids", "text_padding_mask") + (masker.keys if masker is not None else ())
        self.micro_batch_size, self.seed, self.dp_rank = micro_batch_size, seed, dp_rank
        self.num_workers, self.prefetch_factor, self.timeout = num_workers, prefetch_factor, timeout
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._iter = None
        self._samples = [0] * len(self.names)  # usable samples returned, per source
        self._corrupt = [0] * len(self.names)  # images that did not decode, per source
        self._commit_from_streams()

    # -- position -------------------------------------------------------------------------------------------
    def _commit_from_streams(self) -> None:
        """The committed position := the streams' current one (at start and after a load), nothing in flight."""
        self._positions = [stream.position_dict() for stream in self.blend.streams]
        self._counts = list(self.blend.counts)  # raw samples consumed per source (the blend's choice state)
        self._last_good_epoch = [p["epoch"] for p in self._positions]
        self._records: collections.deque = collections.deque()  # per chunk in flight: its raw samples' records
        self._chunks: collections.deque = collections.deque()  # [output, records, next raw sample] not yet used

    def state_dict(self) -> dict:
        """The position after the last batch returned by next() (not what the workers prefetched)."""
        return {"sources": [
            {"name": name, "weight": weight, "stream": {**position, **stream._layout()}, "consumed": consumed,
             "samples": samples, "corrupt_image": corrupt}
            for name, weight, stream, position, consumed, samples, corrupt in zip(
                self.names, self.blend.weights, self.blend.streams, self._positions, self._counts, self._samples,
                self._corrupt)]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("sources")
        if saved is None and "epoch" in state and len(self.names) == 1:  # a checkpoint from before blending
            stats = dict(state["stats"])
            saved = [{"name": self.names[0], "weight": 1.0, "stream": {**state, "stats": stats}, "consumed": 0,
                      "samples": stats.pop("samples", 0), "corrupt_image": stats.pop("corrupt_image", 0)}]
        # A blend's sources are matched by name and weight; a single source may have moved to another folder.
        if saved is None or [(s["name"] if len(saved) > 1 else "", round(s["weight"], 9)) for s in saved] != [
                (n if len(self.names) > 1 else "", round(w, 9)) for n, w in zip(self.names, self.blend.weights)]:
            got = [(s["name"], s["weight"]) for s in saved] if saved is not None else "a single-source position"
            raise ConfigError(f"the data position in the checkpoint is for the sources {got}; this run's --data-path "
                              f"gives {list(zip(self.names, self.blend.weights))}: resume with the same --data-path")
        self._stop_workers()
        self._set_position([s["stream"] for s in saved], [s["consumed"] for s in saved])
        self._samples = [s["samples"] for s in saved]
        self._corrupt = [s["corrupt_image"] for s in saved]

    def _set_position(self, streams: list[dict], consumed: list[int]) -> None:
        for stream, state in zip(self.blend.streams, streams):
            stream.load_state_dict({**stream._layout(), **state})  # a saved layout is checked, a snapshot has none
        self.blend.counts = list(consumed)
        self._commit_from_streams()

    @property
    def stats(self) -> dict[str, int]:
        """Per source: usable samples returned and skipped ones (total and by reason), since the start of the run;
        flat keys `data/<source>/samples`, `data/<source>/skipped`, `data/<source>/skipped/<reason>`, plus totals
        `data/samples`, `data/skipped`. The same keys on every rank (see stat_keys)."""
        out = dict.fromkeys(stat_keys(self.names, SKIP_REASONS), 0)
        for name, position, samples, corrupt in zip(self.names, self._positions, self._samples, self._corrupt):
            skips = {reason: position["stats"].get(reason, 0) for reason in SKIP_REASONS}
            skips["corrupt_image"] += corrupt
            out[f"data/{name}/samples"] = samples
            out[f"data/{name}/skipped"] = sum(skips.values())
            out.update({f"data/{name}/skipped/{reason}": count for reason, count in skips.items()})
            out["data/samples"] += samples
            out["data/skipped"] += sum(skips.values())
        return out

    # -- workers ---------------------------------------------------------------------------------------------
    def _start(self):
        # generator: its own, because each new iterator draws its workers' base seed from it, and from torch's default
        # generator without one: that would advance only the reading rank's default generator, which hidden dropout
        # draws from on CPU (its TP peers' masks would differ) and which a resumed run restores (megatron_m2/random_state.py)
        loader = torch.utils.data.DataLoader(
            _Decoder(self.tokenizer, self.transform, self.masker), batch_size=None, sampler=_Chunks(self),
            generator=torch.Generator().manual_seed(0),
            num_workers=self.num_workers, collate_fn=_identity, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            timeout=self.timeout if self.num_workers else 0,
            worker_init_fn=functools.partial(workers.worker_init, os.getpid()) if self.num_workers else None)
        with workers.starting():
            return iter(loader)

    def _stop_workers(self, hung: bool = False) -> None:
        it, self._iter = self._iter, None
        if it is not None:
            workers.stop(it, hung)

    def close(self) -> None:
        """Stops the worker processes (also done at exit). A later next() starts new ones and goes on with exactly
        the batch after the last one returned (what the workers had read ahead is read again)."""
        running = self._iter is not None
        self._stop_workers()
        if running:
            self._set_position(self._positions, self._counts)

    def __enter__(self) -> "ImageTextBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop_workers()
        except Exception:  # interpreter shutdown
            pass

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self._iter, "_workers", [])]

    # -- batches ---------------------------------------------------------------------------------------------
    def __iter__(self) -> "ImageTextBatches":
        return self

    def _next_chunk(self) -> None:
        if self._iter is None:
            self._iter = self._start()
        out = workers.next_batch(self._iter, self.timeout)
        self._chunks.append([out, self._records.popleft(), 0])

    def _consume(self, record: tuple, usable: bool) -> None:
        source, position, epoch, where = record
        self._positions[source] = position
        self._counts[source] += 1
        if usable:
            self._samples[source] += 1
            self._last_good_epoch[source] = epoch
            return
        self._corrupt[source] += 1
        if self._corrupt[source] <= _MAX_CORRUPT_WARNINGS:
            logger.warning("skipped sample %s: corrupt_image%s", where,
                           "" if self._corrupt[source] < _MAX_CORRUPT_WARNINGS else " (further ones are only counted)")
        if epoch >= self._last_good_epoch[source] + 2:  # a whole epoch without one decodable image
            raise ConfigError(f"--data-path: data-parallel rank {self.dp_rank} decoded no image of source "
                              f"{self.names[source]!r} in a whole epoch; skipped: {self.stats}")

    def __next__(self) -> dict[str, torch.Tensor]:
        committed = (list(self._positions), list(self._counts), list(self._samples), list(self._corrupt),
                     list(self._last_good_epoch))
        try:
            return self._next_batch()
        except BaseException as error:
            # No batch was returned: the position stays that of the last one (a checkpoint taken after a caught
            # error stays exact), and a later next() restarts the workers from there.
            self._stop_workers(hung=isinstance(error, workers.DataTimeoutError))
            positions, counts, self._samples, self._corrupt, last_good = committed
            self._set_position(positions, counts)
            self._last_good_epoch = last_good
            raise

    def _next_batch(self) -> dict[str, torch.Tensor]:
        pieces = []  # (chunk output, first row, end row) in order
        taken = 0
        while taken < self.micro_batch_size:
            if not self._chunks:
                self._next_chunk()
            chunk = self._chunks[0]
            out, records, j = chunk
            ok = out["ok"].tolist()
            row = sum(ok[:j])
            first = row
            while j < len(records) and taken < self.micro_batch_size:
                self._consume(records[j], ok[j])
                if ok[j]:
                    row += 1
                    taken += 1
                j += 1
            chunk[2] = j
            if row > first:
                pieces.append((out, first, row))
            if j == len(records):
                self._chunks.popleft()
        if len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][2] == len(pieces[0][0]["images"]):
            out = pieces[0][0]  # the usual case: one whole chunk is the batch, already pinned, no copy
            return {k: out[k] for k in self.batch_keys}
        batch = {}
        for k in self.batch_keys:
            batch[k] = torch.cat([out[k][a:b] for out, a, b in pieces])
            if self.pin_memory:
                batch[k] = batch[k].pin_memory()
        return batch


def build_train_data(shards_or_blend: ShardsOrBlend, tokenizer: GLMTokenizer, config, micro_batch_size: int,
                     dp_rank: int, dp_size: int, seed: int, num_workers: Optional[int] = 0, prefetch_factor: int = 2,
                     hflip: bool = True, randaugment: Optional[tuple[int, float]] = None,
                     sample_filter: Optional[SampleFilter] = None, timeout: float = 0,
                     masker: Optional[Masker] = None) -> ImageTextBatches:
    """The training iterator for a model config (its image_size), with the train augmentation (uint8 images;
    randaugment = (N, M) adds RandAugment(N, M)), the optional sample filter (data/filters.py) and, with a masker
    (data/masking.build_masker), the masked-modelling masks. num_workers=None: default_num_workers(); timeout:
    seconds to wait for a worker's micro-batch (0 = forever)."""
    transform = train_transform(config.image_size, hflip=hflip, randaugment=randaugment)
    return ImageTextBatches(shards_or_blend, tokenizer, transform, micro_batch_size, dp_rank, dp_size, seed,
                            num_workers=num_workers, prefetch_factor=prefetch_factor, sample_filter=sample_filter,
                            timeout=timeout, masker=masker)
