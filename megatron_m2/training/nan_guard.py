"""The NaN guard (--check-for-nan-in-loss-and-grad): a step whose loss or gradients hold a NaN or Inf is not applied.

bf16 has no loss scaler, so nothing else stops one non-finite step from writing NaN into every weight (Adam's moments
and the clipped update spread it). After the backward, before the optimizer step, every rank checks its loss (last
stage) and its gradient buffers (after megatron's data-parallel reduction) and all ranks agree in one all-reduce.
A non-finite step is skipped as megatron-core's found-inf path skips one (no update, no scheduler step; counted in
the log's skipped and nan iterations); after --max-consecutive-nan-iterations skipped steps in a row the run stops
with an error (0: at the first, as Megatron-LM's check does).

Why not megatron-core's own checks: DistributedDataParallelConfig.check_for_nan_in_grad raises on the rank that sees
the NaN, inside the backward, before the data-parallel reduction, while its peers go on into that collective and
wait for it until the distributed timeout; and the optimizer's found-inf path exists only with a loss scaler (fp16).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


class NonFiniteStepsError(RuntimeError):
    """Too many non-finite steps in a row: the run stops (a checkpoint from before them is the way back)."""


class NanGuard:
    """Decides, collectively, whether this step's update is skipped; counts skipped steps in a row (checkpointed)."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    @staticmethod
    def _all_finite(model: torch.nn.Module, losses: Iterable[torch.Tensor]) -> bool:
        device = next(model.parameters()).device
        tensors = [t.detach().float().reshape(-1) for t in losses]
        tensors += [g for g in (getattr(p, "main_grad", p.grad) for p in model.parameters() if p.requires_grad)
                    if g is not None]
        found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
        for dtype in {t.dtype for t in tensors}:  # megatron's found-inf primitive, one fused pass per dtype (the
            # unscale by 1 changes nothing)
            torch._amp_foreach_non_finite_check_and_unscale_([t for t in tensors if t.dtype == dtype], found, one)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)  # every rank skips, or none
        return found.item() == 0.0

    def skip_step(self, model: torch.nn.Module, losses: Iterable[torch.Tensor]) -> bool:
        """True if the step must not be applied (collective: every rank calls it once per step). Raises
        NonFiniteStepsError at the (--max-consecutive-nan-iterations + 1)-th non-finite step in a row."""
        if self._all_finite(model, losses):
            self.consecutive = 0
            return False
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteStepsError(
                f"{self.consecutive} steps in a row had a NaN or Inf in the loss or the gradients (skipped "
                f"without an update; --max-consecutive-nan-iterations {self.max_consecutive}): the run stops. "
                "Resume from a checkpoint before them, with a lower --lr or another --seed")
        return True

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
