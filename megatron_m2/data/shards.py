"""Webdataset-format tar shards (what img2dataset writes), read with the stdlib `tarfile`, resumable.

A sample is the run of consecutive tar members sharing a KEY (the member path up to the first '.' of its basename):
KEY.jpg|jpeg|png|webp is the image, KEY.txt or KEY.json["caption"] the caption (json may carry "lang").

`ShardStream` is one data-parallel rank's endless stream of raw samples:
- epoch e visits the shards in a permutation drawn from (seed, e);
- within a shard, windows of `shuffle_window` samples are permuted with (seed, e, shard, window); a sample's slot is
  its index in that shuffled order;
- a rank's epoch is a plan of pieces (shard, stride, phase, start): read the shard's slots from `start` on and keep
  those with slot % stride == phase. With at least as many shards as DP ranks, rank r reads whole shards
  order[r::dp] (disjoint files); with fewer, every rank reads every shard and keeps one slot in dp (the i-th shard
  of the epoch: slots r + i modulo dp; disjoint samples);
- its position is (epoch, piece, offset (slot), ...): a few ints, saved in the checkpoint, so a resumed stream
  continues with exactly the next sample. A run resumed at another data-parallel size continues the epoch instead
  of starting it again: `reshard_positions` gives every new rank its share of the pieces the old ranks had not
  read yet (an explicit plan for those epochs), and later epochs follow the new size.
Unusable samples are skipped and counted in `stats`, never raised: a broken caption must not stop a long run.
`ShardWriter` writes the same format (tools/make_shards.py).
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import braceexpand
import numpy as np

from megatron_m2.data.filters import FILTER_REASONS, SampleFilter
from megatron_m2.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Skip reasons (keys of `stats`), besides "samples" (usable samples yielded).
SKIP_REASONS = ("missing_image", "missing_caption", "empty_caption", "bad_utf8", "bad_json", "corrupt_image",
                "corrupt_shard") + FILTER_REASONS
_MAX_SKIP_WARNINGS = 20

def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion (the braceexpand library, as webdataset uses): `a-{000..002}.tar` (zero-padded),
    `{1..9..2}` (steps), `{a..e}` (letters), `{x,y}` lists, nested braces, several braces multiply; `\\{` escapes."""
    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise ConfigError(f"--data-path {pattern!r}: unbalanced braces") from None


def _resolve_one(entry: str, pattern: str) -> list[str]:
    if os.path.isdir(entry):
        found = sorted(glob.glob(os.path.join(entry, "*.tar")))
        if not found:
            raise ConfigError(f"--data-path {pattern!r}: the directory {entry!r} holds no *.tar shard")
        return found
    if glob.has_magic(entry):
        found = sorted(glob.glob(entry))
        if not found:
            raise ConfigError(f"--data-path {pattern!r}: no shard matches {entry!r}")
        return found
    if os.path.isfile(entry):
        return [entry]
    raise ConfigError(f"--data-path {pattern!r}: no such file or directory")


def resolve_shards(spec: Union[str, Sequence[str]]) -> list[str]:
    """Files, directories (their *.tar) and brace/glob patterns -> the shard paths; ConfigError if any is missing.

    Braces expand first (`data/{zh,en}/shard-{00000..00099}.tar`), then each expansion is a directory, a glob or a
    file."""
    entries = [spec] if isinstance(spec, str) else list(spec or [])
    if not entries:
        raise ConfigError("--data-path is empty: pass tar shards, a directory of them or a pattern "
                          "like data/shard-{00000..00009}.tar (tools/make_shards.py writes them)")
    paths: list[str] = []
    for entry in entries:
        expanded = expand_braces(entry) if "{" in entry else [entry]
        if len(expanded) > 1:
            missing = [p for p in expanded if not (os.path.exists(p) or glob.has_magic(p))]
            if missing:
                raise ConfigError(f"--data-path {entry!r}: {len(missing)} of {len(expanded)} shards are missing, "
                                  f"e.g. {missing[:3]}")
        for piece in expanded:
            paths.extend(_resolve_one(piece, entry))
    return list(dict.fromkeys(paths))  # order kept, duplicates dropped


@dataclass
class RawSample:
    """A usable sample before decoding: the image stays encoded until the loader needs it."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    lang: Optional[str]
    # Identity independent of the DP layout: seeds this sample's augmentation.
    epoch: int
    shard: int
    index: int
    source: int = 0  # which source of a blended --data-path

    def rng_key(self, seed: int) -> list[int]:
        """The augmentation seed: (seed, epoch, shard, index), plus the source in a blend (source 0 keeps the old key)."""
        return [seed, self.epoch, self.shard, self.index] + ([self.source] if self.source else [])


def _split_name(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def iter_tar_groups(path: str, stats: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in file order; a truncated or unreadable shard ends early, counted."""
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_name(member.name)
                if member_key != key and key is not None:
                    yield key, members
                    members = {}
                key = member_key
                members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        stats["corrupt_shard"] += 1
        logger.warning("shard %s is unreadable after key %s (%s): skipping the rest of it", path, key, exc)
    if key is not None:
        yield key, members


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _caption_and_lang(members: dict[str, bytes]) -> tuple[str, Optional[str]]:
    meta = None
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except UnicodeDecodeError:
            raise _Skip("bad_utf8")
        except json.JSONDecodeError:
            meta = None
            if "txt" not in members:
                raise _Skip("bad_json")
    meta = meta if isinstance(meta, dict) else {}
    lang = meta.get("lang") if isinstance(meta.get("lang"), str) else None
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("bad_utf8")
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    else:
        raise _Skip("missing_caption")
    caption = caption.strip()
    if not caption:
        raise _Skip("empty_caption")
    return caption, lang


