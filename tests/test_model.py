"""The M2-Encoder on megatron-core: math, TP/PP numerics against a TP=1/PP=1 reference, recompute, layout errors."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.errors import ConfigError
from megatron_m2.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
BATCH, NUM_MICROBATCHES = 4, 2


def _batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, config.num_channels, config.image_size, config.image_size, generator=g)
    ids = torch.randint(0, config.vocab_size, (BATCH, config.max_text_length), generator=g)
    lengths = torch.tensor([config.max_text_length, 5, 9, 3])[:BATCH]
    padding = torch.arange(config.max_text_length)[None, :] >= lengths[:, None]
    w_img = torch.randn(BATCH, config.out_dim, generator=g)
    w_txt = torch.randn(BATCH, config.out_dim, generator=g)
    return images, ids, padding, w_img, w_txt


def _loss(image_embeds, text_embeds, w_img, w_txt):
    return (image_embeds * w_img).sum() + (text_embeds * w_txt).sum()


# -- an independent restatement of the torchscale BEiT-3 / Magneto math on the canonical weights -----------------------
def _ref_layer(x, sd, prefix, heads, eps, padding):
    from megatron_m2.models.state_dict import split_qkv

    ln = lambda t, name: F.layer_norm(t, t.shape[-1:], sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps)  # noqa: E731
    b, s, h = x.shape
    q, k, v = (F.linear(ln(x, "input_layernorm"), w, bias) for w, bias in zip(
        split_qkv(sd[f"{prefix}self_attention.linear_qkv.weight"], heads),
        split_qkv(sd[f"{prefix}self_attention.linear_qkv.bias"], heads)))
    split = lambda t: t.view(b, s, heads, h // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) * (h // heads) ** -0.5 @ split(k).transpose(-1, -2)
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, s, h)
    proj = "self_attention.linear_proj."
    x = x + F.linear(ln(ctx, proj + "layer_norm"), sd[f"{prefix}{proj}linear.weight"], sd[f"{prefix}{proj}linear.bias"])
    hidden = F.gelu(F.linear(ln(x, "pre_mlp_layernorm"), sd[f"{prefix}mlp.linear_fc1.weight"],
                             sd[f"{prefix}mlp.linear_fc1.bias"]))
    fc2 = "mlp.linear_fc2."
    return x + F.linear(ln(hidden, fc2 + "layer_norm"), sd[f"{prefix}{fc2}linear.weight"], sd[f"{prefix}{fc2}linear.bias"])


def _ref_encoder(x, sd, name, num_layers, config, padding):
    for i in range(num_layers):
        x = _ref_layer(x, sd, f"{name}.layers.{i}.", config.num_attention_heads, config.layernorm_epsilon, padding)
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.final_layernorm.weight"], sd[f"{name}.final_layernorm.bias"],
                        config.layernorm_epsilon)


def _ref_forward(sd, config, images, ids, padding):
    off = config.position_offset
    x = F.conv2d(images, sd["vision_embed.patch_embed.weight"], sd["vision_embed.patch_embed.bias"],
                 stride=config.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["vision_embed.cls_token"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + sd["vision_embed.position_embeddings.weight"][off:off + x.shape[1]]
    t = sd["text_embed.word_embeddings.weight"][ids] + sd["text_embed.position_embeddings.weight"][off:off + ids.shape[1]]
    x = _ref_encoder(_ref_encoder(x, sd, "vision_encoder", config.num_layers, config, None),
                     sd, "vl_encoder", config.num_vl_layers, config, None)
    t = _ref_encoder(_ref_encoder(t, sd, "text_encoder", config.num_layers, config, padding),
                     sd, "vl_encoder", config.num_vl_layers, config, padding)
    return (F.normalize(F.linear(x[:, 0], sd["image_projection.weight"]), dim=-1),
            F.normalize(F.linear(t[:, 0], sd["text_projection.weight"]), dim=-1))


def _single_process_forward():
    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict

    parallel.initialize_model_parallel(1, 1)
    config = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(config, spec="local")
    images, ids, padding, _, _ = _batch(config)
    image_embeds, text_embeds = model(images, ids, padding)
    # tokens under the padding mask must not matter
    ids_other = torch.where(padding, (ids + 7) % config.vocab_size, ids)
    text_other = model(None, ids_other, padding)[1]
    image_only, text_none = model(images, None, None)
    groups = {name: (model.is_vision_parameter(name), model.is_text_parameter(name))
              for name, _ in model.named_parameters()}
    return dict(image=image_embeds.detach(), text=text_embeds.detach(), text_other=text_other.detach(),
                image_only=image_only.detach(), text_none=text_none, state=canonical_state_dict(model, config),
                groups=groups)


def test_tp1_pp1_forward_matches_torchscale_math():
    out = run_distributed(4, _single_process_forward)[0]
    config = load_config("tiny")
    images, ids, padding, _, _ = _batch(config)
    assert out["state"]["text_embed.word_embeddings.weight"].shape[0] == config.vocab_size  # padding stripped
    ref_image, ref_text = _ref_forward(out["state"], config, images, ids, padding)
    torch.testing.assert_close(out["image"], ref_image, **TOL)
    torch.testing.assert_close(out["text"], ref_text, **TOL)
    torch.testing.assert_close(out["text_other"], out["text"], **TOL)
    torch.testing.assert_close(out["image_only"], out["image"], **TOL)
    assert out["text_none"] is None
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(BATCH))
    # LiT / partial loading: towers are told apart; the shared VL layers and logit_scale belong to neither
    for name, (vision, text) in out["groups"].items():
        shared = name.startswith("vl_encoder.") or name == "logit_scale"
        assert (vision, text) == (name.startswith(("vision_", "image_")), name.startswith(("text_embed", "text_enc",
                                                                                            "text_proj")))
        assert shared == (not vision and not text), name


def _init_stds():
    from megatron_m2.models import build_model

    parallel.initialize_model_parallel(1, 1)
    stds = {}
    for std in (None, 0.02):  # the tiny preset's own (0.125), and BEiT-3's
        torch.manual_seed(0)
        model = build_model(load_config("tiny", init_method_std=std), spec="local")
        stds[std] = {name: p.std().item() for name, p in model.named_parameters()
                     if p.dim() >= 2 and "patch_embed" not in name}
    return stds


def test_init_method_std_sets_every_weight_matrix_and_table_without_depth_scaling():
    stds = run_distributed(4, _init_stds)[0]  # the shared pool; each rank builds the TP=1 model
    for key, expected in ((None, load_config("tiny").init_method_std), (0.02, 0.02)):
        names = stds[key]
        assert any("linear_proj" in n for n in names) and any("linear_fc2" in n for n in names)
        assert any("position_embeddings" in n for n in names) and any("word_embeddings" in n for n in names)
        for name, std in names.items():
            assert std == pytest.approx(expected, rel=0.2), (key, name)
    assert load_config("tiny").init_method_std == 0.125 and load_config("10b").init_method_std == 0.02


# -- TP / PP / recompute against the TP=1, PP=1 reference -----------------------------------------------------------
def _rank_info():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank())


def _train_step(model, config, num_microbatches):
    """Forward + backward of the whole batch through megatron-core's schedule; last stage returns the embeddings."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    images, ids, padding, w_img, w_txt = _batch(config)
    mbs = BATCH // num_microbatches
    micro = [dict(images=images[i:i + mbs], ids=ids[i:i + mbs], padding=padding[i:i + mbs],
                  w_img=w_img[i:i + mbs], w_txt=w_txt[i:i + mbs]) for i in range(0, BATCH, mbs)]
    outputs = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["images"], batch["ids"], batch["padding"])

        def loss_func(output_tensor):
            image_embeds, text_embeds = output_tensor
            outputs.append((image_embeds.detach(), text_embeds.detach()))
            loss = _loss(image_embeds, text_embeds, batch["w_img"], batch["w_txt"])
            return loss, {"loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=model, num_microbatches=num_microbatches,
        seq_length=config.vision_seq_length + config.max_text_length, micro_batch_size=mbs, forward_only=False)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    embeds = None
    if ps.is_pipeline_last_stage():
        embeds = tuple(torch.cat(parts) for parts in zip(*outputs))
    return embeds, grads


