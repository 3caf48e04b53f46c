"""Stochastic depth and dropout (models/drop_path.py) and GBA-ITC's exact mode with them (megatron_m2/random_state.py).

- the per-layer rates (linspace over each stack) and one layer's residual adds against a hand computation;
- world 4 = TP2 x PP2, 2 micro-batches of 2, --drop-path-rate 0.1 --hidden-dropout 0.1: the exact-mode step's loss
  and every parameter gradient equal a one-process reference over the whole batch that replays the masks recorded in
  pass 1 (and pass 3's embeddings equal pass 1's), with and without activation recompute; with the random-state
  replay switched off the same comparison fails;
- TP peers draw the same drop-path masks, also under sequence parallelism (where megatron runs the layers inside the
  per-TP-rank model-parallel RNG fork), and the same hidden-dropout masks without it;
- with CMLM and CMIM on too (their masked streams and decoders draw from generators of their own);
- checkpoints hold each rank's random state, restored at the same layout only; the trainer's resume with drop path and
  dropout onto the uninterrupted run's losses is in tests/test_training.py.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.errors import ConfigError
from megatron_m2.testing import forking_allowed, run_distributed
from tests.test_step import _masked_reference

WORLD, TP, PP, MICRO_BATCH, NUM_MICROBATCHES = 4, 2, 2, 2, 2
BATCH = NUM_MICROBATCHES * MICRO_BATCH  # DP 1
RANDOMNESS = ["--drop-path-rate", "0.1", "--hidden-dropout", "0.1"]


def _trainer_args(extra: list[str], tp: int = TP, pp: int = PP, world: int = WORLD, micro: int = MICRO_BATCH,
                  global_batch: int = BATCH):
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.batch_schedule import configure_microbatches

    args = build_parser().parse_args(
        ["--model", "tiny", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
         "--micro-batch-size", str(micro), "--global-batch-size", str(global_batch), "--dry-run", *extra])
    args.model_config = load_config("tiny")
    args.layout = validate_args(args, world_size=world)
    configure_microbatches(args, args.layout)
    return args


def _batch(config, size: int = BATCH):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (size, config.num_channels, config.image_size, config.image_size), generator=g,
                           dtype=torch.uint8)
    ids = torch.randint(0, config.vocab_size, (size, config.max_text_length), generator=g)
    lengths = torch.randint(3, config.max_text_length + 1, (size,), generator=g)
    padding = torch.arange(config.max_text_length)[None, :] >= lengths[:, None]
    return images, ids, padding


MASKED = ["--cmlm-weight", "0.7", "--cmim-weight", "0.3"]


def _masks(config, ids, padding):
    """CMLM / CMIM masks as data/masking.py delivers them ([MASK] = id 3), uneven counts per sample."""
    from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS

    g = torch.Generator().manual_seed(4)
    targets = (torch.rand(padding.shape, generator=g) < 0.3) & ~padding
    targets[:, 1] = True  # at least one per caption
    patches = torch.zeros(ids.shape[0], config.num_patches, dtype=torch.bool)
    for row in range(ids.shape[0]):
        patches[row, torch.randperm(config.num_patches, generator=g)[:1 + row % 7]] = True
    return {TEXT_TARGETS: targets, MASKED_TEXT_IDS: ids.masked_fill(targets, 3), IMAGE_PATCH_MASK: patches}


# -- hooks: record the masks a forward draws, or replay given ones -------------------------------------------------
def _sites(model) -> dict[int, str]:
    """id(layer) -> its stack ("vision_encoder", "vl_encoder", ...), for every M2TransformerLayer of the model."""
    from megatron_m2.models.drop_path import M2TransformerLayer

    return {id(m): name.split(".layers.")[0] for name, m in model.named_modules() if isinstance(m, M2TransformerLayer)}


class Recorder:
    """Wraps the default mask source and dropout: draws as they do (same generators, same consumption), and while
    `micro` is set records each call's 0/1 mask under (micro, stack, layer number, branch, occurrence)."""

    def __init__(self, model):
        self.sites, self.micro = _sites(model), None
        self.drop_path: dict = {}
        self.dropout: dict = {}
        self._seen: dict = {}

    def _key(self, layer, branch, kind):
        site = (self.micro, self.sites[id(layer)], layer.layer_number, branch, kind)
        self._seen[site] = self._seen.get(site, -1) + 1
        return (*site[:4], self._seen[site])

    def mask_source(self, layer, branch, batch, keep, device):
        from megatron_m2.models import drop_path

        mask = drop_path.draw_mask(layer, branch, batch, keep, device)
        if self.micro is not None:
            self.drop_path[self._key(layer, branch, "path")] = mask.clone()
        return mask

    def dropout_fn(self, layer, branch, x, p):
        mask = F.dropout(torch.ones_like(x), p=p, training=True)  # the generator moves as F.dropout(x) moves it
        if self.micro is not None:
            self.dropout[self._key(layer, branch, "dropout")] = (mask != 0).clone()
        return x * mask


