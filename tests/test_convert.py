"""megatron <-> HF conversion: round trips, layout independence, embeddings equal to the megatron model's."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_m2 import parallel
from megatron_m2.config import load_config
from megatron_m2.testing import forking_allowed, run_command, run_distributed

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(config):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(BATCH, 3, config.image_size, config.image_size, generator=g)
    ids = torch.randint(0, config.vocab_size, (BATCH, config.max_text_length), generator=g)
    padding = torch.zeros_like(ids, dtype=torch.bool)
    padding[1, 10:] = True
    padding[3, 5:] = True
    return images, ids, padding


def _embeddings(model, config):
    """The megatron model's embeddings through the evaluation path (forward-only pipeline schedule)."""
    from megatron_m2.eval.runner import make_encoders
    from megatron_m2.training.step import forward_step

    images, ids, padding = _inputs(config)
    encode_images, encode_texts = make_encoders(forward_step, model, lambda texts: (ids, padding), config,
                                                micro_batch_size=2)
    return encode_images(images), encode_texts(["-"] * BATCH)


def _save(root, model, config, iteration):
    from megatron_m2.checkpointing import save_checkpoint

    with forking_allowed():
        save_checkpoint(root, iteration, model, None, None, {}, common={"model_config": config.to_dict()})


def _train_layout_save(root, tp, pp, backbone_heads, decoders=False):
    """A seeded model at TP x PP (with the CMLM and CMIM decoders): save a checkpoint and return its embeddings."""
    from megatron_m2.models import build_model

    config = load_config("tiny", backbone_heads=backbone_heads, vocab_size=1000)  # 1000: padding rows exist
    parallel.initialize_model_parallel(tp, pp)
    torch.manual_seed(11)
    model = build_model(config, spec="local", cmlm=decoders, cmim=decoders)
    with torch.no_grad():  # Sub-LNs and biases start at 1/0: perturb everything so a swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _save(root, model, config, iteration=5)
    return _embeddings(model, config)


def _load_and_compare(original_root, converted_root, backbone_heads, decoders=False):
    """At TP=1/PP=1: load both checkpoints (megatron reshards the original) and compare every tensor; with decoders,
    the converted checkpoint has none and its model's must keep their initialisation."""
    from megatron_m2.models import build_model
    from megatron_m2.checkpointing import load_checkpoint

    config = load_config("tiny", backbone_heads=backbone_heads, vocab_size=1000)
    parallel.initialize_model_parallel(1, 1)
    models, fresh = [], None
    for seed, root in ((1, original_root), (2, converted_root)):
        torch.manual_seed(seed)
        model = build_model(config, spec="local", cmlm=decoders, cmim=decoders)
        initial = {k: v.clone() for k, v in model.state_dict().items()
                   if model.is_decoder_parameter(k) and isinstance(v, torch.Tensor)}
        load_checkpoint(root, model)
        fresh = all(torch.equal(v, model.state_dict()[k]) for k, v in initial.items())
        models.append(model)
    a, b = (m.state_dict() for m in models)
    diffs = []
    for key, value in a.items():
        if key.endswith("_extra_state") or models[0].is_decoder_parameter(key):
            continue
        other = b[key]
        if key.endswith("word_embeddings.weight"):
            value, other = value[:config.vocab_size], other[:config.vocab_size]
        if not torch.equal(value, other):
            diffs.append(key)
    return diffs, sorted(a) == sorted(b), _embeddings(models[1], config), fresh


def _convert_from_hf_flags(hf_dir, out_root, tp=1, pp=1) -> list[str]:
    return ["--hf-input", str(hf_dir), "--save", str(out_root), "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp)]


@pytest.mark.slow
def test_round_trip_tp2pp2_to_hf_to_tp1pp1_is_bit_exact(tmp_path, capsys, backbone_heads=True):
    """(backbone_heads on: every optional tensor travels too; the CMLM / CMIM decoders are left out of the HF folder
    and start fresh on the way back; ~60 s on 2 cores)"""
    import json

    from transformers import AutoModel

    original = tmp_path / "megatron_tp2pp2"
    image_ref, text_ref = run_distributed(4, _train_layout_save, str(original), 2, 2, backbone_heads, True)[0]

    hf_dir = tmp_path / "hf"
    assert _tool("convert_to_hf").main(["--load", str(original), "--hf-output", str(hf_dir),
                                        "--max-shard-size", "300KB", "--no-progress"]) == 0
    assert (hf_dir / "model.safetensors.index.json").exists()  # sharded
    assert ("tensors of the training-only CMLM/CMIM decoders (the HF model has none): cmim_mask_token, "
            "decoders.cmim_decoder, decoders.cmim_head, decoders.cmlm_decoder, decoders.cmlm_head") in \
        capsys.readouterr().out
    keys = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert not [k for k in keys if "decoder" in k or "cmlm" in k or "cmim" in k or "mask_token" in k]
    assert "decoder_num_layers" not in json.loads((hf_dir / "config.json").read_text())

    # the HF model's embeddings equal the megatron model's (TP2 x PP2, through the pipeline schedule)
    hf = AutoModel.from_pretrained(hf_dir, trust_remote_code=True).eval()
    images, ids, padding = _inputs(load_config("tiny", vocab_size=1000))
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(images), image_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(hf.get_text_features(ids, (~padding).long()), text_ref, atol=1e-5, rtol=0)

    converted = tmp_path / "megatron_tp1pp1"
    result = run_command(1, "tools.convert_from_hf", _convert_from_hf_flags(hf_dir, converted))  # on the pool
    assert result.returncode == 0, result.stderr[-3000:]
    diffs, same_keys, (image, text), fresh = run_distributed(4, _load_and_compare, str(original), str(converted),
                                                             backbone_heads, True)[0]
    assert same_keys and diffs == [] and fresh
    # same weights at another layout: the same embeddings up to TP's different summation order
    torch.testing.assert_close(image, image_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(text, text_ref, atol=1e-5, rtol=0)


def test_convert_to_hf_errors(tmp_path, capsys):
    tool = _tool("convert_to_hf")
    assert tool.main(["--load", str(tmp_path / "none"), "--hf-output", str(tmp_path / "hf")]) == 2
    assert "--load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--hf-output", str(tmp_path / "hf")])  # --load is required