def parse_group(key: str, members: dict[str, bytes]) -> tuple[bytes, str, str, Optional[str]]:
    """(image bytes, image extension, caption, lang) or _Skip(reason)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise _Skip("missing_image")
    caption, lang = _caption_and_lang(members)
    return members[ext], ext, caption, lang


def count_skip(stats: Counter, reason: str, where: str) -> None:
    stats[reason] += 1
    skipped = sum(stats[r] for r in SKIP_REASONS)
    if skipped <= _MAX_SKIP_WARNINGS:
        logger.warning("skipped sample %s: %s%s", where, reason,
                       "" if skipped < _MAX_SKIP_WARNINGS else " (further skips are only counted)")


class Piece(NamedTuple):
    """Part of a rank's epoch: slots start.. of `shard` (its shuffled order) with slot % stride == phase."""

    shard: int
    stride: int
    phase: int
    start: int


def epoch_plan(num_shards: int, dp_rank: int, dp_size: int, seed: int, epoch: int, source: int = 0) -> list[Piece]:
    """The pieces rank dp_rank of dp_size reads in `epoch` (see the module docstring)."""
    order = np.random.default_rng([seed, epoch, *([source] if source else [])]).permutation(num_shards).tolist()
    if num_shards >= dp_size:
        return [Piece(shard, 1, 0, 0) for shard in order[dp_rank::dp_size]]
    return [Piece(shard, dp_size, (dp_rank + i) % dp_size, 0) for i, shard in enumerate(order)]


