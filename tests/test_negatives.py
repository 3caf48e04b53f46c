"""Negatives beyond the step: --itc-batch-accumulation memory / off / exact with the --itc-queue-size queue and the
--momentum-towers (training/negatives.py), against one-process references of loss.py's formulas.

- itc_loss's `negatives` columns (chunked or not) and `gathered_out`, one process, against the formula written out;
- world 8 = TP2 x PP2 x DP2, 2 micro-batches of 2 per DP rank, each mode with a pre-filled (wrapped-around) queue:
  the DP-reduced loss and every parameter gradient equal the TP1 x PP1 reference's of the mode's formula; the step's
  features for the queue are the group's embeddings; the queue (one per ITC group) and the momentum towers survive a
  checkpoint round trip; the momentum towers move by theta_m = M theta_m + (1 - M) theta after the update;
- the real trainer with the queue and momentum towers: stopped at step 3 and resumed, it trains on the uninterrupted
  run's losses exactly; its TP2 x PP2 checkpoint resumes at TP1 x PP1 (the momentum towers resharded) on the same
  losses;
- flag errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_m2 import parallel
from megatron_m2.errors import ConfigError
from megatron_m2.testing import forking_allowed, run_command, run_distributed
from tests.test_step import (DP, GLOBAL_BATCH, MICRO_BATCH, NUM_MICROBATCHES, PP, TOL, TP, WORLD, _global_batch,
                             _rows, _trainer_args)

QUEUE = 6  # pre-filled with 8 rows per group: the ring wraps around and keeps the last 6


def _clip_with_negatives(image, text, log_scale, extra_image, extra_text):
    """loss.py's formula: i2t rows against [texts; negative texts], t2i rows against [images; negative images]."""
    scale = log_scale.clamp(max=math.log(100)).exp()
    labels = torch.arange(image.shape[0])
    i2t = scale * image @ torch.cat([text, extra_text]).T
    t2i = scale * text @ torch.cat([image, extra_image]).T
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2


# -- itc_loss, one process --------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 3])
def test_itc_loss_negatives_are_extra_detached_columns(chunk_size):
    from megatron_m2.loss import itc_loss

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_(True)
    neg_image = F.normalize(torch.randn(7, 8, generator=g), dim=1).requires_grad_(True)
    neg_text = F.normalize(torch.randn(7, 8, generator=g), dim=1).requires_grad_(True)
    scale = torch.tensor(2.5, requires_grad=True)
    gathered: list = []
    loss, _ = itc_loss(image, text, scale, chunk_size=chunk_size, negatives=(neg_image, neg_text),
                       gathered_out=gathered)
    loss.backward()
    got = [image.grad.clone(), text.grad.clone(), scale.grad.clone()]
    assert neg_image.grad is None and neg_text.grad is None  # detached: no gradient reaches them
    for t in (image, text, scale):
        t.grad = None
    want = _clip_with_negatives(image, text, scale, neg_image.detach(), neg_text.detach())
    want.backward()
    torch.testing.assert_close(loss, want, **TOL)
    for a, b in zip(got, [image.grad, text.grad, scale.grad]):
        torch.testing.assert_close(a, b, **TOL)
    assert len(gathered) == 1 and torch.equal(gathered[0][0], image.detach())
    # without negatives: the plain CLIP loss (the negatives really enter)
    plain, _ = itc_loss(image, text, scale, chunk_size=chunk_size)
    assert plain.item() < loss.item()


def test_the_queue_is_a_ring_that_keeps_the_last_rows():
    from megatron_m2.training.negatives import NegativesQueue

    queue = NegativesQueue(5, 2, torch.device("cpu"))
    assert queue.negatives() is None
    rows = torch.arange(24, dtype=torch.float32).reshape(6, 4)  # 6 rows of [image (2); text (2)]
    queue.enqueue((rows[:3, :2], rows[:3, 2:]))
    queue.enqueue((rows[3:, :2], rows[3:, 2:]))  # wraps: row 5 over row 0
    image, text = queue.negatives()
    assert sorted(image[:, 0].tolist()) == [4, 8, 12, 16, 20] and queue.filled == 5
    queue.enqueue((torch.zeros(7, 2), torch.ones(7, 2)))  # more than K: the last K
    assert queue.filled == 5 and torch.equal(queue.negatives()[1], torch.ones(5, 2))