def _parallel_vs_reference(tp, pp, **overrides):
    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict, unshard_state_dicts

    config = load_config("tiny")
    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    reference = build_model(config, spec="local")
    full = canonical_state_dict(reference, config)
    ref_embeds, ref_grads = _train_step(reference, config, NUM_MICROBATCHES)
    ref_grads = unshard_state_dicts({(0, 0): ref_grads}, config)

    parallel.initialize_model_parallel(tp, pp)
    torch.manual_seed(1)  # different init: every weight must come from the copy
    model = build_model(config, spec="local", **overrides)
    tp_rank, pp_rank, dp_rank = _rank_info()
    load_canonical_state_dict(model, full, config, tp_rank, tp, pp_rank, pp)
    from megatron.core import tensor_parallel

    checkpoint, recomputed = tensor_parallel.checkpoint, []
    tensor_parallel.checkpoint = lambda *args, **kwargs: recomputed.append(1) or checkpoint(*args, **kwargs)
    try:
        embeds, grads = _train_step(model, config, NUM_MICROBATCHES)
    finally:
        tensor_parallel.checkpoint = checkpoint
    num_params = sum(p.numel() for p in model.parameters())
    return dict(rank=(tp_rank, pp_rank, dp_rank), embeds=embeds, grads=grads, ref_embeds=ref_embeds,
                ref_grads=ref_grads, num_params=num_params, recomputed=len(recomputed), param_names=sorted(n for n, _ in model.named_parameters()))


