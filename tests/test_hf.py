"""HF model, processor, official-checkpoint importer, AutoModel remote-code loading."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_m2.errors import ConfigError
from megatron_m2.hf.configuration_m2 import M2EncoderConfig
from megatron_m2.hf.export import save_hf_folder
from megatron_m2.hf.modeling_m2 import M2EncoderModel
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

def _official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, out = TINY["hidden_size"], TINY["ffn_hidden_size"], TINY["out_dim"]
    vision_rows = (TINY["image_size"] // TINY["patch_size"]) ** 2 + 1 + 2
    rnd = lambda *shape, scale=0.1: torch.randn(*shape, generator=g) * scale  # noqa: E731
    ln = lambda n: {"weight": 1 + rnd(n), "bias": rnd(n)}  # noqa: E731
    sd = {"backbone.text_embed.weight": rnd(TINY["vocab_size"], h, scale=1.0),
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
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["logit_vl_scale"] = torch.tensor(math.log(1 / 0.05))
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
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        bb_image, bb_text = model.get_backbone_features(pixels, ids, mask)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=0)
    ref_bb = _reference_embeddings(sd, pixels, ids, mask, vl=False)
    torch.testing.assert_close(bb_image, ref_bb[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(bb_text, ref_bb[1], atol=1e-5, rtol=0)
    # logits use the VL scale (official logit_vl_scale pairs with the VL features)
    torch.testing.assert_close(out.logits_per_image, (1 / 0.05) * ref_image @ ref_text.t(), atol=1e-4, rtol=1e-5)


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


_FRESH = r"""
import sys
sys.modules["megatron_m2"] = None  # the folder must not need our package
sys.modules["megatron"] = None
import torch
from transformers import AutoModel
folder, inputs = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
x = torch.load(inputs)
with torch.no_grad():
    torch.save({"image": model.get_image_features(x["pixels"]),
                "text": model.get_text_features(x["ids"], x["mask"]),
                "cls": type(model).__module__}, inputs + ".out")
"""


def test_automodel_remote_code_in_fresh_process(imported, tmp_path):
    sd, folder = imported
    pixels, ids, mask = _inputs(seed=3)
    torch.save({"pixels": pixels, "ids": ids, "mask": mask}, tmp_path / "x.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    subprocess.run([sys.executable, "-c", _FRESH, str(folder), str(tmp_path / "x.pt")], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    out = torch.load(tmp_path / "x.pt.out")
    assert out["cls"].startswith("transformers_modules")
    ref_image, ref_text = _reference_embeddings(sd, pixels, ids, mask)
    torch.testing.assert_close(out["image"], ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["text"], ref_text, atol=1e-5, rtol=0)


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
    from megatron_m2.hf.processing_m2 import M2Tokenizer

    tok = M2Tokenizer(str(tiny_sp), max_length=8)
    cls, eos = tok.sp.piece_to_id("[CLS]"), tok.sp.piece_to_id("<|endoftext|>")
    pieces = tok.sp.encode("two dogs in the park a cat on a mat")
    assert len(pieces) > 6
    ids = tok.encode("two dogs in the park a cat on a mat")
    assert ids == [cls, *pieces[-6:], eos]  # truncated from the left
    assert tok.sp.piece_to_id("<|blank_3|>") in tok.encode("a   cat")
    batch = tok(["a cat", "two dogs in the park a cat on a mat"])
    n = len(tok.encode("a cat"))
    assert batch["input_ids"][0, n:].eq(eos).all() and batch["attention_mask"][0].sum() == n
    assert batch["attention_mask"][1].all()


@needs_glm
def test_tokenizer_matches_glm_tokenizer():
    glm = pytest.importorskip("megatron_m2.data.tokenizer")
    from megatron_m2.hf.processing_m2 import M2Tokenizer

    texts = ["一只猫坐在垫子上", "A photo of  a dog", "   leading spaces and a long tail " * 6, "混合 mixed text",
             "a [CLS] inside  <|endoftext|>  and [MASK]", " " * 14 + "x", ""]
    ours = M2Tokenizer(str(GLM_MODEL), max_length=52)
    assert (ours.cls_id, ours.eos_id) == (50002, 50000)
    theirs = glm.GLMTokenizer(str(GLM_MODEL), 52)
    ids, padding = theirs(texts)
    batch = ours(texts)
    assert torch.equal(batch["input_ids"], torch.as_tensor(ids).long())
    assert torch.equal(batch["attention_mask"].bool(), ~torch.as_tensor(padding).bool())
    for t in texts:
        assert ours.encode(t) == list(theirs.encode(t))


def test_image_processor():
    from PIL import Image

    from megatron_m2.hf.processing_m2 import M2ImageProcessor

    image = Image.new("RGB", (64, 32), (255, 0, 128))
    x = M2ImageProcessor(16)([image, image])["pixel_values"]
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-2, rtol=0)
