"""Initial weights independent of the parallel layout (models/init.py): the tiny model built with one --seed at
TP1 x PP1, TP1 x PP2 and TP2 x PP2 (world 4, a different torch RNG state on every rank) holds the same canonical
weights bit for bit and gives the same first-step loss; its layers differ from each other (they were copies on
every stage but the first)."""
from __future__ import annotations

import pytest
import torch

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.testing import run_distributed

LAYOUTS = [(1, 1), (1, 2), (2, 2)]
MICRO_BATCH, NUM_MICROBATCHES = 2, 2


def _initial_state_and_first_loss(tp: int, pp: int, seed: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2.models import build_model
    from megatron_m2.models.m2_model import packed_sequence_length
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import StepConfig, forward_backward, forward_step, reduce_metrics

    config = load_config("tiny")
    parallel.initialize_model_parallel(tp, pp, itc_group_size=1)  # each data-parallel rank scores its own batch
    torch.manual_seed(1000 + dist.get_rank())  # the weights must not come from the torch RNG
    model = build_model(config, spec="local", seed=seed)
    state = {name: value.detach().clone() for name, value in model.state_dict().items()
             if not name.endswith("_extra_state")}
    dp = dist.get_world_size() // (tp * pp)
    args = build_parser().parse_args(
        ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), "--itc-group-size", "1",
         "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(MICRO_BATCH * NUM_MICROBATCHES * dp),
         "--dry-run"])
    args.model_config = config
    args.layout = validate_args(args, world_size=dist.get_world_size())
    ddp = wrap_ddp(model, args)
    build_optimizer(ddp, args)
    g = torch.Generator().manual_seed(seed)  # the same batch on every data-parallel rank
    batches = iter([dict(images=torch.randint(0, 256, (MICRO_BATCH, 3, config.image_size, config.image_size),
                                              dtype=torch.uint8, generator=g),
                         text_ids=torch.randint(0, config.vocab_size, (MICRO_BATCH, config.max_text_length),
                                                generator=g),
                         text_padding_mask=torch.zeros(MICRO_BATCH, config.max_text_length, dtype=torch.bool))
                    for _ in range(NUM_MICROBATCHES)])
    metrics = forward_backward(forward_step, batches, ddp,
                               StepConfig(NUM_MICROBATCHES, MICRO_BATCH, packed_sequence_length(config)))
    loss = reduce_metrics(metrics)["itc_loss"] if ps.is_pipeline_last_stage() else None
    return dict(ranks=(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                       ps.get_data_parallel_rank()), state=state, loss=loss)


def test_initial_weights_and_first_step_loss_are_the_same_at_every_layout():
    from megatron_m2.models.state_dict import unshard_state_dicts

    config = load_config("tiny")
    weights, losses = {}, {}
    for tp, pp in LAYOUTS:
        results = run_distributed(4, _initial_state_and_first_loss, tp, pp, 5)
        by_rank = {r["ranks"][:2]: r["state"] for r in results if r["ranks"][2] == 0}
        weights[tp, pp] = unshard_state_dicts(by_rank, config, tp, pp)
        losses[tp, pp] = [r["loss"] for r in results if r["loss"] is not None]
    reference = weights[1, 1]
    for layout, canonical in weights.items():
        assert sorted(canonical) == sorted(reference)
        for key, value in reference.items():
            assert torch.equal(canonical[key], value), (layout, key)
        assert all(loss == pytest.approx(losses[1, 1][0], rel=1e-5) for loss in losses[layout]), (layout, losses)
    # every layer (and each tower's copy of it) drew its own numbers: the second stage's were copies of each other
    weight = "{}_encoder.layers.{}.mlp.linear_fc1.weight"
    drawn = [reference[weight.format(tower, i)] for tower in ("vision", "text") for i in range(config.num_layers)]
    assert all(not torch.equal(a, b) for i, a in enumerate(drawn) for b in drawn[i + 1:])
    assert torch.equal(reference["vision_encoder.layers.0.input_layernorm.weight"],
                       torch.ones(config.hidden_size))  # constants stay as constructed


def test_another_seed_draws_other_weights():
    one, other = (run_distributed(4, _initial_state_and_first_loss, 1, 1, seed)[0]["state"] for seed in (5, 6))
    assert not torch.equal(one["text_embed.word_embeddings.weight"], other["text_embed.word_embeddings.weight"])


def test_a_row_does_not_depend_on_the_row_count_or_on_the_rank_drawing_it():
    # e.g. the token embedding, whose vocab padding grows with TP, split by rows (TP) or a weight split by columns
    from megatron_m2.models.init import BLOCK_ELEMENTS, _draw_shard

    def draw(shape, full_shape, offset):
        out = torch.empty(shape)
        _draw_shard(out, lambda t: torch.nn.init.normal_(t, std=0.02), "key", full_shape, offset)
        return out

    width = BLOCK_ELEMENTS // 256  # blocks of 256 rows: the shards below start and end inside blocks
    rows, padded = 1000, 1280
    full = draw((rows, width), (rows, width), (0, 0))
    bigger = draw((padded, width), (padded, width), (0, 0))
    assert torch.equal(bigger[:rows], full)
    assert torch.equal(draw((640, width), (padded, width), (640, 0)), bigger[640:])  # TP rank 1 of 2, rows
    assert torch.equal(draw((padded, width // 2), (padded, width), (0, width // 2)), bigger[:, width // 2:])
    assert 0.019 < float(full.std()) < 0.021 and not torch.equal(full[:256], full[256:512])