def test_convert_from_hf_layout_error(tmp_path):
    from megatron_m2.hf.configuration_m2 import M2EncoderConfig
    from megatron_m2.hf.export import save_hf_folder
    from megatron_m2.hf.modeling_m2 import M2EncoderModel

    config = load_config("tiny")
    save_hf_folder(M2EncoderModel(M2EncoderConfig(**config.to_dict())), tmp_path / "hf")
    # the script itself (4 heads: TP 3 cannot split them)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_from_hf.py"),
                             *_convert_from_hf_flags(tmp_path / "hf", tmp_path / "out", tp=3)],
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--tensor-model-parallel-size 3" in result.stderr
    assert not (tmp_path / "out").exists()


def _load_embeddings(root, tp, pp):
    from megatron_m2.models import build_model
    from megatron_m2.checkpointing import load_checkpoint

    config = load_config("tiny", backbone_heads=True)
    parallel.initialize_model_parallel(tp, pp)
    model = build_model(config, spec="local")
    load_checkpoint(root, model)
    return _embeddings(model, config)


def _load_training_scale(root, tp, pp):
    """On the last stage: the loaded logit_scale and the scale the trainer's ITC loss applies with it."""
    from megatron.core import parallel_state

    from megatron_m2.loss import itc_loss
    from megatron_m2.models import build_model
    from megatron_m2.checkpointing import load_checkpoint

    config = load_config("tiny", backbone_heads=True)
    parallel.initialize_model_parallel(tp, pp)
    model = build_model(config, spec="local")
    load_checkpoint(root, model)
    if not parallel_state.is_pipeline_last_stage():
        return None
    embeds = torch.nn.functional.normalize(torch.randn(4, config.out_dim), dim=-1)
    _, metrics = itc_loss(embeds, embeds.flip(0), model.logit_scale)  # the call the trainer's loss makes
    return model.logit_scale.item(), model.backbone_logit_scale.item(), metrics["logit_scale"].item()


@pytest.mark.slow
def test_official_import_to_megatron_gives_reference_embeddings(tmp_path):
    """Official-layout .ckpt -> megatron checkpoint -> the megatron model at TP2 x PP2 embeds like the official math."""
    from tests.test_hf import _official_state_dict, _reference_embeddings

    sd = _official_state_dict(seed=5)
    torch.save({"state_dict": {f"_forward_module.{k}": v for k, v in sd.items()}}, tmp_path / "m2.ckpt")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_official.py"), "--checkpoint",
                             str(tmp_path / "m2.ckpt"), "--megatron-output", str(tmp_path / "megatron"),
                             "--num-attention-heads", "4", "--max-text-length", "16",
                             "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "known unused official keys" in result.stderr and "backbone_vl.layers.0.ffn.B.fc1.weight" in result.stderr
    image, text = run_distributed(4, _load_embeddings, str(tmp_path / "megatron"), 2, 2)[0]
    images, ids, padding = _inputs(load_config("tiny"))
    ref_image, ref_text = _reference_embeddings(sd, images, ids, (~padding).long())
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=0)
    # training continues from the release's logit_scale (the one its inference multiplies by), not logit_vl_scale
    assert sd["logit_scale"] != sd["logit_vl_scale"]
    assert sd["logit_scale"] != load_config("tiny").logit_scale_init  # else an unloaded parameter would pass
    scales = [r for r in run_distributed(4, _load_training_scale, str(tmp_path / "megatron"), 2, 2) if r]
    assert len(scales) == 2  # the two TP ranks of the last stage
    for logit_scale, backbone_logit_scale, loss_scale in scales:
        assert logit_scale == pytest.approx(sd["logit_scale"].item())
        assert backbone_logit_scale == pytest.approx(sd["logit_scale"].item())
        assert loss_scale == pytest.approx(sd["logit_scale"].exp().item())
