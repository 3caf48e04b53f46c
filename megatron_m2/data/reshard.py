"""Continue the data at another data-parallel size: the old ranks' positions -> each new rank's position.

As Megatron-LM's consumed-samples sampler continues its global sample order when DP changes, a resumed run here
continues the epochs the old ranks were in: every sample they had not read yet is read once before those epochs
end, and none they had read is read again before then. In a source's epoch each old rank had a plan of pieces
(shard, stride, phase, start: data/shards.py) and a position in it; the pieces it had not finished (the current one
from its offset on, the ones after it; every piece of an epoch it had not reached yet, for ranks behind the others)
are dealt to the new ranks in turn, split into strided parts when there are fewer pieces than new ranks. The new
ranks start these epochs with that explicit plan; later epochs follow the new size as usual.

A blend keeps its weights: each new rank's blend starts counting afresh and follows the weights exactly from the
resume (every source within one sample of its share). The old ranks' sample and skip counts go to the new rank 0,
so the logged job totals go on.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

from megatron_m2.data.shards import Piece, epoch_plan


def _plan(state: dict, epoch: int) -> list[Piece]:
    """What the old rank of `state` reads in `epoch` (its explicit plan if it had one)."""
    explicit = {int(e): pieces for e, pieces in state.get("plans", ())}.get(epoch)
    if explicit is not None:
        return [Piece(*piece) for piece in explicit]
    return epoch_plan(state["num_shards"], state["dp_rank"], state["dp_size"], state["seed"], epoch,
                      state.get("source", 0))


def _unread(state: dict, epoch: int) -> list[Piece]:
    """The pieces of `epoch` the old rank had not read (all of them if it had not reached the epoch)."""
    if state["epoch"] > epoch:
        return []
    plan = _plan(state, epoch)
    if state["epoch"] < epoch:
        return plan
    rest = plan[state["shard"]:]
    if rest:
        rest[0] = rest[0]._replace(start=state["offset"])
    return rest


def _deal(per_rank: Sequence[list[Piece]], dp_size: int) -> list[list[Piece]]:
    """Round-robin over the new ranks, the old ranks' pieces interleaved; strided parts when they are too few."""
    pieces = [piece for row in range(max(map(len, per_rank), default=0))
              for pieces in per_rank if row < len(pieces) for piece in [pieces[row]]]
    if pieces and len(pieces) < dp_size:
        parts = math.ceil(dp_size / len(pieces))  # slot % (stride * parts) == phase + j * stride, j < parts
        pieces = [Piece(p.shard, p.stride * parts, p.phase + j * p.stride, p.start)
                  for p in pieces for j in range(parts)]
    return [pieces[rank::dp_size] for rank in range(dp_size)]


def reshard_stream_positions(states: Sequence[dict], dp_rank: int, dp_size: int) -> dict:
    """One source: the ShardStream state of new rank dp_rank of dp_size from every old rank's state, in old rank
    order (their `state_dict()`s)."""
    first, last = min(s["epoch"] for s in states), max(s["epoch"] for s in states)
    plans = tuple((epoch, tuple(_deal([_unread(s, epoch) for s in states], dp_size)[dp_rank]))
                  for epoch in range(first, last + 1))
    stats = sum((Counter(s["stats"]) for s in states), Counter()) if dp_rank == 0 else Counter()
    mine = plans[0][1]
    layout = {key: states[0][key] for key in ("num_shards", "seed", "shuffle_window") if key in states[0]}
    return {**layout, "source": states[0].get("source", 0), "dp_rank": dp_rank, "dp_size": dp_size,
            "epoch": first, "shard": 0, "offset": mine[0].start if mine else 0, "position": 0, "usable_in_epoch": 0,
            "stats": dict(stats), "plans": plans}


def reshard_loader_states(states: Sequence[dict], dp_rank: int, dp_size: int) -> Optional[dict]:
    """The ImageTextBatches state of new rank dp_rank of dp_size from every old rank's `state_dict()`, in old rank
    order; None for positions saved before blending existed (they cannot be continued: start over)."""
    if any("sources" not in state for state in states):
        return None
    sources = []
    for i, source in enumerate(states[0]["sources"]):
        old = [state["sources"][i] for state in states]
        sources.append({"name": source["name"], "weight": source["weight"],
                        "stream": reshard_stream_positions([o["stream"] for o in old], dp_rank, dp_size),
                        "consumed": 0,  # the blend's counts: this rank follows the weights from here
                        "samples": sum(o["samples"] for o in old) if dp_rank == 0 else 0,
                        "corrupt_image": sum(o["corrupt_image"] for o in old) if dp_rank == 0 else 0})
    return {"sources": sources}