def _check_against_reference(results, tp, pp):
    from megatron_m2.models.state_dict import unshard_state_dicts

    config = load_config("tiny")
    ref = results[0]
    by_rank = {r["rank"][:2]: r for r in results if r["rank"][2] == 0}
    assert sorted(by_rank) == [(t, p) for t in range(tp) for p in range(pp)]
    # every parameter except logit_scale (not in this loss) gets a gradient on every stage
    for r in by_rank.values():
        assert sorted(r["grads"]) == [n for n in r["param_names"] if n != "logit_scale"]
    last = by_rank[(0, pp - 1)]
    for got, want in zip(last["embeds"], ref["ref_embeds"]):
        torch.testing.assert_close(got, want, **TOL)
    grads = unshard_state_dicts({k: r["grads"] for k, r in by_rank.items()}, config, tp, pp)
    assert sorted(grads) == sorted(ref["ref_grads"])
    for name, want in ref["ref_grads"].items():
        torch.testing.assert_close(grads[name], want, **TOL, msg=lambda m: f"{name}: {m}")
    for r in results[1:]:  # DP replicas and TP peers agree on the embeddings too
        if r["embeds"] is not None:
            for got, want in zip(r["embeds"], ref["ref_embeds"]):
                torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_embeddings_and_grads_match_reference(tp, pp):
    results = run_distributed(4, _parallel_vs_reference, tp, pp)
    _check_against_reference(results, tp, pp)


def test_activation_recompute_gives_same_grads():
    results = run_distributed(4, _parallel_vs_reference, 2, 2, recompute_granularity="full",
                              recompute_method="uniform", recompute_num_layers=1)
    # megatron's uniform recompute ran once per layer (and VL layer per modality) per micro-batch
    config = load_config("tiny")
    stages = {r["rank"][1]: r["recomputed"] for r in results}
    assert stages == {0: 2 * 2 * NUM_MICROBATCHES, 1: (2 * 1 + 2 * config.num_vl_layers) * NUM_MICROBATCHES}
    _check_against_reference(results, 2, 2)


