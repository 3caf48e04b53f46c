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
from typing import Sequence, Union

from megatron_m2.data.shards import RawSample, ShardStream, resolve_shards
from megatron_m2.errors import ConfigError

# What build_train_data accepts: one shard spec (str or paths) or a blend [(weight, shard spec), ...].
ShardsOrBlend = Union[str, Sequence[str], Sequence[tuple[float, Union[str, Sequence[str]]]]]


def _weight(value: str):
    try:
        return float(value)
    except ValueError:
        return None


def parse_data_path(values: Union[str, Sequence[str]]) -> list[tuple[float, list[str]]]:
    """--data-path values -> [(normalised weight, resolved shard paths)]; ConfigError names the flag.

    `a/ b/*.tar` is one source of all their shards (weight 1); `0.7 a/ 0.3 b/` two sources, 70% / 30% of samples.
    """
    values = [values] if isinstance(values, str) else list(values or [])
    if not values:
        raise ConfigError("--data-path is empty: pass tar shards, a directory of them or a pattern "
                          "like data/shard-{00000..00009}.tar (tools/make_shards.py writes them)")
    weights = [_weight(v) for v in values]
    if all(w is None for w in weights):
        return [(1.0, resolve_shards(values))]
    if len(values) % 2 or any(w is None for w in weights[0::2]) or any(w is not None for w in weights[1::2]):
        raise ConfigError(f"--data-path {' '.join(values)}: give either paths only, or alternating weight and "
                          "path pairs (e.g. --data-path 0.7 zh-shards/ 0.3 en-shards/), not a mix")
    pairs = list(zip(weights[0::2], values[1::2]))
    bad = [w for w, _ in pairs if not (w > 0 and w < float("inf"))]
    if bad:
        raise ConfigError(f"--data-path: weights must be positive finite numbers, got {bad}")
    total = sum(w for w, _ in pairs)
    return [(w / total, resolve_shards(path)) for w, path in pairs]


def normalize_sources(shards_or_blend: ShardsOrBlend) -> list[tuple[str, float, list[str]]]:
    """(name, weight, shard paths) per source, for a plain shard spec or a [(weight, spec), ...] blend.

    Names come from the folder holding a source's shards (`zh-shards/shard-00000.tar` -> `zh-shards`); they key
    the stats (`data/zh-shards/samples`) and are checked on resume. A name taken twice gets the source number."""
    if isinstance(shards_or_blend, str) or not shards_or_blend or not isinstance(shards_or_blend[0], (tuple, list)):
        sources = [(1.0, resolve_shards(shards_or_blend))]
    else:
        sources = [(float(w), resolve_shards(spec)) for w, spec in shards_or_blend]
        total = sum(w for w, _ in sources)
        if not all(w > 0 for w, _ in sources) or not total < float("inf"):
            raise ConfigError(f"--data-path: weights must be positive finite numbers, got {[w for w, _ in sources]}")
        sources = [(w / total, paths) for w, paths in sources]
    names = [_source_name(paths) for _, paths in sources]
    names = [name if names.count(name) == 1 else f"{name}.{i}" for i, name in enumerate(names)]
    return [(name, w, paths) for name, (w, paths) in zip(names, sources)]


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
                 shuffle_window: int) -> None:
        self.names = [name for name, _, _ in sources]
        self.weights = [weight for _, weight, _ in sources]
        # Source 0 keeps the keys of a single-source stream: a one-source "blend" reads what it always read.
        self.streams = [ShardStream(paths, dp_rank, dp_size, seed, shuffle_window, source=i)
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