class ShardStream:
    """One DP rank's endless, resumable stream of usable `RawSample`s (see the module docstring)."""

    def __init__(self, shards: Sequence[str], dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_window: int = 512, source: int = 0, sample_filter: Optional[SampleFilter] = None) -> None:
        if not shards:
            raise ConfigError("--data-path resolved to no shard")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
        self.shards = list(shards)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle_window = max(1, shuffle_window)
        # The sources of a blend draw different shard orders and windows (source 0: the keys of a single source).
        self.source, self._salt = source, [source] if source else []
        # --min-caption-chars / --max-aspect-ratio: a filtered pair is skipped and counted like a corrupt one
        self.sample_filter = sample_filter if sample_filter is not None and sample_filter.active else None
        self.stats: Counter = Counter()
        self._plan_cache: tuple = (None, None)
        # Explicit plans of epochs that a resume at another data-parallel size split ((epoch, pieces), ...).
        self.plans: tuple = ()
        # Position: the piece of the epoch, the next slot of its shard (offset), raw samples of the epoch read
        # (position), usable or not.
        self.epoch, self.shard, self.offset, self.position, self.usable_in_epoch = 0, 0, 0, 0, 0
        self.offset = self._start(0)
        self._reset_reader()

    # -- position -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self.position_dict(), **self._layout()}

    def _layout(self) -> dict:
        return {"num_shards": len(self.shards), "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "shuffle_window": self.shuffle_window, "source": self.source}

    def position_dict(self) -> dict:
        """The cheap part of `state_dict` that changes per sample (the loader snapshots it after every sample; the
        explicit plans are an immutable tuple, shared, not copied)."""
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "position": self.position,
                "usable_in_epoch": self.usable_in_epoch, "stats": dict(self.stats), "plans": self.plans}

    def load_state_dict(self, state: dict) -> None:
        layout = {k: state.get(k, 0) for k in self._layout()}
        if layout != self._layout():
            raise ConfigError(f"the data position in the checkpoint was saved for {layout}; this run has "
                              f"{len(self.shards)} shards, DP rank {self.dp_rank} of {self.dp_size}, --seed "
                              f"{self.seed}: resume with the same --data-path, --seed and data-parallel size")
        self.epoch, self.shard, self.offset = state["epoch"], state["shard"], state["offset"]
        self.position, self.usable_in_epoch = state["position"], state["usable_in_epoch"]
        self.stats = Counter(state["stats"])
        self.plans = tuple((int(epoch), tuple(Piece(*piece) for piece in pieces))
                           for epoch, pieces in state.get("plans", ()))
        self._plan_cache = (None, None)
        self._reset_reader()

    # -- the plan of an epoch -------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[Piece]:
        """The pieces this rank reads in `epoch`, in order: an explicit plan if a resume gave one, else
        `epoch_plan`."""
        if self._plan_cache[0] != epoch:  # asked for every sample: a permutation of 100k shards is not free
            explicit = dict(self.plans).get(epoch)
            plan = list(explicit) if explicit is not None else epoch_plan(
                len(self.shards), self.dp_rank, self.dp_size, self.seed, epoch, self.source)
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def _start(self, piece: int) -> int:
        """The first slot of piece `piece` of the current epoch (0 past the last one)."""
        plan = self.plan(self.epoch)
        return plan[piece].start if piece < len(plan) else 0

    def _reset_reader(self) -> None:
        self._groups: Optional[Iterator] = None  # open tar of the current shard
        self._window: Optional[list] = None
        self._window_id = -1

    def _load_window(self, shard_id: int, window_id: int) -> list:
        """Samples [w*W, (w+1)*W) of the shard in file order, permuted with (seed, epoch, shard, window)."""
        if self._groups is None:
            self._groups = iter_tar_groups(self.shards[shard_id], self.stats)
            # A resume lands inside a shard: skip the windows already consumed (read, not decoded).
            for _ in itertools.islice(self._groups, window_id * self.shuffle_window):
                pass
        window = list(itertools.islice(self._groups, self.shuffle_window))
        perm = np.random.default_rng([self.seed, self.epoch, shard_id, window_id, *self._salt]).permutation(len(window))
        return [(window_id * self.shuffle_window + int(i), window[i]) for i in perm]

    # -- iteration ------------------------------------------------------------------------------------------
    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> RawSample:
        while True:
            plan = self.plan(self.epoch)
            if self.shard >= len(plan):
                explicit = self.epoch in dict(self.plans)  # the rest of an epoch split at a resume may hold nothing
                if self.usable_in_epoch == 0 and not explicit:
                    raise ConfigError(f"--data-path: data-parallel rank {self.dp_rank} found no usable sample in a "
                                      f"whole epoch of {len(self.shards)} shards; skipped: {dict(self.stats)}")
                self.epoch, self.shard, self.position, self.usable_in_epoch = self.epoch + 1, 0, 0, 0
                self.plans = tuple((epoch, pieces) for epoch, pieces in self.plans if epoch >= self.epoch)
                self.offset = self._start(0)
                self._reset_reader()
                continue
            shard_id, stride, phase, _ = plan[self.shard]
            window_id = self.offset // self.shuffle_window
            if self._window_id != window_id:
                self._window, self._window_id = self._load_window(shard_id, window_id), window_id
            slot = self.offset % self.shuffle_window
            if slot >= len(self._window):  # the shard is exhausted
                self.shard += 1
                self.offset = self._start(self.shard)
                self._reset_reader()
                continue
            index, (key, members) = self._window[slot]
            mine = self.offset % stride == phase
            self.offset += 1
            self.position += 1
            if not mine:
                continue
            try:
                image, ext, caption, lang = parse_group(key, members)
                if self.sample_filter is not None:
                    reason = self.sample_filter.reject(caption, image)
                    if reason is not None:
                        raise _Skip(reason)
            except _Skip as skip:
                count_skip(self.stats, skip.reason, f"{self.shards[shard_id]}:{key}")
                continue
            self.usable_in_epoch += 1
            return RawSample(key, image, ext, caption, lang, self.epoch, shard_id, index, self.source)


class ShardWriter:
    """Writes samples as webdataset tar shards PREFIX-00000.tar, ... of `samples_per_shard` samples each.

    Keys are the zero-padded global sample number; each sample is KEY.<image ext>, KEY.txt (caption) and KEY.json
    ({"caption", "lang", ...}), as img2dataset writes them. A shard is written under a temporary name and renamed
    when complete, so a reader never sees a half-written shard.
    """

    def __init__(self, output_dir: str, samples_per_shard: int = 10000, prefix: str = "shard",
                 key_width: int = 9) -> None:
        if samples_per_shard < 1:
            raise ConfigError(f"--samples-per-shard {samples_per_shard}: must be >= 1")
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir, self.samples_per_shard, self.prefix, self.key_width = (
            output_dir, samples_per_shard, prefix, key_width)
        self.count = 0
        self.paths: list[str] = []
        self._tar: Optional[tarfile.TarFile] = None

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, image: bytes, image_ext: str, caption: str, lang: Optional[str] = None,
              meta: Optional[dict] = None) -> str:
        """Adds one sample; returns its key."""
        if self._tar is None:
            path = os.path.join(self.output_dir, f"{self.prefix}-{len(self.paths):05d}.tar")
            self.paths.append(path)
            self._tar = tarfile.open(path + ".tmp", "w")
        key = str(self.count).zfill(self.key_width)
        record = {"key": key, "caption": caption, **({"lang": lang} if lang else {}), **(meta or {})}
        self._add_member(f"{key}.{image_ext}", image)
        self._add_member(f"{key}.txt", caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        self.count += 1
        if self.count % self.samples_per_shard == 0:
            self._finish_shard()
        return key

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self.paths[-1] + ".tmp", self.paths[-1])
            self._tar = None

    def close(self) -> list[str]:
        """Completes the last shard; returns all shard paths."""
        self._finish_shard()
        return self.paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