# -- layout errors, before anything is allocated --------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields,tp,pp,flag",
    [
        ({}, 3, 1, "--tensor-model-parallel-size 3 must divide the model's num_attention_heads"),
        ({"ffn_hidden_size": 255}, 2, 1, "--tensor-model-parallel-size 2 must divide the model's ffn_hidden_size"),
        ({}, 1, 3, "--pipeline-model-parallel-size 3 must divide num_layers"),
        ({"num_layers": 2, "num_vl_layers": 2}, 1, 4, "--pipeline-model-parallel-size 4 leaves 1 layers"),
    ],
)
def test_build_model_rejects_impossible_layouts_before_allocating(monkeypatch, fields, tp, pp, flag):
    from megatron.core import parallel_state

    from megatron_m2.models import m2_model

    config = dataclasses.replace(load_config("tiny"), **fields)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: tp)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: pp)

    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated before validating the layout")

    monkeypatch.setattr(m2_model, "transformer_config", no_allocation)
    monkeypatch.setattr(m2_model.M2PipelineStage, "__init__", no_allocation)
    with pytest.raises(ConfigError, match=flag):
        m2_model.build_model(config, spec="local")


def test_world_size_not_divisible_by_tp_x_pp_names_the_flags():
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size.*--pipeline-model-parallel-size"):
        parallel.validate_layout(6, 2, 2)


# -- parameter counts of the presets against the official shapes ----------------------------------------------------
def _meta_parameter_counts(presets):
    import torch.distributed as dist

    from megatron_m2.models import build_model

    parallel.initialize_model_parallel(1, 1)
    if dist.get_rank() != 0:
        return None
    counts = {}
    for preset in presets:
        with torch.device("meta"):
            model = build_model(load_config(preset), spec="local", perform_initialization=False)
        counts[preset] = sum(p.numel() for p in model.parameters())
    return counts


def test_preset_parameter_counts_match_official_shapes():
    from megatron_m2.config import PRESETS
    from megatron_m2.arithmetic import (
        model_parameter_count, official_parameter_count, official_unused_parameter_count)

    counts = run_distributed(4, _meta_parameter_counts, PRESETS)[0]
    for preset in PRESETS:
        config = load_config(preset)
        padding = (model_parameter_count(config) - official_parameter_count(config)
                   + official_unused_parameter_count(config)) // config.hidden_size
        assert 0 <= padding < 128
        assert counts[preset] == model_parameter_count(config), preset
    official_10b = official_parameter_count(load_config("10b"))
    assert 10.1e9 < official_10b < 10.3e9, official_10b


