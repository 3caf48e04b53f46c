"""--sequence-parallel and --overlap-grad-reduce train exactly as without them; the gloo reduce-scatter.

World 4 on CPU (gloo): TP2 x DP2 and TP2 x PP2 for sequence parallelism, TP1 x PP2 x DP2 for the overlapped
gradient reduction. The tiny preset with 15 text tokens, so both streams need the sequence-parallel padding
(17 image tokens -> 18, 15 text tokens -> 16) and text rows have their own padding too. One training step through
the trainer's own pieces (megatron DDP, finalize_model_grads, the GBA-ITC step over 2 micro-batches, the grouped ITC
loss) from the same weights, with and without the flag: the same loss and the same gradient for every parameter of
every rank (the sequence-parallel LayerNorm gradients are all-reduced over TP by megatron's finalize_model_grads;
the test fails without that, and without the padding mask), and the same embeddings from the evaluation's encoder
after the step.
"""
from __future__ import annotations

import pytest
import torch

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.testing import run_distributed

WORLD, MICRO_BATCH, NUM_MICROBATCHES = 4, 2, 2
TEXT_LENGTH = 15  # not a multiple of TP 2: the text stream is padded too
TOL = dict(rtol=1e-5, atol=1e-5)  # as tests/test_step.py: float32 sums in another order


def _args(tp: int, pp: int, flags: list[str]):
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.batch_schedule import configure_microbatches

    dp = WORLD // (tp * pp)
    flags = ["--model", "tiny", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(dp * MICRO_BATCH * NUM_MICROBATCHES),
             "--dry-run", *flags]
    args = build_parser().parse_args(flags)
    args.model_config = load_config("tiny", max_text_length=TEXT_LENGTH)
    args.layout = validate_args(args, world_size=WORLD)
    configure_microbatches(args, args.layout)
    return args


def _microbatches(config, dp_rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + dp_rank)
    batches = []
    for _ in range(NUM_MICROBATCHES):
        lengths = torch.randint(3, config.max_text_length + 1, (MICRO_BATCH,), generator=g)
        batches.append(dict(
            images=torch.randint(0, 256, (MICRO_BATCH, config.num_channels, config.image_size, config.image_size),
                                 dtype=torch.uint8, generator=g),
            text_ids=torch.randint(0, config.vocab_size, (MICRO_BATCH, config.max_text_length), generator=g),
            text_padding_mask=torch.arange(config.max_text_length)[None, :] >= lengths[:, None]))
    return batches


def _step_with_and_without(tp: int, pp: int, flag: str, common: tuple[str, ...] = ()) -> dict:
    """On every rank: (loss, gradients) of one step at TP x PP with the `common` flags, without and with `flag`."""
    from megatron.core import parallel_state as ps

    from megatron_m2.config import transformer_overrides
    from megatron_m2.eval.runner import make_encoders
    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_backward, forward_step, reduce_metrics, step_config_from_args

    config = load_config("tiny", max_text_length=TEXT_LENGTH)
    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    weights = canonical_state_dict(build_model(config, spec="local"), config)
    out: dict = {}
    for with_flag in (False, True):
        args = _args(tp, pp, [*common, *([flag] if with_flag else [])])
        parallel.initialize_model_parallel(tp, pp)
        model = build_model(config, spec="local", **transformer_overrides(args.recompute_activations,
                                                                          sequence_parallel=args.sequence_parallel))
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        load_canonical_state_dict(model, weights, config, tp_rank, tp, pp_rank, pp)
        ddp = wrap_ddp(model, args)
        build_optimizer(ddp, args)  # wires megatron's finalize_model_grads (DP and sequence-parallel reductions)
        ddp.zero_grad_buffer()
        metrics = forward_backward(forward_step, iter(_microbatches(config, ps.get_data_parallel_rank())), ddp,
                                   step_config_from_args(args))
        # the evaluation's encoder: forward-only schedule, odd count (a padded last micro-batch)
        encode_images, _ = make_encoders(forward_step, model, None, config, MICRO_BATCH)
        encoded = encode_images(torch.randn(3, config.num_channels, config.image_size, config.image_size,
                                            generator=torch.Generator().manual_seed(9)))
        out[with_flag] = dict(
            loss=reduce_metrics(metrics)["itc_loss"] if ps.is_pipeline_last_stage() else None,
            grads={name: p.main_grad.detach().clone() for name, p in model.named_parameters()},
            marked=sorted(name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False)),
            overlap=ddp.ddp_config.overlap_grad_reduce, encoded=encoded)
        out["rank"] = (tp_rank, pp_rank, ps.get_data_parallel_rank())
    return out