class Replayer:
    """Gives each call the mask recorded for its site: drop path [b], dropout [s, b, h] as 0/1 (scaled here)."""

    def __init__(self, model, drop_path: dict, dropout: dict):
        self.sites, self.masks, self._seen = _sites(model), {"path": drop_path, "dropout": dropout}, {}

    def _mask(self, layer, branch, kind):
        site = (self.sites[id(layer)], layer.layer_number, branch, kind)
        self._seen[site] = self._seen.get(site, -1) + 1
        return self.masks[kind][(*site[:3], self._seen[site])]

    def mask_source(self, layer, branch, batch, keep, device):
        return self._mask(layer, branch, "path")

    def dropout_fn(self, layer, branch, x, p):
        return x * (self._mask(layer, branch, "dropout").to(x.dtype) / (1 - p))


@contextmanager
def _hooks(hooks):
    from megatron_m2.models import drop_path

    saved = drop_path.mask_source, drop_path.dropout
    drop_path.mask_source, drop_path.dropout = hooks.mask_source, hooks.dropout_fn
    try:
        yield hooks
    finally:
        drop_path.mask_source, drop_path.dropout = saved


# -- unit: rates and one layer ------------------------------------------------------------------------------------
def test_per_layer_rates_and_one_layer_by_hand():
    import numpy as np

    from megatron_m2.models import build_model
    from megatron_m2.models.drop_path import drop_path_rates, draw_mask

    assert drop_path_rates(0.1, 4) == pytest.approx(tuple(np.linspace(0, 0.1, 4)))
    assert drop_path_rates(0.1, 1) == (0.0,) and drop_path_rates(0.0, 3) == (0.0, 0.0, 0.0)
    parallel.initialize_model_parallel(1, 1)
    config = load_config("tiny")  # 3 backbone layers, 1 VL layer
    torch.manual_seed(0)
    model = build_model(config, spec="local", drop_path_rate=0.2)
    assert [layer.drop_path_rate for layer in model.vision_encoder.layers] == pytest.approx([0.0, 0.1, 0.2])
    assert [layer.drop_path_rate for layer in model.text_encoder.layers] == pytest.approx([0.0, 0.1, 0.2])
    assert [layer.drop_path_rate for layer in model.vl_encoder.layers] == [0.0]  # its own stack, as the release's

    # the default mask: 0/1 per sample, kept with probability keep
    masks = draw_mask(model.vision_encoder.layers[2], "mlp", 20000, 0.75, torch.device("cpu"))
    assert set(masks.unique().tolist()) == {0.0, 1.0} and masks.mean().item() == pytest.approx(0.75, abs=0.02)

    layer = model.vision_encoder.layers[2]  # rate 0.2: keep 0.8
    x = torch.randn(5, 3, config.hidden_size)  # [s, b, h]
    given = {"self_attn": torch.tensor([1.0, 0.0, 1.0]), "mlp": torch.tensor([0.0, 1.0, 1.0])}

    class Fixed:
        mask_source = staticmethod(lambda layer, branch, batch, keep, device: given[branch])
        dropout_fn = staticmethod(lambda layer, branch, x, p: x)

    with torch.no_grad(), _hooks(Fixed):
        out, _ = layer(x, attention_mask=None)
        attn, attn_bias = layer.self_attention(layer.input_layernorm(x), attention_mask=None)
        hidden = x + (attn + attn_bias) / 0.8 * given["self_attn"].view(1, 3, 1)
        mlp, mlp_bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
        want = hidden + (mlp + mlp_bias) / 0.8 * given["mlp"].view(1, 3, 1)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        layer.eval()  # no drop path in evaluation
        plain = x + (attn + attn_bias)
        torch.testing.assert_close(layer(x, attention_mask=None)[0], plain + sum(layer.mlp(
            layer.pre_mlp_layernorm(plain))), rtol=1e-6, atol=1e-6)