# -- single-modality encoding through the pipeline, backbone heads, layout-independent checkpoints -----------------
def _encode_one_modality(tp, pp):
    """Forward-only pipeline runs with images only and text only (the other stream has length 0)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict

    config = dataclasses.replace(load_config("tiny"), backbone_heads=True)
    images, ids, padding, _, _ = _batch(config)
    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    reference = build_model(config, spec="local")
    with torch.no_grad():
        ref = reference(images, ids, padding)
    full = canonical_state_dict(reference, config)

    parallel.initialize_model_parallel(tp, pp)
    model = build_model(config, spec="local")
    load_canonical_state_dict(model, full, config, ps.get_tensor_model_parallel_rank(), tp,
                              ps.get_pipeline_model_parallel_rank(), pp)
    model.eval()
    results = {}
    for name, batch, seq in (("image", (images, None, None), config.vision_seq_length),
                             ("text", (None, ids, padding), config.max_text_length)):
        def forward_step(data_iterator, model):
            output = model(*next(data_iterator))
            return output, lambda out, non_loss_data=True: out
        with torch.no_grad():
            outs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=model, num_microbatches=1,
                seq_length=seq, micro_batch_size=BATCH, forward_only=True, collect_non_loss_data=True)
        results[name] = outs[0] if ps.is_pipeline_last_stage() else None
    return results, ref


def test_image_only_and_text_only_encoding_through_pipeline_with_backbone_heads():
    results = run_distributed(4, _encode_one_modality, 2, 2)
    last, ref = results[2]  # ranks 2, 3 are the last stage (TP 2)
    image, text = last["image"], last["text"]
    assert len(image) == 4 and image[1] is None and image[3] is None
    assert text[0] is None and text[2] is None
    for got, want in ((image[0], ref[0]), (image[2], ref[2]), (text[1], ref[1]), (text[3], ref[3])):
        torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(ref[0], ref[2], atol=1e-3)  # backbone heads are a different output


def _sharded_tensors(tp, pp):
    """Each rank's ShardedTensors (what dist checkpoints store) after loading the same canonical weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_m2.models import build_model
    from megatron_m2.models.state_dict import canonical_state_dict, load_canonical_state_dict

    config = load_config("tiny")
    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    full = canonical_state_dict(build_model(config, spec="local"), config)
    parallel.initialize_model_parallel(tp, pp)
    model = build_model(config, spec="local")
    load_canonical_state_dict(model, full, config, ps.get_tensor_model_parallel_rank(), tp,
                              ps.get_pipeline_model_parallel_rank(), pp)
    return [(t.key, t.global_shape, t.global_offset, t.prepend_axis_num, t.data.detach().clone(), t.replica_id)
            for t in model.sharded_state_dict().values() if isinstance(t, ShardedTensor)]


def _assemble(per_rank):
    """Global tensors from the shards; every element must be written (by the main replica) exactly once."""
    full, written = {}, {}
    for shards in per_rank:
        for key, shape, offset, prepend, data, replica_id in shards:
            if any(replica_id if isinstance(replica_id, tuple) else (replica_id,)):
                continue  # a replica: only the main copy is saved
            full.setdefault(key, torch.zeros(shape))
            written.setdefault(key, torch.zeros(shape, dtype=torch.int))
            index = tuple(slice(o, o + n) for o, n in zip(offset, (1,) * prepend + tuple(data.shape)))
            full[key][index] = data.reshape((1,) * prepend + tuple(data.shape))
            written[key][index] += 1
    for key, count in written.items():
        assert bool((count == 1).all()), f"{key}: elements written {count.min()}..{count.max()} times"
    return full


