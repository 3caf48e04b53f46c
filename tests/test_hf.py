"""HF model, processor, official-checkpoint importer, AutoModel remote-code loading."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_m2.errors import ConfigError
from megatron_m2.hf.configuration_m2 import M2EncoderConfig
from megatron_m2.hf.export import save_hf_folder
from megatron_m2.hf.modeling_m2 import M2EncoderModel
from megatron_m2.testing import run_command
from tests.glm import GLM_MODEL, needs_glm

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, num_layers=3, num_vl_layers=1, out_dim=32,
            image_size=32, patch_size=8, vocab_size=1024, max_text_length=16, text_position_table_size=18)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, TINY["image_size"], TINY["image_size"], generator=g)
    ids = torch.randint(0, TINY["vocab_size"], (batch, TINY["max_text_length"]), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padded rows make the key padding mask matter
    mask[2, 4:] = 0
    return pixels, ids, mask


# ---- an official-layout checkpoint written from the release's key names, and a plain reference forward ----------

# the release's two scales differ from each other and from the init value log(1/0.07), so a test can tell which one
# a path uses and that it was loaded at all
OFFICIAL_LOGIT_SCALE, OFFICIAL_LOGIT_VL_SCALE = math.log(1 / 0.03), math.log(1 / 0.05)


def _official_state_dict(seed: int = 0, vocab_size: int = TINY["vocab_size"]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, out = TINY["hidden_size"], TINY["ffn_hidden_size"], TINY["out_dim"]
    vision_rows = (TINY["image_size"] // TINY["patch_size"]) ** 2 + 1 + 2
    rnd = lambda *shape, scale=0.1: torch.randn(*shape, generator=g) * scale  # noqa: E731
    ln = lambda n: {"weight": 1 + rnd(n), "bias": rnd(n)}  # noqa: E731
    sd = {"backbone.text_embed.weight": rnd(vocab_size, h, scale=1.0),
          "backbone.vision_embed.proj.weight": rnd(h, 3, TINY["patch_size"], TINY["patch_size"]),
          "backbone.vision_embed.proj.bias": rnd(h), "backbone.vision_embed.cls_token": rnd(1, 1, h, scale=1.0),
          "backbone.vision_embed.mask_token": rnd(1, 1, h),
          "backbone.encoder.embed_positions.A.weight": rnd(vision_rows, h),
          "backbone.encoder.embed_positions.B.weight": rnd(TINY["text_position_table_size"], h)}

    def layer(prefix, copies):
        for m in copies:
            for name, shape in (("q_proj", (h, h)), ("k_proj", (h, h)), ("v_proj", (h, h)), ("out_proj", (h, h))):
                sd[f"{prefix}.self_attn.{name}.{m}.weight"] = rnd(*shape, scale=h ** -0.5)
                sd[f"{prefix}.self_attn.{name}.{m}.bias"] = rnd(shape[0])
            for name, n in (("self_attn.inner_attn_ln", h), ("self_attn_layer_norm", h), ("final_layer_norm", h),
                            (f"ffn.{m}.ffn_layernorm", f)):
                key = f"{prefix}.{name}" if name.startswith("ffn.") else f"{prefix}.{name}.{m}"
                sd.update({f"{key}.{p}": v for p, v in ln(n).items()})
            sd[f"{prefix}.ffn.{m}.fc1.weight"], sd[f"{prefix}.ffn.{m}.fc1.bias"] = rnd(f, h, scale=h ** -0.5), rnd(f)
            sd[f"{prefix}.ffn.{m}.fc2.weight"], sd[f"{prefix}.ffn.{m}.fc2.bias"] = rnd(h, f, scale=f ** -0.5), rnd(h)

    for n in range(TINY["num_layers"]):
        layer(f"backbone.encoder.layers.{n}", "AB")
    for n in range(TINY["num_vl_layers"]):
        layer(f"backbone_vl.layers.{n}", "AB")
    for m in "AB":
        sd.update({f"backbone.encoder.layer_norm.{m}.{p}": v for p, v in ln(h).items()})
        sd.update({f"backbone_vl.layer_norm.{m}.{p}": v for p, v in ln(h).items()})
    for head in ("itc_text_proj", "itc_image_proj", "itc_vl_text_proj", "itc_vl_image_proj"):
        sd[f"{head}.fc.weight"] = rnd(out, h, scale=h ** -0.5)
    sd["logit_scale"] = torch.tensor(OFFICIAL_LOGIT_SCALE)
    sd["logit_vl_scale"] = torch.tensor(OFFICIAL_LOGIT_VL_SCALE)
    sd.update({"norm.weight": 1 + rnd(h), "norm.bias": rnd(h), "pooler.dense.weight": rnd(h, h),
               "pooler.dense.bias": rnd(h)})
    return sd


def _reference_embeddings(sd, pixels, ids, mask, vl=True):
    """torchscale BEiT-3 multiway forward written directly on the official keys (the test's independent oracle)."""
    h, heads = TINY["hidden_size"], TINY["num_attention_heads"]
    ln = lambda x, k: F.layer_norm(x, (x.shape[-1],), sd[f"{k}.weight"], sd[f"{k}.bias"], 1e-5)  # noqa: E731
    lin = lambda x, k: F.linear(x, sd[f"{k}.weight"], sd[f"{k}.bias"])  # noqa: E731

    def encoder(x, prefix, layers, m, pad):
        x = x * (1 - pad.unsqueeze(-1).float()) if pad is not None else x
        for n in range(layers):
            p = f"{prefix}layers.{n}"
            y = ln(x, f"{p}.self_attn_layer_norm.{m}")
            b, s, _ = y.shape
            q = (lin(y, f"{p}.self_attn.q_proj.{m}") * (h // heads) ** -0.5).view(b, s, heads, -1).transpose(1, 2)
            k = lin(y, f"{p}.self_attn.k_proj.{m}").view(b, s, heads, -1).transpose(1, 2)
            v = lin(y, f"{p}.self_attn.v_proj.{m}").view(b, s, heads, -1).transpose(1, 2)
            w = q @ k.transpose(-1, -2)
            if pad is not None:
                w = w.masked_fill(pad[:, None, None, :].bool(), float("-inf"))
            a = (w.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
            x = x + lin(ln(a, f"{p}.self_attn.inner_attn_ln.{m}"), f"{p}.self_attn.out_proj.{m}")
            y = F.gelu(lin(ln(x, f"{p}.final_layer_norm.{m}"), f"{p}.ffn.{m}.fc1"))
            x = x + lin(ln(y, f"{p}.ffn.{m}.ffn_layernorm"), f"{p}.ffn.{m}.fc2")
        return ln(x, f"{prefix}layer_norm.{m}")

    patches = F.conv2d(pixels, sd["backbone.vision_embed.proj.weight"], sd["backbone.vision_embed.proj.bias"],
                       stride=TINY["patch_size"]).flatten(2).transpose(1, 2)
    xv = torch.cat([sd["backbone.vision_embed.cls_token"].expand(len(pixels), -1, -1), patches], 1)
    xv = xv + sd["backbone.encoder.embed_positions.A.weight"][2:2 + xv.shape[1]]
    xt = sd["backbone.text_embed.weight"][ids] + sd["backbone.encoder.embed_positions.B.weight"][2:2 + ids.shape[1]]
    pad = 1 - mask
    bv = encoder(xv, "backbone.encoder.", TINY["num_layers"], "A", None)
    bt = encoder(xt, "backbone.encoder.", TINY["num_layers"], "B", pad)
    if not vl:
        return (F.normalize(bv[:, 0] @ sd["itc_image_proj.fc.weight"].t(), dim=-1),
                F.normalize(bt[:, 0] @ sd["itc_text_proj.fc.weight"].t(), dim=-1))
    vv = encoder(bv, "backbone_vl.", TINY["num_vl_layers"], "A", None)
    vt = encoder(bt, "backbone_vl.", TINY["num_vl_layers"], "A", pad)
    return (F.normalize(vv[:, 0] @ sd["itc_vl_image_proj.fc.weight"].t(), dim=-1),
            F.normalize(vt[:, 0] @ sd["itc_vl_text_proj.fc.weight"].t(), dim=-1))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Official-layout .ckpt (Lightning state_dict with the _forward_module. prefix) -> HF folder."""
    tmp = tmp_path_factory.mktemp("official")
    sd = _official_state_dict()
    torch.save({"state_dict": {f"_forward_module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp / "m2.ckpt")
    rc = _tool("import_official").main(["--checkpoint", str(tmp / "m2.ckpt"), "--hf-output", str(tmp / "hf"),
                                        "--num-attention-heads", "4", "--max-text-length", "16"])
    assert rc == 0
    return sd, tmp / "hf"


def test_official_import_gives_reference_embeddings(imported):
    sd, folder = imported
    model = M2EncoderModel.from_pretrained(folder).eval()
    assert model.config.backbone_heads and model.config.text_position_table_size == TINY["text_position_table_size"]
    pixels, ids, mask = _inputs()
    ref_image, ref_text = _reference_embeddings(sd, pixels, ids, mask)
    with torch.no_grad():
        image, text = model.get_image_features(pixels), model.get_text_features(ids, mask)
        bb_image, bb_text = model.get_backbone_features(pixels, ids, mask)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=0)
    ref_bb = _reference_embeddings(sd, pixels, ids, mask, vl=False)
    torch.testing.assert_close(bb_image, ref_bb[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(bb_text, ref_bb[1], atol=1e-5, rtol=0)


def test_official_logits_follow_the_released_inference(imported):
    """m2_encoder.py: probs = softmax(logit_scale.exp() * img_vl @ txt_vl.T); logit_vl_scale is never read."""
    sd, folder = imported
    assert sd["logit_scale"] != sd["logit_vl_scale"]
    model = M2EncoderModel.from_pretrained(folder).eval()
    pixels, ids, mask = _inputs()
    ref_image, ref_text = _reference_embeddings(sd, pixels, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    release_logits = sd["logit_scale"].exp() * ref_image @ ref_text.t()
    torch.testing.assert_close(out.logits_per_image, release_logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_image.softmax(-1), release_logits.softmax(-1), atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(OFFICIAL_LOGIT_SCALE)
    assert model.backbone_logit_scale.item() == pytest.approx(OFFICIAL_LOGIT_SCALE)


def test_official_import_records_the_release_preprocessing(imported):
    """Imported weights carry the release's squash transform; the evaluator and the exported image processor use it."""
    from PIL import Image

    from megatron_m2.eval.datasets import model_eval_transform
    from megatron_m2.hf.convert import m2_config_from_hf
    from megatron_m2.hf.image_processing_m2 import M2ImageProcessor

    _, folder = imported
    config = M2EncoderConfig.from_pretrained(folder)
    assert (config.image_resize_mode, config.image_interpolation) == ("squash", "bicubic")
    assert config.image_mean == config.image_std == [0.5, 0.5, 0.5]
    evaluator = model_eval_transform(m2_config_from_hf(config))
    processor = M2ImageProcessor.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 128, 3), dtype=np.uint8))
    expected = evaluator(image)
    # squash: the whole 128x80 image is resized to 32x32 (a crop would keep only its middle 80x80)
    squashed = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(expected.permute(1, 2, 0).numpy(), squashed, atol=1e-6)
    got = processor(image, return_tensors="pt")["pixel_values"][0]
    assert (got - expected).abs().max().item() <= 1e-6


def test_official_training_only_keys_are_known_unused(caplog):
    """Distillation-teacher keys (itc_teacher*, ignored by the release's loader) and logit_vl_scale are listed as
    known-unused; other unknown keys still stop the import."""
    from megatron_m2.hf.official import config_from_official, official_to_hf_state_dict

    sd = _official_state_dict(seed=2)
    sd.update({"itc_teacher_text_proj.fc.weight": torch.zeros(4, 4), "itc_teacher_image_proj.fc.weight":
               torch.zeros(4, 4), "itc_teacher.backbone.encoder.layers.0.ffn.A.fc1.weight": torch.zeros(2)})
    config = config_from_official(sd, num_attention_heads=4)
    with caplog.at_level("INFO", logger="megatron_m2.hf.official"):
        state = official_to_hf_state_dict(sd, config)
    assert "itc_teacher_text_proj.fc.weight" in caplog.text and "logit_vl_scale" in caplog.text
    assert not any("teacher" in k for k in state)
    sd["itc_extra_proj.fc.weight"] = torch.zeros(2)
    with pytest.raises(ConfigError, match="unknown keys .*itc_extra_proj"):
        official_to_hf_state_dict(sd, config)


@pytest.mark.parametrize("wrap", ["module", "model", "bare"])
def test_official_wrappers(tmp_path, wrap):
    sd = _official_state_dict(seed=1)
    ckpt = {"module": {f"module.{k}": v for k, v in sd.items()}} if wrap == "module" else (
        {"model": sd} if wrap == "model" else sd)
    torch.save(ckpt, tmp_path / "m2.ckpt")
    from megatron_m2.hf.official import config_from_official, load_official_state_dict, official_to_hf_state_dict

    loaded = load_official_state_dict(tmp_path / "m2.ckpt")
    state = official_to_hf_state_dict(loaded, config_from_official(loaded, num_attention_heads=4))
    torch.testing.assert_close(state["vl_encoder.layers.0.fc1.weight"], sd["backbone_vl.layers.0.ffn.A.fc1.weight"])


def test_official_unknown_and_missing_keys_are_listed(tmp_path, capsys):
    sd = _official_state_dict()
    sd["backbone.encoder.layers.0.self_attn.rel_pos.A.weight"] = torch.zeros(2)
    del sd["backbone_vl.layers.0.ffn.A.fc2.bias"]
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    rc = _tool("import_official").main(["--checkpoint", str(tmp_path / "bad.ckpt"), "--hf-output",
                                        str(tmp_path / "hf"), "--num-attention-heads", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "backbone.encoder.layers.0.self_attn.rel_pos.A.weight" in err and "backbone_vl.layers.0.ffn.A.fc2.bias" in err
    # the unused backbone_vl B copies are accepted, not reported as unknown
    assert "backbone_vl.layers.0.ffn.B.fc2.bias" not in err


def test_import_official_flag_errors(tmp_path, capsys):
    tool = _tool("import_official")
    assert tool.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--hf-output", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    torch.save({"state_dict": _official_state_dict()}, tmp_path / "m2.ckpt")
    assert tool.main(["--checkpoint", str(tmp_path / "m2.ckpt")]) == 2
    assert "--hf-output" in capsys.readouterr().err
    # hidden 64 is no official size: the head count must be given
    assert tool.main(["--checkpoint", str(tmp_path / "m2.ckpt"), "--hf-output", str(tmp_path / "hf")]) == 2
    assert "--num-attention-heads" in capsys.readouterr().err


# ---- HF folder: sharding, AutoModel in a fresh process without megatron ------------------------------------------

def test_sharded_save_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = M2EncoderModel(M2EncoderConfig(**TINY)).eval()
    save_hf_folder(model, tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_m2.M2EncoderModel"
    reloaded = M2EncoderModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


# ---- transformers' Auto classes on a folder made by tools/convert_to_hf.py, in a fresh process -------------------

# Runs with transformers, torch, sentencepiece and Pillow only: any import of our packages fails (they are installed
# in this venv, so an import blocker stands in for their absence), and none may be loaded at the end.
_FRESH = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron_m2", "megatron", "tests"):
            raise ImportError(f"the exported folder imported {name}")
        return None

sys.meta_path.insert(0, Block())
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

folder, inputs = sys.argv[1], sys.argv[2]
x = torch.load(inputs)
texts, images = x["texts"], [Image.open(p) for p in x["images"]]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
out = {"classes": [type(o).__module__ + "." + type(o).__name__
                   for o in (processor, tokenizer, image_processor, model)]}
out["max_length"] = dict(tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt"))
out["longest"] = dict(tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
out["decode"] = tokenizer.batch_decode(out["max_length"]["input_ids"], skip_special_tokens=True)
out["decode_one"] = processor.decode(out["max_length"]["input_ids"][0], skip_special_tokens=True)
out["pixel_values"] = image_processor(images, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    for padding in ("max_length", True):
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=padding, truncation=True)
        out[f"keys_{padding}"] = sorted(inputs.keys())
        result = model(**inputs)
        out[f"model_{padding}"] = {k: result[k] for k in ("image_embeds", "text_embeds", "logits_per_image")}
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron_m2", "megatron"))
torch.save(out, sys.argv[2] + ".out")
"""

FRESH_TEXTS = ["一只猫坐在垫子上", "A photo of  a dog", "混合 mixed text [MASK] x",
               "a long caption that cannot fit in sixteen tokens so its start is cut off, the end stays"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Official-layout .ckpt -> tools/import_official.py --megatron-output -> tools/convert_to_hf.py (with the GLM
    tokenizer) -> folder; the text table has the GLM vocabulary so every id it produces has a row."""
    tmp = tmp_path_factory.mktemp("converted")
    sd = _official_state_dict(seed=4, vocab_size=115244)
    torch.save({"state_dict": sd}, tmp / "m2.ckpt")
    # (tools/import_official.py on the one-rank worker pool; test_convert.py runs the script itself)
    result = run_command(1, "tools.import_official", ["--checkpoint", str(tmp / "m2.ckpt"), "--megatron-output",
                                                      str(tmp / "megatron"), "--num-attention-heads", "4",
                                                      "--max-text-length", "16"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tool("convert_to_hf").main(["--load", str(tmp / "megatron"), "--hf-output", str(tmp / "hf"),
                                        "--tokenizer-model", str(GLM_MODEL), "--no-progress"]) == 0
    return sd, tmp


@pytest.mark.slow
@needs_glm
def test_megatron_checkpoint_keeps_the_official_logit_scale(converted):
    """The trainer starts from the checkpoint's logit_scale (tests/test_convert.py loads it into the model)."""
    from megatron_m2.hf.megatron_io import DistCheckpointReader

    sd, tmp = converted
    reader = DistCheckpointReader(tmp / "megatron")
    assert reader.load("logit_scale").item() == pytest.approx(OFFICIAL_LOGIT_SCALE)
    assert reader.common()["model_config"]["image_resize_mode"] == "squash"


@pytest.mark.slow
@needs_glm
def test_auto_classes_on_a_converted_folder_in_a_fresh_process(converted):
    from PIL import Image

    from megatron_m2.data.tokenizer import GLMTokenizer
    from megatron_m2.eval.datasets import model_eval_transform
    from megatron_m2.hf.convert import m2_config_from_hf

    sd, tmp = converted
    folder = tmp / "hf"
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(((128, 80), (45, 101), (32, 32))):  # non-square both ways, and square
        paths.append(str(tmp / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    torch.save({"texts": FRESH_TEXTS, "images": paths}, tmp / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"))
    subprocess.run([sys.executable, "-c", _FRESH, str(folder), str(tmp / "x.pt")], check=True, env=env,
                   cwd=tmp, timeout=300)
    out = torch.load(tmp / "x.pt.out")

    assert out["loaded"] == []
    assert all(c.startswith("transformers_modules.") for c in out["classes"]), out["classes"]
    # the tokenizer: megatron_m2.data's ids (left truncation), mask, padding to the longest, decoding
    glm = GLMTokenizer(str(GLM_MODEL), 16)
    ids, padding = glm(FRESH_TEXTS)
    assert torch.equal(out["max_length"]["input_ids"], ids)
    assert torch.equal(out["max_length"]["attention_mask"].bool(), ~padding)
    longest = out["longest"]["input_ids"].shape[1]
    assert longest < 16 or (~padding).sum(1).max() == 16
    assert torch.equal(out["longest"]["input_ids"], ids[:, :longest])
    # transformers' skip_special_tokens drops [MASK] too, GLMTokenizer.decode only [CLS] and <|endoftext|>
    assert out["decode"] == [glm.decode(row.tolist()).replace("[MASK]", "") for row in ids]
    assert out["decode_one"] == out["decode"][0]
    # the image processor: the evaluator's transform of the saved preprocessing (squash), within 1e-6
    config = m2_config_from_hf(M2EncoderConfig.from_pretrained(folder))
    evaluator = model_eval_transform(config)
    pixels = torch.stack([evaluator(Image.open(p)) for p in paths])
    assert (out["pixel_values"] - pixels).abs().max().item() <= 1e-6
    # processor -> model(**inputs), as CLIP's: the official math on the same inputs
    ref_image, ref_text = _reference_embeddings(sd, pixels, ids, (~padding).long())
    for padding_mode in ("max_length", True):
        assert out[f"keys_{padding_mode}"] == ["attention_mask", "input_ids", "pixel_values"]
        result = out[f"model_{padding_mode}"]
        torch.testing.assert_close(result["image_embeds"], ref_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["text_embeds"], ref_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(result["logits_per_image"],
                                   math.exp(OFFICIAL_LOGIT_SCALE) * ref_image @ ref_text.t(), atol=1e-4, rtol=1e-5)


# ---- processor -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("sp")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(["a cat on a mat", "two dogs in the park", "猫在垫子上", "hello world"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / "sp"), vocab_size=60, hard_vocab_limit=False,
                                   user_defined_symbols=["<|endoftext|>", "[CLS]"] + [f"<|blank_{n}|>" for n in range(2, 11)],
                                   minloglevel=2)
    return tmp / "sp.model"


def test_tokenizer_rules(tiny_sp):
    from megatron_m2.hf.tokenization_m2 import M2Tokenizer

    tok = M2Tokenizer(str(tiny_sp), model_max_length=8)
    cls, eos = tok.sp.piece_to_id("[CLS]"), tok.sp.piece_to_id("<|endoftext|>")
    assert (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id) == (cls, eos, eos)
    assert tok.unk_token is None and tok.mask_token is None  # not pieces of this model: not added to its vocab
    assert len(tok) == tok.sp.get_piece_size()
    pieces = tok.sp.encode("two dogs in the park a cat on a mat")
    assert len(pieces) > 6
    ids = tok("two dogs in the park a cat on a mat", truncation=True)["input_ids"]
    assert ids == [cls, *pieces[-6:], eos]  # truncated from the left, [CLS] and <|endoftext|> kept
    assert tok.sp.piece_to_id("<|blank_3|>") in tok("a   cat")["input_ids"]
    # special tokens eat the whitespace on both sides
    assert tok("a cat  [CLS]  mat")["input_ids"] == [cls, *tok.sp.encode("a cat"), cls, *tok.sp.encode("mat"), eos]
    batch = tok(["a cat", "two dogs in the park a cat on a mat"], padding="max_length", truncation=True,
                return_tensors="pt")
    n = len(tok("a cat")["input_ids"])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, n:].eq(eos).all() and batch["attention_mask"][0].sum() == n
    assert batch["attention_mask"][1].all()
    assert tok.decode(tok("a cat  on a mat")["input_ids"], skip_special_tokens=True) == "a cat  on a mat"


def test_tokenizer_save_and_reload(tiny_sp, tmp_path):
    from megatron_m2.hf.tokenization_m2 import M2Tokenizer

    tok = M2Tokenizer(str(tiny_sp), model_max_length=8)
    tok.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_m2.M2Tokenizer"
    assert (config["truncation_side"], config["model_max_length"]) == ("left", 8)
    again = M2Tokenizer.from_pretrained(str(tmp_path))
    text = ["two dogs in the park a cat on a mat", "猫在垫子上"]
    assert again(text, padding="max_length", truncation=True)["input_ids"] == \
        tok(text, padding="max_length", truncation=True)["input_ids"]


GLM_HARD_TEXTS = ["一只猫坐在垫子上", "A photo of  a dog", "   leading spaces and a long tail " * 6, "混合 mixed text",
                  "a [CLS] inside  <|endoftext|>  and [MASK]", " " * 14 + "x", "", "“Quoted” [UNK] tail  ",
                  "tabs\tand\nnewlines", "全角：（括号）、标点。", "emoji 😀 and ñ"]


@needs_glm
@pytest.mark.parametrize("max_length", [52, 12])
def test_tokenizer_matches_glm_tokenizer(max_length):
    glm = pytest.importorskip("megatron_m2.data.tokenizer")
    from megatron_m2.hf.tokenization_m2 import M2Tokenizer

    ours = M2Tokenizer(str(GLM_MODEL), model_max_length=max_length)
    assert (ours.cls_token_id, ours.eos_token_id, ours.pad_token_id) == (50002, 50000, 50000)
    theirs = glm.GLMTokenizer(str(GLM_MODEL), max_length)
    ids, padding = theirs(GLM_HARD_TEXTS)
    batch = ours(GLM_HARD_TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["attention_mask"].bool(), ~padding)
    longest = ours(GLM_HARD_TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(longest["input_ids"], ids[:, :longest["input_ids"].shape[1]])
    for text, row in zip(GLM_HARD_TEXTS, ids):
        assert ours(text, truncation=True)["input_ids"] == list(theirs.encode(text))
        if not any(t in text for t in ("[MASK]", "[UNK]")):  # transformers skips every special token, GLM 2 of them
            assert ours.decode(row.tolist(), skip_special_tokens=True) == theirs.decode(row.tolist())


def _random_image(width: int, height: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["squash", "crop"])
def test_image_processor_matches_the_evaluator(mode):
    """The exported image processor = data.transforms.EvalTransform of the same mode, within 1e-6, on non-square
    images with odd crop margins (where a floor instead of torchvision's rounding would shift the crop)."""
    from megatron_m2.data.transforms import eval_transform
    from megatron_m2.hf.image_processing_m2 import M2ImageProcessor

    processor = M2ImageProcessor.for_model(16, mode)
    evaluator = eval_transform(16, square=mode == "squash")
    for seed, (w, h) in enumerate(((128, 80), (80, 128), (45, 101), (101, 45), (16, 16), (17, 16), (33, 20))):
        image = _random_image(w, h, seed)
        got = processor(image, return_tensors="pt")["pixel_values"]
        assert got.shape == (1, 3, 16, 16)
        assert (got[0] - evaluator(image)).abs().max().item() <= 1e-6, (mode, w, h)
    batch = processor([_random_image(40, 20), _random_image(20, 40)])["pixel_values"]
    assert isinstance(batch, list) and batch[0].shape == (3, 16, 16)  # CLIP's layout without return_tensors


def test_image_processor_config_round_trip(tmp_path):
    from megatron_m2.hf.image_processing_m2 import M2ImageProcessor

    M2ImageProcessor.for_model(16, "crop").save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_m2.M2ImageProcessor"}
    assert (config["size"], config["do_center_crop"], config["crop_size"], config["resample"]) == (
        {"shortest_edge": 16}, True, {"height": 16, "width": 16}, 3)  # CLIPImageProcessor's keys
    again = M2ImageProcessor.from_pretrained(str(tmp_path))
    image = _random_image(45, 101)
    assert np.array_equal(again(image)["pixel_values"][0], M2ImageProcessor.for_model(16, "crop")(image)[
        "pixel_values"][0])
    with pytest.raises(ValueError, match="unknown arguments"):
        again(image, do_crop=True)