def test_random_state_replays_every_generator():
    from megatron.core import tensor_parallel

    from megatron_m2.models.drop_path import DROP_PATH_RNG
    from megatron_m2.random_state import RandomState

    parallel.initialize_model_parallel(1, 1, seed=9)
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draws():
        with tracker.fork():  # the model-parallel state (attention dropout)
            model_parallel = torch.rand(3)
        with tracker.fork(DROP_PATH_RNG):
            drop_path = torch.rand(3)
        return torch.rand(3), model_parallel, drop_path

    state = RandomState.capture()
    first = draws()
    assert not any(torch.equal(a, b) for a, b in [(first[0], first[1]), (first[1], first[2]), (first[0], first[2])])
    for _ in range(2):  # a capture restores as often as asked
        state.restore()
        assert all(torch.equal(a, b) for a, b in zip(first, draws()))
    after = draws()  # and the generators go on from there
    assert not any(torch.equal(a, b) for a, b in zip(first, after))
    restored = RandomState.from_state_dict(state.state_dict())
    restored.restore()
    assert all(torch.equal(a, b) for a, b in zip(first, draws()))


def test_rates_outside_0_1_are_refused():
    for flag in ("--drop-path-rate", "--hidden-dropout", "--attention-dropout"):
        for value in ("1.0", "-0.1"):
            with pytest.raises(ConfigError, match=rf"{flag} must be in \[0, 1\)"):
                _trainer_args([flag, value])
    _trainer_args(RANDOMNESS + ["--attention-dropout", "0.5", "--cmlm-weight", "1", "--cmim-weight", "1"])