def test_sharded_state_dict_is_layout_independent():
    """dist checkpoints are layout-independent: TP2 x PP2 shards describe the same global tensors as TP1 x PP1."""
    config = load_config("tiny")
    single = _assemble([run_distributed(4, _sharded_tensors, 1, 1)[0]])
    split = _assemble(run_distributed(4, _sharded_tensors, 2, 2))
    assert sorted(split) == sorted(single)
    for key, tensor in single.items():
        if "word_embeddings" in key:  # vocab padding: 128 rows at TP1, 256 at TP2
            tensor, split[key] = tensor[:config.vocab_size], split[key][:config.vocab_size]
        torch.testing.assert_close(split[key], tensor, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


def _time_tiny_steps(tp, pp, steps=5):
    """Seconds per forward+backward of the tiny preset (batch 4, 2 micro-batches); for the report, not a test:
    `.venv/bin/python -c "from megatron_m2.testing import run_distributed; from tests.test_model import
    _time_tiny_steps as f; print(run_distributed(4, f, 2, 2))"`"""
    import time

    from megatron_m2.models import build_model

    config = load_config("tiny")
    parallel.initialize_model_parallel(tp, pp)
    model = build_model(config, spec="local")
    _train_step(model, config, NUM_MICROBATCHES)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        _train_step(model, config, NUM_MICROBATCHES)
    return (time.perf_counter() - start) / steps


@pytest.mark.parametrize("preset", ["tiny", "0.4b", "10b"])
def test_megatron_layer_offsets_follow_layers_per_stage(preset):
    """Every valid PP size: megatron's own layer numbering (used by dist checkpoints) matches layers_per_stage."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_m2.config import layers_per_stage, transformer_config
    from megatron_m2.models.m2_model import _stage_block_config

    config = load_config(preset)
    units = config.num_layers + config.num_vl_layers
    for pp in [p for p in range(1, units + 1) if units % p == 0 and units // p >= config.num_vl_layers]:
        stages = layers_per_stage(config, pp)
        tc = transformer_config(config, 1, pp, use_cpu_initialization=True, pipeline_dtype=torch.float32)
        block_config = _stage_block_config(tc, config.num_layers, stages)
        for rank, count in enumerate(stages):
            if count:
                assert get_transformer_layer_offset(block_config, None, rank) == sum(stages[:rank]), (pp, rank)
                assert get_num_layers_to_build(block_config, None, rank) == count, (pp, rank)


def _train_with_backbone_heads(steps: int = 3):
    """An imported official model (backbone heads on) trains a few steps on megatron's DDP with overlapped gradient
    reduction (the GPU default) and weight decay: what happens to the heads no loss uses."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_m2.models import build_model
    from megatron_m2.models.m2_model import packed_sequence_length
    from megatron_m2.training.arguments import build_parser, validate_args
    from megatron_m2.training.optimizer import build_optimizer
    from megatron_m2.training.step import StepConfig, forward_step, train_step

    config = dataclasses.replace(load_config("tiny"), backbone_heads=True)
    parallel.initialize_model_parallel(1, 1)  # DP 4: every rank fails alike before the fix (no peer left waiting)
    torch.manual_seed(0)
    model = build_model(config, spec="local")
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=None))
    args = build_parser().parse_args(["--weight-decay", "0.1", "--lr", "1e-2", "--lr-warmup-iters", "0",
                                      "--micro-batch-size", str(BATCH), "--global-batch-size", str(BATCH * 2 * 4),
                                      "--dry-run"])
    args.model_config = config
    validate_args(args, world_size=4)
    optimizer, scheduler = build_optimizer(ddp, args)
    heads = {name: param.detach().clone() for name, param in model.named_parameters() if "backbone_" in name}
    others = {name: param.detach().clone() for name, param in model.named_parameters() if "backbone_" not in name}
    step_config = StepConfig(num_microbatches=2, micro_batch_size=BATCH, seq_length=packed_sequence_length(config))
    g = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    for _ in range(steps):
        batches = iter([dict(images=torch.randint(0, 256, (BATCH, 3, config.image_size, config.image_size),
                                                  dtype=torch.uint8, generator=g),
                             text_ids=torch.randint(0, config.vocab_size, (BATCH, config.max_text_length), generator=g),
                             text_padding_mask=_batch(config)[2]) for _ in range(2)])
        train_step(forward_step, batches, ddp, optimizer, scheduler, step_config)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    return dict(
        heads_unchanged={name: torch.equal(params[name], value) for name, value in heads.items()},
        heads_in_optimizer=[name for name in heads if id(params[name]) in optimized],
        heads_trainable=[name for name in heads if params[name].requires_grad],
        others_changed=all(not torch.equal(params[name], value) for name, value in others.items()
                           if params[name].requires_grad and not name.endswith("bias")))


def test_backbone_heads_are_frozen_no_gradient_no_decay_no_bucket_error():
    # The official release's second pair of heads (backbone_image/text_projection, backbone_logit_scale) is carried
    # for get_backbone_features; no training loss uses it. Trainable, it got no gradient, which trips megatron's
    # bucket check on step 2 with overlap_grad_reduce, and weight decay shrank it every step. Frozen: neither.
    results = run_distributed(4, _train_with_backbone_heads, timeout_s=120)
    for r in results:
        assert sorted(r["heads_unchanged"]) == ["backbone_image_projection.weight", "backbone_logit_scale",
                                                "backbone_text_projection.weight"]
        assert all(r["heads_unchanged"].values()) and not r["heads_in_optimizer"] and not r["heads_trainable"]
    assert all(r["others_changed"] for r in results)