def _check_same_step(results, tp: int, pp: int) -> None:
    assert sorted(r["rank"] for r in results) == sorted(
        (t, p, d) for t in range(tp) for p in range(pp) for d in range(WORLD // (tp * pp)))
    losses = [r for r in results if r[False]["loss"] is not None]
    assert losses
    for r in losses:
        assert r[True]["loss"] == pytest.approx(r[False]["loss"], rel=1e-6), r["rank"]
    for r in results:
        without, with_flag = r[False]["grads"], r[True]["grads"]
        assert sorted(with_flag) == sorted(without)
        for name, want in without.items():
            torch.testing.assert_close(with_flag[name], want, **TOL, msg=lambda m: f"{r['rank']} {name}: {m}")
        torch.testing.assert_close(r[True]["encoded"], r[False]["encoded"], **TOL)


@pytest.mark.parametrize("pp,common", [(1, ()), (2, ()), (2, ("--recompute-activations",))],
                         ids=["tp2xdp2", "tp2xpp2", "tp2xpp2-recompute"])  # the last: the 10B example's flags
def test_sequence_parallel_step_equals_tensor_parallel_step(pp, common):
    results = run_distributed(WORLD, _step_with_and_without, 2, pp, "--sequence-parallel", common)
    _check_same_step(results, 2, pp)
    for r in results:
        # the replicated norms and the row-parallel biases run on split sequences and are reduced over TP
        assert not r[False]["marked"] and r[True]["marked"]
        assert all(name.endswith(("layernorm.weight", "layernorm.bias", "linear.bias", "linear_fc2.linear.bias"))
                   for name in r[True]["marked"]), r[True]["marked"]


def test_overlapped_grad_reduce_step_equals_the_plain_step():
    results = run_distributed(WORLD, _step_with_and_without, 1, 2, "--overlap-grad-reduce")
    _check_same_step(results, 1, 2)
    assert all(r[True]["overlap"] and not r[False]["overlap"] for r in results)


def _reduce_scatter(async_op: bool) -> dict:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import layers, mappings

    rank, world = dist.get_rank(), dist.get_world_size()
    full = torch.arange(world * 3 * 2, dtype=torch.float32).view(world * 3, 2) * (rank + 1)
    out = torch.empty(3, 2)
    handle = mappings.dist_reduce_scatter_func(out, full, async_op=async_op)
    if async_op:
        handle.wait()
    expected = torch.arange(world * 3 * 2, dtype=torch.float32).view(world, 3, 2)[rank] * sum(range(1, world + 1))
    return dict(out=out, expected=expected, same_function=layers.dist_reduce_scatter_func is
                mappings.dist_reduce_scatter_func, name=mappings.dist_reduce_scatter_func.__name__)


@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
def test_the_gloo_reduce_scatter_sums_each_block_on_its_rank(async_op):
    for r in run_distributed(WORLD, _reduce_scatter, async_op):
        assert r["name"] == "_reduce_scatter_by_all_to_all" and r["same_function"]
        torch.testing.assert_close(r["out"], r["expected"], rtol=0, atol=0)


def test_padding_and_the_packed_length():
    from megatron_m2.config import padded_length
    from megatron_m2.models.m2_model import packed_sequence_length
    from megatron_m2.models.sequence_parallel import padded_key_mask

    assert [padded_length(197, tp) for tp in (1, 2, 4, 8)] == [197, 198, 200, 200]
    assert padded_length(52, 8) == 56 and padded_length(52, 4) == 52
    config = load_config("10b")
    assert packed_sequence_length(config) == 197 + 52
    assert packed_sequence_length(config, sequence_parallel_size=8) == 200 + 56
    assert packed_sequence_length(config, with_text=False, sequence_parallel_size=2) == 198
    assert padded_key_mask(None, 2, 4, 2, "cpu") is None  # nothing to mask
    mask = padded_key_mask(torch.tensor([[False, False, True]]), 1, 3, 2, "cpu")
    assert mask.tolist() == [[False, False, True, True]]
    assert padded_key_mask(None, 1, 3, 4, "cpu").tolist() == [[False, False, False, True]]
