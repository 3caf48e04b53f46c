"""A rank's random state as dropout and drop path consume it: torch's CPU generator, the current CUDA device's
generator (if any) and megatron's RNG tracker states (model-parallel, data-parallel, expert and the drop-path masks'
own, models/drop_path.py).

The masked streams of --cmlm-weight / --cmim-weight (their tower passes and the decoders) draw from a second such
state, `masked_streams_random_state()`, seeded from --seed + MASKED_STREAMS_SEED_OFFSET alike on TP peers (as the
main one): so the unmasked streams draw exactly what they draw without the objectives, which GBA-ITC's pass 1 (no
masked streams) and pass 3 (with them) need.

Users:
- GBA-ITC's exact batch accumulation (training/step.py) captures it before pass 1 and restores it before pass 3, so
  both forwards draw the same dropout and drop-path masks: each stage runs the forwards of micro-batches 1..M in that
  order in both passes (megatron's forward-only and 1F1B schedules alike), backward passes draw nothing, and activation
  recompute (tensor_parallel.checkpoint) restores the states it used around its second forward. Pass 3 then leaves
  the generators where its forwards left them, for the next step.
- the model (models/m2_model.py), around its masked streams;
- checkpoints: each rank saves its own (`checkpoint_state`, both states) and a resume at the same layout restores it
  (`load_checkpoint_state`, training/loop.py), so the masks after a resume are the uninterrupted run's.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from megatron.core import tensor_parallel


def _clone(state: Any) -> Any:
    """A copy of one tracker state: a tensor, or a generator (megatron's CUDA-graph-safe tracker keeps those)."""
    if isinstance(state, torch.Generator):
        return state.clone_state()
    return state.clone() if isinstance(state, torch.Tensor) else state


@dataclass
class RandomState:
    cpu: torch.Tensor
    cuda: Optional[torch.Tensor] = None
    tracker: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> "RandomState":
        """This rank's generators now (copies: later draws do not change them)."""
        tracker = tensor_parallel.get_cuda_rng_tracker()
        states = tracker.get_states() if tracker.is_initialized() else {}
        return cls(cpu=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                   tracker={name: _clone(state) for name, state in states.items()})

    def restore(self) -> None:
        """Set every generator to the captured state (may be called again: the capture itself stays unchanged)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.cuda)
        if self.tracker:
            tensor_parallel.get_cuda_rng_tracker().set_states({name: _clone(s) for name, s in self.tracker.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "cuda": self.cuda, "tracker": dict(self.tracker)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RandomState":
        return cls(cpu=state["cpu"], cuda=state.get("cuda"), tracker=dict(state.get("tracker") or {}))


MASKED_STREAMS_SEED_OFFSET = 100_003  # apart from every seed of the main state (seed, + 1024, + 2718 + tp, + 3119)
_MASKED_STREAMS: Optional[RandomState] = None


def seed_masked_streams(seed: int) -> None:
    """Create the masked streams' state as parallel.initialize_model_parallel seeds the main one, from `seed`; the
    main state is left as it was."""
    global _MASKED_STREAMS
    from megatron_m2.models.drop_path import DROP_PATH_RNG, DROP_PATH_SEED_OFFSET

    main = RandomState.capture()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    tensor_parallel.get_cuda_rng_tracker().add(DROP_PATH_RNG, seed + DROP_PATH_SEED_OFFSET)
    _MASKED_STREAMS = RandomState.capture()
    main.restore()


@contextmanager
def masked_streams_random_state() -> Iterator[None]:
    """Inside: every generator is the masked streams' (a no-op before `seed_masked_streams`); after: the main state
    goes on as if nothing had been drawn."""
    global _MASKED_STREAMS
    if _MASKED_STREAMS is None:
        yield
        return
    main = RandomState.capture()
    _MASKED_STREAMS.restore()
    try:
        yield
    finally:
        _MASKED_STREAMS = RandomState.capture()
        main.restore()


def checkpoint_state() -> dict[str, Any]:
    """This rank's random states for a checkpoint: the main one and the masked streams' one."""
    return {"main": RandomState.capture().state_dict(),
            "masked_streams": _MASKED_STREAMS.state_dict() if _MASKED_STREAMS is not None else None}


def load_checkpoint_state(state: dict[str, Any]) -> None:
    """Restore what `checkpoint_state` saved."""
    global _MASKED_STREAMS
    RandomState.from_state_dict(state["main"]).restore()
    if state.get("masked_streams") is not None:
        _MASKED_STREAMS = RandomState.from_state_dict(state["masked_streams"])
