"""The training step with GBA-ITC batch accumulation, multi-process on CPU against a single-process reference.

World 8 = TP2 x PP2 x DP2, 2 micro-batches of 2 per data-parallel rank (global batch 8). The reference is the TP1 x PP1
model with the same weights in one process, run on the whole global batch in one forward:
  * accumulation on, ITC group = DP: ONE CLIP loss over the 8 pairs; group 1: the mean of the two groups' losses,
    each over its 4 pairs (both micro-batches);
  * accumulation off: the mean over micro-batches and groups of each micro-batch's CLIP loss (today's loss).
The trainer's loss (DP-reduced metric) and every parameter gradient after megatron's DP reduction must equal the
reference's (float32, 1e-5); the embeddings of the forward-only pass 1 must equal those of the forward-backward pass.
With CMLM and CMIM on, the reference adds alpha x CMIM + beta x CMLM, each the mean over every masked patch / token of
the global batch (not a mean of per-micro-batch means), and the decoders' gradients are compared too.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.testing import run_distributed

pytestmark = pytest.mark.slow
TOL = dict(rtol=1e-5, atol=1e-5)
WORLD, TP, PP, MICRO_BATCH, NUM_MICROBATCHES = 8, 2, 2, 2, 2
DP = WORLD // (TP * PP)
GLOBAL_BATCH = DP * NUM_MICROBATCHES * MICRO_BATCH


def _global_batch(config):
    """Row (dp_rank * M + m) * b + i is row i of micro-batch m of data-parallel rank dp_rank."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (GLOBAL_BATCH, config.num_channels, config.image_size, config.image_size),
                           generator=g, dtype=torch.uint8)
    ids = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, config.max_text_length), generator=g)
    lengths = torch.randint(3, config.max_text_length + 1, (GLOBAL_BATCH,), generator=g)
    padding = torch.arange(config.max_text_length)[None, :] >= lengths[:, None]
    return images, ids, padding


def _global_masks(config, ids, padding):
    """Masks as data/masking.py delivers them, with uneven counts per sample (so per-micro-batch means would differ
    from the step's per-token mean): text targets among the real tokens, [MASK] = id 3, 1..7 patches per image."""
    from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS

    g = torch.Generator().manual_seed(4)
    targets = (torch.rand(padding.shape, generator=g) < 0.3) & ~padding
    targets[:, 1] = True  # at least one per caption
    patches = torch.zeros(GLOBAL_BATCH, config.num_patches, dtype=torch.bool)
    for row in range(GLOBAL_BATCH):
        patches[row, torch.randperm(config.num_patches, generator=g)[:1 + row % 7]] = True
    return {TEXT_TARGETS: targets, MASKED_TEXT_IDS: ids.masked_fill(targets, 3), IMAGE_PATCH_MASK: patches}


def _patch_targets(images, patch):
    """MAE's per-patch normalised pixels, written independently of masked_loss.patch_targets (unfold, not einsum)."""
    x = images.unfold(2, patch, patch).unfold(3, patch, patch)  # [b, c, rows, cols, p, p]
    x = x.permute(0, 2, 3, 4, 5, 1).reshape(images.shape[0], -1, patch * patch * images.shape[1])
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def _rows(dp_rank: int, micro: int) -> slice:
    start = (dp_rank * NUM_MICROBATCHES + micro) * MICRO_BATCH
    return slice(start, start + MICRO_BATCH)


def _clip(image, text, log_scale):
    logits = log_scale.clamp(max=math.log(100)).exp() * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _reference_objective(image, text, log_scale, group_size: int, accumulate: bool):
    losses = []
    for first in range(0, DP, group_size):
        ranks = range(first, first + group_size)
        micro_sets = [list(range(NUM_MICROBATCHES))] if accumulate else [[m] for m in range(NUM_MICROBATCHES)]
        for micros in micro_sets:
            index = torch.cat([torch.arange(GLOBAL_BATCH)[_rows(r, m)] for r in ranks for m in micros])
            losses.append(_clip(image[index], text[index], log_scale))
    return torch.stack(losses).mean()


def _masked_reference(reference, config, images, ids, padding, masks, cmlm_weight, cmim_weight):
    """The reference's embeddings and its two masked-modelling means over the whole global batch."""
    from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS
    from megatron_m2.data.transforms import normalize
    from megatron_m2.models.decoders import MaskedInputs

    masked = MaskedInputs(text_ids=masks[MASKED_TEXT_IDS] if cmlm_weight else None,
                          text_targets=masks[TEXT_TARGETS] if cmlm_weight else None,
                          image_patches=masks[IMAGE_PATCH_MASK] if cmim_weight else None)
    image_embeds, text_embeds, predictions = reference(normalize(images), ids, padding, masked)
    terms = {}
    if cmlm_weight:
        terms["cmlm_loss"] = F.cross_entropy(predictions.cmlm_logits[:, :config.vocab_size], ids[masked.text_targets])
    if cmim_weight:
        targets = _patch_targets(normalize(images), config.patch_size)[masked.image_patches]
        terms["cmim_loss"] = (predictions.cmim_pixels - targets).square().mean()
    return image_embeds, text_embeds, terms


