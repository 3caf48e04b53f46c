"""Exporting a bf16 checkpoint writes its fp32 master weights (tools/convert_to_hf.py --from-master-weights).

The CPU trainer refuses --bf16 (megatron-core's Float16OptimizerWithFloat16Params accepts only CUDA tensors), so the
test checkpoint is written as that optimizer saves one: the model's ShardedTensors in bf16 under "model", and under
"optimizer" its `fp32_from_fp16_params`, each built by megatron-core's own make_sharded_optimizer_tensor(model
tensor, fp32 copy, prefix="optimizer.state.fp32_param") as Float16OptimizerWithFloat16Params.sharded_state_dict does,
beside Adam moments keyed the same way (optimizer.state.exp_avg.*). The fp32 copies are a float32 model's weights;
that model is also saved by the trainer's save_checkpoint, and its export is what the bf16 checkpoint's must equal.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_m2 import parallel
from megatron_m2.config import load_config

pytestmark = pytest.mark.slow  # five checkpoints written, eight exports (~35 s on 2 idle cores)
ROOT = Path(__file__).resolve().parent.parent
QKV = "vision_encoder.layers.self_attention.linear_qkv.weight"


def _convert_to_hf():
    spec = importlib.util.spec_from_file_location("convert_to_hf", ROOT / "tools" / "convert_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(state: dict, root: Path, iteration: int = 1) -> None:
    from megatron.core import dist_checkpointing

    from megatron_m2.checkpoint_layout import publish, staging_dir

    tmp = staging_dir(root, iteration)
    tmp.mkdir(parents=True)
    dist_checkpointing.save(state, str(tmp))
    publish(root, iteration)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """fp32/: the float32 model (the trainer's save); bf16/: the same as a bf16 run with fp32 master weights;
    bf16_frozen/: one tensor without a master copy (a frozen one); bf16_bare/: no optimizer state;
    bf16_bucketed/: master weights only in the distributed optimizer's flat buckets."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    from megatron_m2.checkpointing import save_checkpoint
    from megatron_m2.hf.key_mapping import is_megatron_model_key
    from megatron_m2.models import build_model

    base = tmp_path_factory.mktemp("master_weights")
    config = load_config("tiny")
    parallel.initialize_model_parallel(1, 1)
    torch.manual_seed(5)
    model = build_model(config, spec="local")
    with torch.no_grad():  # values bf16 cannot hold: the rounding shows in every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 + 1e-3)
    common = {"model_config": config.to_dict()}
    save_checkpoint(str(base / "fp32"), 1, model, None, None, {}, common=common)

    def bf16_state(masters_of=lambda key: True, bucketed=False) -> dict:
        model_state, masters, moments = {}, [], {}
        for name, st in model.sharded_state_dict().items():
            if isinstance(st, ShardedTensor) and is_megatron_model_key(st.key):
                fp32 = st.data.detach().clone()
                if masters_of(st.key):
                    masters.append(make_sharded_optimizer_tensor(st, fp32, prefix="optimizer.state.fp32_param"))
                    moments[name] = {"exp_avg": make_sharded_optimizer_tensor(st, torch.zeros_like(fp32),
                                                                              prefix="optimizer.state.exp_avg")}
                st = dataclasses.replace(st, data=fp32.to(torch.bfloat16), dtype=torch.bfloat16)
            model_state[name] = st
        state = {"model": model_state, "iteration": 1, **common}
        if bucketed:
            state["optimizer"] = {"param_state": {"param": ShardedTensor.from_rank_offsets(
                "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.float32)"
                ".bucket_idx_0.param", torch.zeros(1000))}}
        elif masters:
            state["optimizer"] = {"fp32_from_fp16_params": [masters], "optimizer": {"state": moments}}
        return state

    _write(bf16_state(), base / "bf16")
    _write(bf16_state(lambda key: key != QKV), base / "bf16_frozen")
    _write(bf16_state(lambda key: False), base / "bf16_bare")
    _write(bf16_state(lambda key: False, bucketed=True), base / "bf16_bucketed")
    parallel.destroy_model_parallel()
    return base


def _export(checkpoints: Path, name: str, tmp_path: Path, capsys, *flags: str) -> tuple[int, dict, str]:
    from safetensors.torch import load_file

    out = tmp_path / name
    code = _convert_to_hf().main(["--load", str(checkpoints / name), "--hf-output", str(out), "--no-progress",
                                  *flags])
    captured = capsys.readouterr()
    tensors = load_file(str(out / "model.safetensors")) if code == 0 else {}
    return code, tensors, captured.out + captured.err


def test_bf16_export_writes_the_fp32_master_weights(checkpoints, tmp_path, capsys):
    code, reference, said = _export(checkpoints, "fp32", tmp_path, capsys)
    assert code == 0 and "float32 model weights (a float32 run: they are the master weights)" in said
    code, masters, said = _export(checkpoints, "bf16", tmp_path, capsys)
    assert code == 0 and "fp32 master weights from the optimizer state of this bfloat16 checkpoint" in said
    assert sorted(masters) == sorted(reference)
    for key, tensor in reference.items():
        assert masters[key].dtype == torch.float32 and torch.equal(masters[key], tensor), key
    code, rounded, said = _export(checkpoints, "bf16", tmp_path, capsys, "--no-from-master-weights")
    assert code == 0 and "bfloat16 model weights (--no-from-master-weights)" in said
    for key, tensor in reference.items():
        if tensor.is_floating_point():
            assert rounded[key].dtype == torch.bfloat16 and torch.equal(rounded[key], tensor.to(torch.bfloat16))
    assert any(not torch.equal(rounded[k].float(), reference[k]) for k in reference)


def test_tensors_without_a_master_copy_keep_their_weights(checkpoints, tmp_path, capsys):
    code, reference, _ = _export(checkpoints, "fp32", tmp_path, capsys)
    code, tensors, said = _export(checkpoints, "bf16_frozen", tmp_path, capsys)
    assert code == 0 and f"1 tensor(s) have no master copy (not trained, e.g. --freeze-vision) and keep their " \
                         f"bfloat16 weights: {QKV}" in said
    qkv = [k for k in reference if k.startswith("vision_encoder.layers.0.attn.") and k.endswith("_proj.weight")
           and "out_proj" not in k]
    assert qkv and all(tensors[k].dtype == torch.bfloat16 for k in qkv)
    assert all(torch.equal(tensors[k], reference[k]) for k in reference if k.startswith("text_encoder."))


@pytest.mark.parametrize("name, note", [
    ("bf16_bare", "it holds no fp32 master weights"),
    ("bf16_bucketed", "distributed optimizer's bucket buffers (dp_reshardable)"),
])
def test_without_readable_master_weights_the_export_says_why(checkpoints, tmp_path, capsys, name, note):
    code, tensors, said = _export(checkpoints, name, tmp_path, capsys)
    assert code == 0 and "the checkpoint's bfloat16 model weights: " in said and note in said
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    code, _, said = _export(checkpoints, name, tmp_path, capsys, "--from-master-weights")
    assert code == 2 and "--from-master-weights" in said and note in said
