"""A rank's random state as dropout and drop path consume it: torch's CPU generator, the current CUDA device's
generator (if any) and megatron's RNG tracker states (model-parallel, data-parallel, expert and the drop-path masks'
own, models/drop_path.py).

Two users:
- GBA-ITC's exact batch accumulation (training/step.py) captures it before pass 1 and restores it before pass 3, so
  both forwards draw the same dropout and drop-path masks: each stage runs the forwards of micro-batches 1..M in that
  order in both passes (megatron's forward-only and 1F1B schedules alike), backward passes draw nothing, and activation
  recompute (tensor_parallel.checkpoint) restores the states it used around its second forward. Pass 3 then leaves
  the generators where its forwards left them, for the next step.
- checkpoints: each rank saves its own (`state_dict`) and a resume at the same layout restores it (training/loop.py),
  so the masks after a resume are the uninterrupted run's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