def _trainer_args(extra: list[str]):
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.batch_schedule import configure_microbatches

    args = build_parser().parse_args(
        ["--model", "tiny", "--tensor-model-parallel-size", str(TP), "--pipeline-model-parallel-size", str(PP),
         "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(GLOBAL_BATCH), "--dry-run", *extra])
    args.model_config = load_config("tiny")
    args.layout = validate_args(args, world_size=WORLD)
    configure_microbatches(args, args.layout)
    return args


def _recording_forward_step(record: list):
    from megatron_m2.training.step import forward_step

    def step(data_iterator, model, **kwargs):
        output, loss_func = forward_step(data_iterator, model, **kwargs)
        if isinstance(output, tuple):  # the last stage: (image_embeds, text_embeds)
            record.append(tuple(t.detach().clone() for t in output[:2]))
        return output, loss_func

    return step


def _step_vs_reference(extra: list[str], freeze_vision: bool = False):
    from megatron.core import parallel_state as ps

    from megatron_m2.config import transformer_overrides
    from megatron_m2.data.transforms import normalize
    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict, unshard_state_dicts
    from megatron_m2.training.loop import freeze_vision_tower
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_backward, reduce_metrics, step_config_from_args

    args = _trainer_args(extra)
    config = args.model_config
    images, ids, padding = _global_batch(config)
    masks = _global_masks(config, ids, padding)
    cmlm, cmim = args.cmlm_weight > 0, args.cmim_weight > 0

    # the reference: one process, the whole global batch in one forward
    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    reference = build_model(config, spec="local", cmlm=cmlm, cmim=cmim)
    if freeze_vision:
        freeze_vision_tower(reference)
    full = canonical_state_dict(reference, config)
    if cmlm or cmim:
        image_embeds, text_embeds, terms = _masked_reference(reference, config, images, ids, padding, masks,
                                                             args.cmlm_weight, args.cmim_weight)
    else:
        (image_embeds, text_embeds), terms = reference(normalize(images), ids, padding), {}
    itc = _reference_objective(image_embeds, text_embeds, reference.logit_scale, args.layout.itc_group_size,
                               args.itc_batch_accumulation == "exact")
    objective = itc + args.cmlm_weight * terms.get("cmlm_loss", 0.0) + args.cmim_weight * terms.get("cmim_loss", 0.0)
    objective.backward()
    ref_grads = unshard_state_dicts({(0, 0): {n: p.grad for n, p in reference.named_parameters()
                                              if p.grad is not None}}, config)

    parallel.initialize_model_parallel(TP, PP, args.layout.itc_group_size)
    torch.manual_seed(1)  # a different init: every weight must come from the reference's copy
    model = build_model(config, spec="local", cmlm=cmlm, cmim=cmim,
                        **transformer_overrides(args.recompute_activations, sequence_parallel=args.sequence_parallel))
    tp_rank, pp_rank, dp_rank = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                 ps.get_data_parallel_rank())
    load_canonical_state_dict(model, full, config, tp_rank, TP, pp_rank, PP)
    if freeze_vision:
        freeze_vision_tower(model)
    ddp = wrap_ddp(model, args)
    build_optimizer(ddp, args)  # wires megatron's no-sync and DP grad reduction into the schedule
    from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS

    wanted = ({MASKED_TEXT_IDS, TEXT_TARGETS} if cmlm else set()) | ({IMAGE_PATCH_MASK} if cmim else set())
    batches = iter([dict(images=images[_rows(dp_rank, m)], text_ids=ids[_rows(dp_rank, m)],
                         text_padding_mask=padding[_rows(dp_rank, m)],
                         **{k: v[_rows(dp_rank, m)] for k, v in masks.items() if k in wanted})
                    for m in range(NUM_MICROBATCHES)])
    record: list = []
    ddp.zero_grad_buffer()
    metrics = forward_backward(_recording_forward_step(record), batches, ddp, step_config_from_args(args))
    reduced = reduce_metrics(metrics) if ps.is_pipeline_last_stage() else None
    loss = reduced["itc_loss"] if reduced else None
    grads = {name: param.main_grad.detach().clone() for name, param in model.named_parameters()
             if param.requires_grad}
    return dict(rank=(tp_rank, pp_rank, dp_rank), loss=loss, grads=grads, record=record, reduced=reduced,
                objective=itc.item(), terms={k: v.item() for k, v in terms.items()}, ref_grads=ref_grads,
                ref_frozen=[n for n, p in reference.named_parameters() if not p.requires_grad])


def _check(results, accumulate: bool):
    from megatron_m2.models.state_dict import unshard_state_dicts

    config = load_config("tiny")
    ref = results[0]
    for r in results:
        if r["loss"] is not None:  # every last-stage rank reports the DP-reduced loss
            assert r["loss"] == pytest.approx(ref["objective"], rel=1e-5), (r["rank"], r["loss"], ref["objective"])
            for name, value in ref["terms"].items():  # the masked-modelling means over the whole global batch
                assert r["reduced"][name] == pytest.approx(value, rel=1e-5), (r["rank"], name, r["reduced"])
        if r["rank"][1] == PP - 1:
            # pass 1 (forward-only) and the forward-backward pass saw the same micro-batches and gave the same
            # embeddings; without accumulation there is a single pass
            expected = 2 * NUM_MICROBATCHES if accumulate else NUM_MICROBATCHES
            assert len(r["record"]) == expected
            if accumulate:
                for first, second in zip(r["record"][:NUM_MICROBATCHES], r["record"][NUM_MICROBATCHES:]):
                    for a, b in zip(first, second):
                        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for dp_rank in range(DP):
        by_rank = {r["rank"][:2]: r["grads"] for r in results if r["rank"][2] == dp_rank}
        grads = unshard_state_dicts(by_rank, config, TP, PP)
        assert sorted(grads) == sorted(ref["ref_grads"])
        for name, want in ref["ref_grads"].items():
            torch.testing.assert_close(grads[name], want, **TOL, msg=lambda m: f"dp {dp_rank} {name}: {m}")


MASKED = ["--cmlm-weight", "0.7", "--cmim-weight", "0.3"]


@pytest.mark.parametrize("extra,freeze_vision", [
    ([], False),  # ITC group = DP: the CLIP loss of the global batch
    # the mean of the group losses, chunked, with recompute and LiT (the vision tower frozen)
    (["--itc-group-size", "1", "--itc-chunk-size", "3", "--recompute-activations"], True),
    (["--no-itc-batch-accumulation"], False),  # today's per-micro-batch loss
    (MASKED, False),  # + alpha CMIM + beta CMLM in GBA-ITC's pass 3
    (MASKED + ["--no-itc-batch-accumulation", "--recompute-activations"], False),  # in the one pass, recomputed
], ids=["global-batch", "group1-chunk3-recompute-freeze-vision", "no-accumulation", "cmlm-cmim",
        "cmlm-cmim-no-accumulation-recompute"])
def test_world8_step_matches_single_process_reference(extra, freeze_vision):
    results = run_distributed(WORLD, _step_vs_reference, extra, freeze_vision)
    accumulate = "--no-itc-batch-accumulation" not in extra
    _check(results, accumulate)
    if freeze_vision:
        frozen = results[0]["ref_frozen"]
        assert frozen and all(name not in results[0]["ref_grads"] for name in frozen)


def test_contrastive_batch_size_follows_the_layout():
    from megatron_m2.training.step import contrastive_batch_size

    assert contrastive_batch_size(_trainer_args([])) == GLOBAL_BATCH
    assert contrastive_batch_size(_trainer_args(["--itc-group-size", "1"])) == GLOBAL_BATCH // DP
    assert contrastive_batch_size(_trainer_args(["--no-itc-batch-accumulation"])) == DP * MICRO_BATCH


def _images_held_and_seen(extra: list[str]):
    """The dtype of the images a step holds for its micro-batches (what the forward step reads from the iterator)
    and of the images the vision embedding receives."""
    from megatron_m2.models import build_model
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_backward, forward_step, step_config_from_args

    args = _trainer_args(extra)
    config = args.model_config
    parallel.initialize_model_parallel(TP, PP)
    model = build_model(config, spec="local")
    ddp = wrap_ddp(model, args)
    build_optimizer(ddp, args)
    held, seen = [], []

    def step(data_iterator, model, **kwargs):
        batch = next(data_iterator)
        held.append(str(batch["images"].dtype))
        return forward_step(iter([batch]), model, **kwargs)

    if hasattr(model, "vision_embed"):
        model.vision_embed.register_forward_pre_hook(lambda module, inputs: seen.append(str(inputs[0].dtype)))
    images, ids, padding = _global_batch(config)
    batches = iter([dict(images=images[_rows(0, m)], text_ids=ids[_rows(0, m)], text_padding_mask=padding[_rows(0, m)])
                    for m in range(NUM_MICROBATCHES)])
    forward_backward(step, batches, ddp, step_config_from_args(args))
    return held, seen


@pytest.mark.parametrize("extra", [[], ["--no-itc-batch-accumulation"]], ids=["accumulation", "no-accumulation"])
def test_a_step_holds_its_micro_batches_as_uint8_and_normalises_each_in_its_forward(extra):
    # All M micro-batches of a step are read before its schedule runs: held as normalised float images they took
    # 4x (2x in bf16) the bytes the planner counts. They stay uint8; each is normalised when its forward runs.
    results = run_distributed(WORLD, _images_held_and_seen, extra)
    for held, seen in results:
        assert held and set(held) == {"torch.uint8"}, held
        assert set(seen) <= {"torch.float32"}  # the model's dtype (first stage only)
    held, seen = results[0]  # a first-stage rank: one normalised image batch per forward
    assert len(seen) == len(held) > 0
