"""Weighted blending of several shard sources, Megatron-LM style: `--data-path 0.7 zh-shards/ 0.3 en-shards/`.

`parse_data_path` reads the flag: either paths only (one source made of all of them) or alternating `weight path`
pairs (weights > 0, normalised to sum 1). Each source is its own `ShardStream` with its own resumable position;
`BlendedStream` picks, for every sample, the source whose count lags its share the most (Megatron-LM's
BlendedDataset rule: argmax_i w_i * (n + 1) - count_i, ties to the first source), so after n samples every
source has within one sample of w_i * n: 0.7 / 0.3 gives exactly 7 and 3 in every 10. Deterministic: the choice
depends only on the counts, which are part of the saved position.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple, Optional, Sequence, Union

from megatron_m2.data.filters import SampleFilter
from megatron_m2.data.shards import RawSample, ShardStream, resolve_shards
from megatron_m2.errors import ConfigError

class Source(NamedTuple):
    """One source of the training data: its name (the key of its stats, checked on resume), its weight (a blend's
    weights sum to 1) and its resolved shard paths."""

    name: str
    weight: float
    paths: list[str]


# What build_train_data accepts: one shard spec (str or paths), a blend [(weight, shard spec), ...], or the Sources
# that normalize_sources made of either (taken as they are: no second look at the file system).
ShardsOrBlend = Union[str, Sequence[str], Sequence[tuple[float, Union[str, Sequence[str]]]], Sequence[Source]]


def _weight(value: str):
    try:
        return float(value)
    except ValueError:
        return None


def _normalized_weights(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    if not (all(0 < w < float("inf") for w in weights) and total < float("inf")):
        raise ConfigError(f"--data-path: weights must be positive finite numbers, got {list(weights)}")
    return [w / total for w in weights]


def parse_data_path(values: Union[str, Sequence[str]]) -> list[tuple[float, list[str]]]:
    """--data-path values -> [(normalised weight, resolved shard paths)]; ConfigError names the flag.

    `a/ b/*.tar` is one source of all their shards (weight 1); `0.7 a/ 0.3 b/` two sources, 70% / 30% of samples.
    """
    values = [values] if isinstance(values, str) else list(values or [])
    weights = [_weight(v) for v in values]
    if all(w is None for w in weights):  # also no values at all: resolve_shards says the flag is empty
        return [(1.0, resolve_shards(values))]
    if len(values) % 2 or any(w is None for w in weights[0::2]) or any(w is not None for w in weights[1::2]):
        raise ConfigError(f"--data-path {' '.join(values)}: give either paths only, or alternating weight and "
                          "path pairs (e.g. --data-path 0.7 zh-shards/ 0.3 en-shards/), not a mix")
    return list(zip(_normalized_weights(weights[0::2]), [resolve_shards(path) for path in values[1::2]]))


def name_sources(blend: Sequence[tuple[float, list[str]]]) -> list[Source]:
    """Resolved [(weight, shard paths)] (parse_data_path's) -> Sources: weights normalised, names from the folders
    holding the shards (`zh-shards/shard-00000.tar` -> `zh-shards`; a name taken twice gets the source number). No
    file-system access: every rank can name the sources it resolved once."""
    weights = _normalized_weights([float(w) for w, _ in blend])
    names = [_source_name(paths) for _, paths in blend]
    names = [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]
    return [Source(name, w, list(paths)) for name, w, (_, paths) in zip(names, weights, blend)]


def normalize_sources(shards_or_blend: ShardsOrBlend) -> list[Source]:
    """The Sources of a plain shard spec or a [(weight, spec), ...] blend (specs resolved with resolve_shards);
    Sources are returned as they are."""
    if not isinstance(shards_or_blend, str) and shards_or_blend and all(
            isinstance(source, Source) for source in shards_or_blend):
        return list(shards_or_blend)
    if isinstance(shards_or_blend, str) or not shards_or_blend or not isinstance(shards_or_blend[0], (tuple, list)):
        return name_sources([(1.0, resolve_shards(shards_or_blend))])
    return name_sources([(w, resolve_shards(spec)) for w, spec in shards_or_blend])


def _source_name(paths: Sequence[str]) -> str:
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(folder) or "data")


def stat_keys(names: Sequence[str], reasons: Sequence[str]) -> list[str]:
    """Every key of the loader's stats, in a fixed order (the same on every rank, so they can be all-reduced)."""
    keys = ["data/samples", "data/skipped"]
    for name in names:
        keys += [f"data/{name}/samples", f"data/{name}/skipped"] + [f"data/{name}/skipped/{r}" for r in reasons]
    return keys


class BlendedStream:
    """Raw samples from weighted sources: `next()` -> (source number, RawSample); `counts` samples per source."""

    def __init__(self, sources: Sequence[tuple[str, float, Sequence[str]]], dp_rank: int, dp_size: int, seed: int,
                 shuffle_window: int, sample_filter: Optional[SampleFilter] = None) -> None:
        self.names = [name for name, _, _ in sources]
        self.weights = [weight for _, weight, _ in sources]
        # Source 0 keeps the keys of a single-source stream: a one-source "blend" reads what it always read.
        self.streams = [ShardStream(paths, dp_rank, dp_size, seed, shuffle_window, source=i,
                                    sample_filter=sample_filter)
                        for i, (_, _, paths) in enumerate(sources)]
        self.counts = [0] * len(sources)

    def choose(self) -> int:
        """The source of the next sample (depends on the counts only)."""
        if len(self.streams) == 1:
            return 0
        n = sum(self.counts) + 1
        deficits = [w * n - c for w, c in zip(self.weights, self.counts)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def __next__(self) -> tuple[int, RawSample]:
        i = self.choose()
        sample = next(self.streams[i])
        self.counts[i] += 1
        return i, sample

    def __iter__(self) -> "BlendedStream":
        return self
