"""Timers at each --timing-log-level, and the parameter sync around saves and evaluations (--overlap-param-gather).

What the timers print in a real run (level 2, several processes) is checked end to end in tests/test_multinode.py.
"""
from __future__ import annotations

import argparse
import types

import pytest


def _model():
    return types.SimpleNamespace(config=types.SimpleNamespace(timers="stale", barrier_with_L1_time=True))


def test_level_0_builds_no_timers_and_higher_levels_filter_by_level():
    from megatron.core.timers import DummyTimer, Timer

    from megatron_m2.training.monitoring import attach_timers

    model = _model()
    args = argparse.Namespace(timing_log_level=0, timing_log_option="minmax", barrier_with_L1_time=False)
    assert attach_timers(model, args) is None and model.config.timers is None  # nothing to call: no cost
    assert model.config.barrier_with_L1_time is False
    args.timing_log_level = 1
    timers = attach_timers(model, args)
    assert model.config.timers is timers
    assert isinstance(timers("optimizer", log_level=1), Timer)
    assert isinstance(timers("batch-generator", log_level=2), DummyTimer)  # level 2 only at --timing-log-level 2


class _OverlappedDDP:
    """Records what megatron's DDP is asked (with --overlap-param-gather its forward pre-hooks gather parameters)."""

    def __init__(self, use_forward_hook: bool):
        self.use_forward_hook, self.calls = use_forward_hook, []

    def disable_forward_pre_hook(self, param_sync: bool = True):
        self.calls.append(("disable", param_sync))

    def enable_forward_pre_hook(self):
        self.calls.append(("enable",))


def test_parameters_are_gathered_before_a_save_and_the_hooks_come_back_after():
    from megatron_m2.training.optimizer import parameters_synced

    ddp = _OverlappedDDP(use_forward_hook=True)
    with parameters_synced(ddp):
        assert ddp.calls == [("disable", True)]  # disable_forward_pre_hook(param_sync=True) gathers them now
    assert ddp.calls == [("disable", True), ("enable",)]
    with pytest.raises(RuntimeError), parameters_synced(ddp):
        raise RuntimeError("a failed save")
    assert ddp.calls[-1] == ("enable",)
    plain = _OverlappedDDP(use_forward_hook=False)  # without the flag: nothing to do
    with parameters_synced(plain):
        pass
    assert plain.calls == []