# -- world 4: the exact-mode step against the reference -----------------------------------------------------------
def _clip(image, text, log_scale):
    logits = log_scale.clamp(max=math.log(100)).exp() * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _exact_step_vs_reference(extra: list[str], replay: bool):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2.data.transforms import normalize
    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict, unshard_state_dicts
    from megatron_m2 import random_state
    from megatron_m2.training.arguments import model_overrides
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_backward, forward_step, reduce_metrics, step_config_from_args

    args = _trainer_args(extra)
    config = args.model_config
    images, ids, padding = _batch(config)
    cmlm, cmim = args.cmlm_weight > 0, args.cmim_weight > 0
    masks = _masks(config, ids, padding) if cmlm or cmim else {}
    randomness = dict(drop_path_rate=args.drop_path_rate, hidden_dropout=args.hidden_dropout, cmlm=cmlm, cmim=cmim)

    def reference_model():
        parallel.initialize_model_parallel(1, 1)
        torch.manual_seed(0)
        return build_model(config, spec="local", **randomness)

    full = canonical_state_dict(reference_model(), config)

    parallel.initialize_model_parallel(TP, PP, seed=11)
    torch.manual_seed(1)
    model = build_model(config, spec="local", cmlm=cmlm, cmim=cmim, **model_overrides(args))
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    load_canonical_state_dict(model, full, config, tp_rank, TP, pp_rank, PP)
    ddp = wrap_ddp(model, args)
    build_optimizer(ddp, args)
    recorder, calls, embeddings = Recorder(model), [], []

    def step(data_iterator, model, **kwargs):  # forward calls 1..M: pass 1's micro-batches, then pass 3's
        recorder.micro = (1 if len(calls) < NUM_MICROBATCHES else 3, len(calls) % NUM_MICROBATCHES)
        calls.append(recorder.micro)
        output, loss_func = forward_step(data_iterator, model, **kwargs)
        recorder.micro = None  # (activation recompute draws again in the backward pass: not recorded)
        if isinstance(output, tuple):
            embeddings.append(tuple(t.detach().clone() for t in output[:2]))
        return output, loss_func

    rows = [slice(m * MICRO_BATCH, (m + 1) * MICRO_BATCH) for m in range(NUM_MICROBATCHES)]
    batches = iter([dict(images=images[r], text_ids=ids[r], text_padding_mask=padding[r],
                         **{k: v[r] for k, v in masks.items()}) for r in rows])
    restore = random_state.RandomState.restore
    if not replay:
        random_state.RandomState.restore = lambda self: None
    try:
        with _hooks(recorder):
            ddp.zero_grad_buffer()
            metrics = forward_backward(step, batches, ddp, step_config_from_args(args))
    finally:
        random_state.RandomState.restore = restore
    reduced = reduce_metrics(metrics) if ps.is_pipeline_last_stage() else None
    grads = {name: p.main_grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    recorded = [None] * WORLD
    dist.all_gather_object(recorded, dict(drop_path=recorder.drop_path, dropout=recorder.dropout, rank=(tp_rank, pp_rank)))

    # pass 3 drew pass 1's masks for every draw pass 1 made (the unmasked streams)
    replayed = all(torch.equal(mask, r[kind][((3, micro), *site)]) for r in recorded for kind in ("drop_path", "dropout")
                   for ((passed, micro), *site), mask in r[kind].items() if passed == 1)
    # the reference: one process, the whole batch in one forward, each layer's pass-3 masks of the micro-batches side
    # by side (pass 3's forward is the one the gradients come from; with CMLM / CMIM it also runs the masked streams)
    per_key: dict = {"drop_path": {}, "dropout": {}}
    for kind, dim in (("drop_path", 0), ("dropout", 1)):
        sites = {tuple(key[1:]) for r in recorded for key in r[kind] if key[0][0] == 3}
        for site in sites:
            per_micro = []
            for m in range(NUM_MICROBATCHES):
                peers = [r[kind][((3, m), *site)] for r in recorded if ((3, m), *site) in r[kind]]
                assert len(peers) == TP, (site, len(peers))  # the stage holding the layer, both TP ranks
                per_micro.append(peers[0])
            per_key[kind][site] = torch.cat(per_micro, dim=dim)
    reference = reference_model()
    with _hooks(Replayer(reference, per_key["drop_path"], per_key["dropout"])):
        if cmlm or cmim:
            image_embeds, text_embeds, terms = _masked_reference(reference, config, images, ids, padding, masks,
                                                                 args.cmlm_weight, args.cmim_weight)
        else:
            (image_embeds, text_embeds), terms = reference(normalize(images), ids, padding), {}
    itc = _clip(image_embeds, text_embeds, reference.logit_scale)
    objective = itc + args.cmlm_weight * terms.get("cmlm_loss", 0.0) + args.cmim_weight * terms.get("cmim_loss", 0.0)
    objective.backward()
    ref_grads = unshard_state_dicts({(0, 0): {n: p.grad for n, p in reference.named_parameters()
                                              if p.grad is not None}}, config)
    return dict(rank=(tp_rank, pp_rank), reduced=reduced, grads=grads, embeddings=embeddings, calls=calls,
                replayed=replayed,
                recorded=recorded if dist.get_rank() == 0 else None,
                losses=dict(itc_loss=itc.item(), **{k: v.item() for k, v in terms.items()}),
                ref_grads=ref_grads if dist.get_rank() == 0 else None)


def _compare(results) -> list[str]:
    """What differs from the reference (empty: the step is exact)."""
    from megatron_m2.models.state_dict import unshard_state_dicts

    config, ref, problems = load_config("tiny"), results[0], []
    for r in results:
        for name, want in ref["losses"].items():  # every last-stage rank reports the step's losses
            if r["reduced"] is not None and r["reduced"][name] != pytest.approx(want, rel=1e-5):
                problems.append(f"{name} {r['rank']}: {r['reduced'][name]} vs {want}")
        if r["rank"][1] == PP - 1:  # pass 3's embeddings are pass 1's
            first, second = r["embeddings"][:NUM_MICROBATCHES], r["embeddings"][NUM_MICROBATCHES:]
            if any(not torch.equal(a, b) for x, y in zip(first, second) for a, b in zip(x, y)):
                problems.append(f"pass 3 embeddings differ from pass 1's on {r['rank']}")
    grads = unshard_state_dicts({r["rank"]: r["grads"] for r in results}, config, TP, PP)
    assert sorted(grads) == sorted(ref["ref_grads"])
    for name, want in ref["ref_grads"].items():
        if not torch.allclose(grads[name], want, rtol=1e-5, atol=1e-5):
            problems.append(f"gradient {name}: max diff {(grads[name] - want).abs().max().item():.2e}")
    return problems


# ~16 s for the first case (the world-4 pool's start included), ~4 s for each of the others on 2 busy cores
@pytest.mark.parametrize("extra,replay", [
    (RANDOMNESS, True),
    (RANDOMNESS + ["--recompute-activations"], True),
    # + CMLM and CMIM: pass 3 runs the masked streams (on their own generators) and the decoders, pass 1 does not
    (RANDOMNESS + MASKED, True),
    (RANDOMNESS, False),  # without the replay pass 3 draws other masks: the same comparison must fail
], ids=["drop-path-dropout", "recompute", "cmlm-cmim", "no-replay-fails"])
def test_world4_exact_mode_with_drop_path_matches_reference(extra, replay):
    if "--recompute-activations" in extra:
        # attention dropout too: its masks live on TP-split heads and are not replayed into the reference, so only
        # pass 3 = pass 1 (embeddings bitwise; its masks come from the model-parallel tracker state) is checked
        assert all(run_distributed(WORLD, _pass3_replays_pass1, extra + ["--attention-dropout", "0.1"])), \
            "pass 3's embeddings differ from pass 1's with attention dropout and recompute"
    results = run_distributed(WORLD, _exact_step_vs_reference, extra, replay)
    assert all(r["calls"] == [(1, 0), (1, 1), (3, 0), (3, 1)] for r in results)
    assert results[0]["replayed"] == replay  # pass 3 drew pass 1's masks (mask by mask)
    recorded = results[0]["recorded"]
    # TP peers drew the same drop-path and hidden-dropout masks (replicated hidden states, no sequence parallelism)
    for pp in range(PP):
        tp0, tp1 = (next(r for r in recorded if r["rank"] == (tp, pp)) for tp in range(TP))
        for kind in ("drop_path", "dropout"):
            assert tp0[kind].keys() == tp1[kind].keys() and tp0[kind]
            assert all(torch.equal(tp0[kind][k], tp1[kind][k]) for k in tp0[kind])
    # some sample's branch was dropped (rate 0.1 over 4 micro-batch draws of the deepest layers would rarely
    # drop nothing: the seed is fixed, and this says the draw was exercised)
    dropped = [k for r in recorded for k, m in r["drop_path"].items() if (m == 0).any()]
    problems = _compare(results)
    if replay:
        assert dropped and not problems, problems
    else:
        assert any("pass 3 embeddings differ" in p for p in problems) and any("gradient" in p for p in problems)


def _pass3_replays_pass1(extra: list[str]) -> bool:
    """The exact-mode step's pass-3 embeddings equal pass 1's on the last stage (True elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_m2.models import build_model
    from megatron_m2.training.arguments import model_overrides
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_backward, forward_step, step_config_from_args

    args = _trainer_args(extra)
    images, ids, padding = _batch(args.model_config)
    parallel.initialize_model_parallel(TP, PP, seed=11)
    torch.manual_seed(0)
    ddp = wrap_ddp(build_model(args.model_config, spec="local", **model_overrides(args)), args)
    build_optimizer(ddp, args)
    embeddings = []

    def step(data_iterator, model, **kwargs):
        output, loss_func = forward_step(data_iterator, model, **kwargs)
        if isinstance(output, tuple):
            embeddings.append(output[0].detach().clone())
        return output, loss_func

    rows = [slice(m * MICRO_BATCH, (m + 1) * MICRO_BATCH) for m in range(NUM_MICROBATCHES)]
    ddp.zero_grad_buffer()
    forward_backward(step, iter([dict(images=images[r], text_ids=ids[r], text_padding_mask=padding[r]) for r in rows]),
                     ddp, step_config_from_args(args))
    if not ps.is_pipeline_last_stage():
        return True
    return all(torch.equal(a, b) for a, b in zip(embeddings[:NUM_MICROBATCHES], embeddings[NUM_MICROBATCHES:]))


# -- TP peers under sequence parallelism --------------------------------------------------------------------------
def _sequence_parallel_masks():
    """TP2 x DP2 with --sequence-parallel: one training-mode forward, recording every mask drawn."""
    from megatron.core import parallel_state as ps

    from megatron_m2.models import build_model
    from megatron_m2.training.arguments import model_overrides

    args = _trainer_args(RANDOMNESS + ["--sequence-parallel"], pp=1, global_batch=2 * MICRO_BATCH)
    config = args.model_config
    images, ids, padding = _batch(config, MICRO_BATCH)
    parallel.initialize_model_parallel(TP, 1, seed=5)
    torch.manual_seed(0)
    model = build_model(config, spec="local", **model_overrides(args))
    recorder = Recorder(model)
    recorder.micro = 0
    from megatron_m2.data.transforms import normalize

    with _hooks(recorder):
        model(normalize(images), ids, padding)
    return dict(rank=(ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
                drop_path=recorder.drop_path, dropout=recorder.dropout)


def test_tp_peers_draw_the_same_drop_path_masks_under_sequence_parallelism():
    results = {r["rank"]: r for r in run_distributed(WORLD, _sequence_parallel_masks)}
    for dp in range(WORLD // TP):
        tp0, tp1 = results[(0, dp)], results[(1, dp)]
        assert tp0["drop_path"].keys() == tp1["drop_path"].keys() and len(tp0["drop_path"]) > 4
        for key, mask in tp0["drop_path"].items():
            torch.testing.assert_close(mask, tp1["drop_path"][key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
        # hidden dropout acts on each rank's own tokens here: megatron draws it per TP rank (its sequence-parallel
        # fork), so those masks differ
        assert any(not torch.equal(mask, tp1["dropout"][key]) for key, mask in tp0["dropout"].items())


# -- checkpoints: each rank's random state, restored at the same layout only ---------------------------------------
def _save_and_load_random_states(root: str):
    import torch.distributed as dist

    from megatron_m2 import checkpointing
    from megatron_m2.random_state import RandomState
    from tests.test_checkpoint_tracking import _Weights

    parallel.initialize_model_parallel(1, 1, seed=3)  # DP 4 (_Weights is replicated over DP)
    torch.rand(dist.get_rank() + 1)  # every rank has drawn another amount: each must get its own state back
    saved = RandomState.capture()
    with forking_allowed():
        checkpointing.save_checkpoint(root, 1, _Weights(), None, None, {}, random_state=saved.state_dict())
    want = torch.rand(4)
    same, same_note = checkpointing.load_random_state(root, 1)
    RandomState.from_state_dict(same).restore()
    restored = torch.equal(torch.rand(4), want)
    parallel.initialize_model_parallel(2, 1, seed=3)  # another layout: fresh seeding
    other, other_note = checkpointing.load_random_state(root, 1)
    return dict(restored=restored, same_note=same_note, other=other, other_note=other_note)


def test_checkpoints_restore_each_ranks_random_state_at_the_same_layout_only(tmp_path):
    results = run_distributed(WORLD, _save_and_load_random_states, str(tmp_path))
    assert len(list((tmp_path / "iter_0000001" / "extra" / "rng").glob("*.pt"))) == WORLD
    for r in results:
        assert r["restored"] and r["same_note"].endswith("random states restored")
        assert r["other"] is None and r["other_note"].endswith(
            "random states saved at TP 1 x PP 1 over 4 ranks, this run is TP 2 x PP 1 over 4 ranks: dropout and "
            "drop path start fresh from --seed"), r["other_note"]
