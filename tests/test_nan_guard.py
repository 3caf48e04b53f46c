"""The NaN guard (--check-for-nan-in-loss-and-grad): a NaN injected into one data-parallel rank's embeddings at
chosen steps (a deterministic test hook: a forward step that poisons its output) skips those steps on every rank,
with no change to the weights, the optimizer or the schedule; the (N+1)-th such step in a row stops the run.
World 4 = TP1 x PP2 x DP2, the real model, DDP, optimizer and scheduler, batch accumulation on."""
from __future__ import annotations

import pytest
import torch

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.testing import run_distributed

STEPS, MICRO_BATCH, NUM_MICROBATCHES = 5, 2, 2


def _poisoning_forward_step(poisoned_steps: set, step: list):
    """training/step.py's forward_step, but on data-parallel rank 0 its last stage outputs NaN embeddings during the
    steps in `poisoned_steps` (step[0] is the current step)."""
    from megatron.core import parallel_state as ps

    from megatron_m2.training.step import forward_step

    def poisoned(data_iterator, model, **kwargs):
        output, loss_func = forward_step(data_iterator, model, **kwargs)
        if isinstance(output, tuple) and step[0] in poisoned_steps and ps.get_data_parallel_rank() == 0:
            output = tuple(t * float("nan") if t is not None else None for t in output)
        return output, loss_func

    return poisoned


def _train(poisoned_steps: list, max_consecutive: int):
    from megatron.core import parallel_state as ps

    from megatron_m2.models import build_model
    from megatron_m2.models.m2_model import packed_sequence_length
    from megatron_m2.training.arguments import build_parser
    from megatron_m2.training.nan_guard import NanGuard, NonFiniteStepsError
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import StepConfig, train_step

    config = load_config("tiny")
    parallel.initialize_model_parallel(1, 2)
    torch.manual_seed(0)
    model = build_model(config, spec="local")
    args = build_parser().parse_args(["--lr", "1e-2", "--lr-warmup-iters", "0", "--train-iters", str(STEPS)])
    args.lr_decay_iters = args.train_iters
    ddp = wrap_ddp(model, args)
    optimizer, scheduler = build_optimizer(ddp, args)
    guard = NanGuard(max_consecutive)
    step_config = StepConfig(NUM_MICROBATCHES, MICRO_BATCH, packed_sequence_length(config))
    step = [0]
    forward_step_func = _poisoning_forward_step(set(poisoned_steps), step)
    g = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    records, error = [], None
    for step[0] in range(1, STEPS + 1):
        batches = iter([dict(images=torch.randint(0, 256, (MICRO_BATCH, 3, config.image_size, config.image_size),
                                                  dtype=torch.uint8, generator=g),
                             text_ids=torch.randint(0, config.vocab_size, (MICRO_BATCH, config.max_text_length),
                                                    generator=g),
                             text_padding_mask=torch.zeros(MICRO_BATCH, config.max_text_length, dtype=torch.bool))
                        for _ in range(NUM_MICROBATCHES)])
        before = [p.detach().clone() for p in model.parameters()]
        try:
            metrics = train_step(forward_step_func, batches, ddp, optimizer, scheduler, step_config, nan_guard=guard)
        except NonFiniteStepsError as exc:
            error = (step[0], str(exc))
            break
        records.append(dict(step=step[0], skipped=metrics.get("skipped", 0.0), lr=metrics["lr"],
                            scheduler_steps=scheduler.num_steps,
                            unchanged=all(torch.equal(a, b) for a, b in zip(before, model.parameters())),
                            finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                            loss=metrics.get("itc_loss")))
    return dict(records=records, error=error)


def test_non_finite_steps_are_skipped_on_every_rank_without_any_update():
    for result in run_distributed(4, _train, [2, 3], 2):
        records = {r["step"]: r for r in result["records"]}
        assert result["error"] is None and sorted(records) == list(range(1, STEPS + 1))
        for step, r in records.items():
            poisoned = step in (2, 3)
            assert r["skipped"] == float(poisoned) and r["unchanged"] == poisoned and r["finite"], r
        # the schedule advances with applied steps only (Megatron-LM's rule for skipped iterations)
        assert [records[s]["scheduler_steps"] for s in range(1, STEPS + 1)] == [1, 1, 1, 2, 3]
        assert records[1]["lr"] == records[2]["lr"] == records[3]["lr"] != records[4]["lr"]  # the next step's lr
        if records[1]["loss"] is not None:  # the last stage logs the loss: NaN while poisoned, finite after
            assert all(records[s]["loss"] != records[s]["loss"] for s in (2, 3))
            assert all(records[s]["loss"] == records[s]["loss"] for s in (1, 4, 5))


def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_a_clear_error():
    for result in run_distributed(4, _train, [2, 3, 4, 5], 2):
        step, message = result["error"]
        assert step == 4 and "3 steps in a row had a NaN or Inf" in message
        assert "--max-consecutive-nan-iterations 2" in message
        assert all(r["finite"] for r in result["records"])
    for result in run_distributed(4, _train, [3], 0):  # 0: stop at the first, as Megatron-LM's check does
        assert result["error"][0] == 3 and [r["step"] for r in result["records"]] == [1, 2]


def test_nan_flags_are_checked():
    from megatron_m2.errors import ConfigError
    from megatron_m2.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(["--max-consecutive-nan-iterations", "-1", "--dry-run"])
    args.model_config = load_config("tiny")
    with pytest.raises(ConfigError, match="--max-consecutive-nan-iterations must be >= 0"):
        validate_args(args, world_size=1)
    assert build_parser().parse_args(["--no-check-for-nan-in-loss-and-grad"]).check_for_nan_in_loss_and_grad is False