def test_a_skipped_step_enqueues_nothing_and_leaves_the_momentum_towers():
    from megatron_m2.training.negatives import NegativesQueue, NegativesState

    class Towers:  # records the EMA updates
        updates = 0

        def update(self, online, optimizer):
            self.updates += 1

    state = NegativesState(4, 2, NegativesQueue(4, 2, torch.device("cpu")), Towers())
    state.pending = (torch.ones(3, 2), torch.ones(3, 2))
    state.end_step(False, None, None)  # a skipped step (non-finite loss or gradients)
    assert state.queue.filled == 0 and state.momentum.updates == 0 and state.pending is None
    state.pending = (torch.ones(3, 2), torch.ones(3, 2))
    state.end_step(True, None, None)
    assert state.queue.filled == 3 and state.momentum.updates == 1


# -- the step at world 8 ----------------------------------------------------------------------------------------

def _queues(config, num_groups: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """8 rows of each group's queue features, the same on every rank (the queue keeps the last QUEUE)."""
    g = torch.Generator().manual_seed(11)
    return [tuple(F.normalize(torch.randn(8, config.out_dim, generator=g), dim=1) for _ in range(2))
            for _ in range(num_groups)]


def _group_rows(ranks, micros) -> torch.Tensor:
    return torch.cat([torch.arange(GLOBAL_BATCH)[_rows(r, m)] for r in ranks for m in micros])


def _reference(image, text, log_scale, group_size: int, mode: str, queues):
    """The mode's objective (loss.py's docstring) and, per group, the row order of the features the step enqueues."""
    losses, enqueued = [], []
    micros = range(NUM_MICROBATCHES)
    for k, first in enumerate(range(0, DP, group_size)):
        ranks = range(first, first + group_size)
        q_image, q_text = (q[-QUEUE:] for q in queues[k]) if queues else (image[:0].detach(), text[:0].detach())
        if mode == "exact":
            index = _group_rows(ranks, micros)
            losses.append(_clip_with_negatives(image[index], text[index], log_scale, q_image, q_text))
            enqueued.append(index)
            continue
        earlier: list[torch.Tensor] = []
        for m in micros:
            index = _group_rows(ranks, [m])
            extra = earlier if mode == "memory" else []
            losses.append(_clip_with_negatives(
                image[index], text[index], log_scale,
                torch.cat([image[e].detach() for e in extra] + [q_image]),
                torch.cat([text[e].detach() for e in extra] + [q_text])))
            earlier.append(index)
        enqueued.append(torch.cat(earlier))
    return torch.stack(losses).mean(), enqueued


def _negatives_step(extra: list[str], root: str):
    from megatron.core import parallel_state as ps

    from megatron_m2 import checkpointing
    from megatron_m2.data.transforms import normalize
    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict, unshard_state_dicts
    from megatron_m2.training.negatives import build_negatives_state
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_backward, forward_step, reduce_metrics, step_config_from_args

    args = _trainer_args(extra)
    config, g = args.model_config, args.layout.itc_group_size
    images, ids, padding = _global_batch(config)
    queues = _queues(config, DP // g) if args.itc_queue_size else None

    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    reference = build_model(config, spec="local")
    full = canonical_state_dict(reference, config)
    image_embeds, text_embeds = reference(normalize(images), ids, padding)
    objective, enqueued = _reference(image_embeds, text_embeds, reference.logit_scale, g,
                                     args.itc_batch_accumulation, queues)
    objective.backward()
    ref_grads = unshard_state_dicts({(0, 0): {n: p.grad for n, p in reference.named_parameters()}}, config)
    if args.momentum_towers:  # momentum towers that differ from the model: the queue must get THEIR features
        torch.manual_seed(5)
        towers = build_model(config, spec="local")
        towers_full = canonical_state_dict(towers, config)
        with torch.no_grad():
            towers_embeds = towers(normalize(images), ids, padding)

    parallel.initialize_model_parallel(TP, PP, g)
    torch.manual_seed(1)
    build = lambda: build_model(config, spec="local")  # noqa: E731
    model = build()
    tp_rank, pp_rank, dp_rank = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                 ps.get_data_parallel_rank())
    load_canonical_state_dict(model, full, config, tp_rank, TP, pp_rank, PP)
    negatives = build_negatives_state(args, model, build)
    if args.momentum_towers:
        load_canonical_state_dict(negatives.momentum.model, towers_full, config, tp_rank, TP, pp_rank, PP)
        towers_before = {n: p.detach().clone() for n, p in negatives.momentum.model.named_parameters()}
    if negatives is not None and negatives.queue is not None:  # the last stage: 4 + 4 rows, wrapping around
        rows = queues[dp_rank // g]
        negatives.queue.enqueue((rows[0][:4], rows[1][:4]))
        negatives.queue.enqueue((rows[0][4:], rows[1][4:]))
    ddp = wrap_ddp(model, args)
    optimizer, scheduler = build_optimizer(ddp, args)
    batches = iter([dict(images=images[_rows(dp_rank, m)], text_ids=ids[_rows(dp_rank, m)],
                         text_padding_mask=padding[_rows(dp_rank, m)]) for m in range(NUM_MICROBATCHES)])
    ddp.zero_grad_buffer()
    metrics = forward_backward(forward_step, batches, ddp, step_config_from_args(args), negatives)
    reduced = reduce_metrics(metrics) if ps.is_pipeline_last_stage() else None
    out = dict(rank=(tp_rank, pp_rank, dp_rank), loss=reduced["itc_loss"] if reduced else None,
               grads={n: p.main_grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
               objective=objective.item(), ref_grads=ref_grads)
    if negatives is None:
        return out
    group = dp_rank // g
    if negatives.pending is not None:  # the last stage: the step's group features for the queue
        out["pending"] = [t.clone() for t in negatives.pending]
        out["want_pending"] = [e.detach()[enqueued[group]] for e in (image_embeds, text_embeds)]
        if args.momentum_towers:  # the towers' features of the step's batches, rank-major
            index = _group_rows(range(group * g, (group + 1) * g), range(NUM_MICROBATCHES))
            out["want_pending"] = [e[index] for e in towers_embeds]
    update_ok, _, _ = optimizer.step()
    assert update_ok
    negatives.end_step(True, model, optimizer)
    if negatives.momentum is not None:  # theta_m = M theta_m + (1 - M) theta
        m = args.momentum_towers
        for name, ema in negatives.momentum.model.named_parameters():
            new = dict(model.named_parameters())[name].detach()
            torch.testing.assert_close(ema, m * towers_before[name] + (1 - m) * new, **TOL)
        out["ema_moved"] = any(not torch.equal(ema, towers_before[n]) for n, ema in
                               negatives.momentum.model.named_parameters())
    # checkpoint round trip: every ITC group's queue and the momentum towers come back
    with forking_allowed():
        checkpointing.save_checkpoint(root, 1, model, None, None, {}, step_state=negatives)
    torch.manual_seed(2)
    fresh = build_negatives_state(args, build(), build)
    checkpointing.load_checkpoint(root, model, step_state=fresh)
    if negatives.queue is not None:
        assert torch.equal(fresh.queue.features, negatives.queue.features)
        assert torch.equal(fresh.queue.position, negatives.queue.position) and fresh.queue.filled == QUEUE
        out["queue_first_row"] = fresh.queue.negatives()[0][0].clone()
    if negatives.momentum is not None:
        for (name, a), b in zip(fresh.momentum.model.named_parameters(), negatives.momentum.model.parameters()):
            assert torch.equal(a, b), name
    # a queue of another shape (as another number of ITC groups) cannot be mapped: it restarts empty; momentum towers
    # the checkpoint lacks start as a copy of the loaded model
    import copy

    other_args = copy.copy(args)
    other_args.itc_queue_size, other_args.momentum_towers = QUEUE + 1, 0.9
    other = build_negatives_state(other_args, build(), build)
    checkpointing.load_checkpoint(root, model, step_state=other)
    assert other.queue is None or other.queue.filled == 0
    want = (negatives.momentum.model if negatives.momentum is not None else model).named_parameters()
    for (name, a), (_, b) in zip(other.momentum.model.named_parameters(), want):
        assert torch.equal(a, b), name
    return out


def _check(results) -> None:
    from megatron_m2.config import load_config
    from megatron_m2.models.state_dict import unshard_state_dicts

    ref = results[0]
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses and all(loss == pytest.approx(ref["objective"], rel=1e-5) for loss in losses), \
        (losses, ref["objective"])
    for dp_rank in range(DP):
        grads = unshard_state_dicts({r["rank"][:2]: r["grads"] for r in results if r["rank"][2] == dp_rank},
                                    load_config("tiny"), TP, PP)
        for name, want in ref["ref_grads"].items():
            torch.testing.assert_close(grads[name], want, **TOL, msg=lambda m: f"dp {dp_rank} {name}: {m}")
    for r in results:
        if "pending" in r:
            for got, want in zip(r["pending"], r["want_pending"]):
                torch.testing.assert_close(got, want, **TOL)


# each 10-20 s on the 2-core machine once the world-8 pool runs (the first about 45 s: it starts the pool)
@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--itc-batch-accumulation", "memory"],  # the paper's feature memory alone, group = DP
    ["--itc-batch-accumulation", "memory", "--itc-group-size", "1", "--itc-chunk-size", "3",
     "--itc-queue-size", str(QUEUE)],  # two groups, two queues; chunked
    ["--itc-batch-accumulation", "exact", "--itc-queue-size", str(QUEUE)],  # the queue in pass 2
    ["--itc-batch-accumulation", "off", "--itc-queue-size", str(QUEUE)],
    ["--itc-batch-accumulation", "exact", "--itc-group-size", "1", "--itc-queue-size", str(QUEUE),
     "--momentum-towers", "0.9"],  # the EMA model's features enter the queue
], ids=["memory", "memory-group1-chunk3-queue", "exact-queue", "off-queue", "exact-group1-queue-momentum"])
def test_world8_negatives_match_single_process_reference(extra, tmp_path):
    results = run_distributed(WORLD, _negatives_step, extra, str(tmp_path / "ckpt"))
    _check(results)
    if "--momentum-towers" in extra:
        assert all(r["ema_moved"] for r in results)
    if "--itc-group-size" in extra and "--itc-queue-size" in extra:  # two groups: two different queues saved
        firsts = {r["rank"][2]: r["queue_first_row"] for r in results if "queue_first_row" in r}
        assert len(firsts) == DP and not torch.equal(firsts[0], firsts[1])


def _bf16_shadow_round_trip(root: str):
    from megatron_m2 import checkpointing
    from megatron_m2.config import transformer_overrides
    from megatron_m2.models import build_model
    from megatron_m2.training.negatives import SHADOW_PREFIX, build_negatives_state

    args = _trainer_args(["--itc-queue-size", "4", "--momentum-towers", "0.995"])
    parallel.initialize_model_parallel(TP, PP)
    build = lambda: build_model(args.model_config, spec="local", **transformer_overrides(bf16=True))  # noqa: E731
    model = build()
    negatives = build_negatives_state(args, model, build)
    towers = negatives.momentum
    assert next(towers.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():  # an fp32 average that bf16 cannot hold
        for shadow in towers.shadow:
            shadow.add_(torch.rand_like(shadow) * 1e-4)
    saved = towers.sharded_state_dict()
    assert sum(k.startswith(SHADOW_PREFIX) for k in saved) == len(towers.shadow)  # every parameter's shadow
    with forking_allowed():
        checkpointing.save_checkpoint(root, 1, model, None, None, {}, step_state=negatives)
    torch.manual_seed(3)
    fresh = build_negatives_state(args, build(), build)
    checkpointing.load_checkpoint(root, model, step_state=fresh)
    for a, b in zip(fresh.momentum.shadow, towers.shadow):
        assert torch.equal(a, b)
    for a, b in zip(fresh.momentum.model.parameters(), towers.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow  # a few seconds once the world-8 pool runs
def test_bf16_momentum_towers_keep_their_fp32_shadow_in_the_checkpoint(tmp_path):
    # bf16 on CPU: the EMA model and its shadow are built and checkpointed, nothing runs forward
    run_distributed(WORLD, _bf16_shadow_round_trip, str(tmp_path / "ckpt"))


def test_contrastive_batch_counts_pairs_and_negatives_per_mode():
    from megatron_m2.training.step import contrastive_batch_of

    exact = contrastive_batch_of(_trainer_args(["--itc-queue-size", "4096"]))
    assert (exact.pairs, exact.negatives, exact.queued) == (GLOBAL_BATCH, GLOBAL_BATCH - 1, 4096)
    assert exact.describe() == (f"{GLOBAL_BATCH} pairs per ITC group, {GLOBAL_BATCH - 1} negatives per row "
                                "(+ 4096 queued)")
    memory = contrastive_batch_of(_trainer_args(["--itc-batch-accumulation", "memory"]))
    assert (memory.pairs, memory.negatives, memory.max_negatives) == (DP * MICRO_BATCH, DP * MICRO_BATCH - 1,
                                                                      GLOBAL_BATCH - 1)
    off = contrastive_batch_of(_trainer_args(["--no-itc-batch-accumulation", "--itc-group-size", "1"]))
    assert (off.pairs, off.negatives, off.max_negatives) == (MICRO_BATCH, MICRO_BATCH - 1, MICRO_BATCH - 1)


# -- flags --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--momentum-towers", "0.995"], "--itc-queue-size > 0"),
    (["--itc-queue-size", "-1"], "--itc-queue-size must be >= 0"),
    (["--itc-queue-size", "8", "--momentum-towers", "1.0"], "--momentum-towers must be in [0, 1)"),
    (["--itc-queue-size", "8", "--momentum-towers", "-0.5"], "--momentum-towers must be in [0, 1)"),
])
def test_negatives_flag_errors_name_the_flags(flags, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)").replace("+", r"\+")) as err:
        _trainer_args(flags)
    if "--momentum-towers" in flags and "0.995" in flags:
        assert "--momentum-towers" in str(err.value)


def test_itc_batch_accumulation_modes_parse():
    from megatron_m2.training.arguments import build_parser

    parse = lambda *a: build_parser().parse_args(list(a)).itc_batch_accumulation  # noqa: E731
    assert parse() == parse("--itc-batch-accumulation") == "exact"
    assert parse("--itc-batch-accumulation", "memory") == "memory"
    assert parse("--no-itc-batch-accumulation") == parse("--itc-batch-accumulation", "off") == "off"
    with pytest.raises(SystemExit):
        parse("--itc-batch-accumulation", "sometimes")


def test_plan_and_dry_run_count_the_queue_and_the_momentum_towers():
    import dataclasses

    from megatron_m2 import planner
    from megatron_m2.config import load_config

    config = load_config("0.4b")
    base = planner.Training(micro_batch_size=8, global_batch_size=512, itc_batch_accumulation="off", recompute=False)
    plain = planner.plan_layout(config, 8, 1, 1, 0, base)
    queued = planner.plan_layout(config, 8, 1, 1, 0, dataclasses.replace(base, itc_queue_size=4096))
    momentum = planner.plan_layout(config, 8, 1, 1, 0, dataclasses.replace(base, itc_queue_size=4096,
                                                                           momentum_towers=0.995))
    # the queue: K rows of [image; text] fp32 features, a concatenated copy, and K wider logits per row
    assert queued.memory["itc"] > plain.memory["itc"] + 4 * 2 * 4096 * config.out_dim
    assert queued.negatives.describe().endswith("(+ 4096 queued)")
    # the momentum towers: a bf16 copy of the model + its fp32 shadow, and one more forward-only pass
    n = plain.parameters_per_gpu
    assert momentum.memory["params"] == pytest.approx(plain.memory["params"] + 6 * n)
    assert plain.extra_forward == 0 and momentum.extra_forward == pytest.approx(1 / 3)
    assert momentum.time["compute"] > plain.time["compute"]
    result = run_command(1, "tools.plan", ["--model", "0.4b", "--num-gpus", "8", "--global-batch-size", "512",
                                           "--itc-batch-accumulation", "memory", "--itc-batch", "0",
                                           "--itc-queue-size", "4096", "--momentum-towers", "0.995", "--top", "1"])
    assert result.returncode == 0, result.stderr
    assert "negatives per row (the step's earlier micro-batches' features, detached) (+ 4096 queued)" in \
        result.stdout and "momentum towers" in result.stdout
    refused = run_command(1, "tools.plan", ["--num-gpus", "8", "--momentum-towers", "0.9"])
    assert refused.returncode == 2 and "--itc-queue-size" in refused.stderr


# -- the trainer: resume and reshard ------------------------------------------------------------------------------

def _trainer_flags(*extra: str) -> list[str]:
    # memory mode (2 micro-batches of 8 per step), a queue of 24 (16 pairs a step: it wraps around), momentum towers
    # with a coefficient far from 1, so a wrong EMA after a load shows in the next steps' queued features
    return ["--train-iters", "6", "--itc-batch-accumulation", "memory", "--itc-queue-size", "24",
            "--momentum-towers", "0.5", *extra]


def _momentum_tensors(path, scratch) -> dict[str, torch.Tensor]:
    """The checkpoint's momentum towers as global tensors (read without a process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(scratch))
    return {k: v for k, v in torch.load(scratch, weights_only=False).items() if k.startswith("momentum_towers.")}


@pytest.mark.slow  # about 25 s on the 2-core machine: two TP2 x PP2 runs and one TP1 x PP1 run (pooled ranks)
def test_queue_and_momentum_towers_resume_exactly_and_reshard(demo_data, tmp_path):
    import shutil

    from megatron_m2.checkpoint_layout import checkpoint_dir, publish, staging_dir
    from tests.test_training import _flags, _losses, _train

    reference = tmp_path / "reference"
    reference.mkdir()
    result = _train(4, _flags(demo_data, reference, 2, 2, *_trainer_flags("--save", str(reference / "ckpt"),
                                                                         "--save-interval", "3")))
    assert "(+ 24 queued)" in result.stdout and "momentum towers (EMA 0.5)" in result.stdout, result.stdout[-2000:]
    want = _losses(reference)
    assert sorted(want) == list(range(1, 7))
    for name, (nproc, tp, pp) in {"same": (4, 2, 2), "tp1pp1": (1, 1, 1)}.items():
        run_dir = tmp_path / name
        ckpt = run_dir / "ckpt"  # the reference's checkpoint of iteration 3, as the latest of a directory
        shutil.copytree(checkpoint_dir(reference / "ckpt", 3), staging_dir(ckpt, 3))
        publish(ckpt, 3)
        result = _train(nproc, _flags(demo_data, run_dir, tp, pp, *_trainer_flags("--load", str(ckpt), "--save",
                                                                                   str(ckpt))))
        assert "WARNING: --load" not in result.stdout, result.stdout[-2000:]  # the queue and towers were restored
        got = _losses(run_dir)
        assert sorted(got) == [4, 5, 6]
        if name == "same":  # the same layout: bit for bit
            assert got == {i: want[i] for i in got}, (got, want)
        else:  # resharded towers (and the same queue: one ITC group in both layouts)
            for i, loss in got.items():
                assert loss == pytest.approx(want[i], rel=1e-5), (i, loss, want[i])
        # the momentum towers at iteration 6, saved at either layout, are the same global tensors
        mine = _momentum_tensors(checkpoint_dir(ckpt, 6), tmp_path / "mine.pt")
        theirs = _momentum_tensors(checkpoint_dir(reference / "ckpt", 6), tmp_path / "theirs.pt")
        assert mine and sorted(mine) == sorted(theirs)
        for key, value in mine.items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
