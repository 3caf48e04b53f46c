"""Which checkpoint a resume picks: only complete ones, whatever a crash left behind; how checkpoints are written."""
import pytest
import torch

from megatron_m2 import checkpointing as ckpt


def _complete(root, iteration):
    path = ckpt.checkpoint_dir(str(root), iteration)
    path.mkdir(parents=True)
    (path / ckpt.DONE).write_text(str(iteration))


def test_no_checkpoint(tmp_path):
    assert ckpt.latest_iteration(None) is None
    assert ckpt.latest_iteration(str(tmp_path / "missing")) is None
    assert ckpt.latest_iteration(str(tmp_path)) is None


def test_tracker_points_to_latest_complete(tmp_path):
    _complete(tmp_path, 100)
    _complete(tmp_path, 200)
    (tmp_path / ckpt.TRACKER).write_text("200")
    assert ckpt.latest_iteration(str(tmp_path)) == 200


def test_interrupted_save_is_ignored(tmp_path):
    _complete(tmp_path, 100)
    (tmp_path / ckpt.TRACKER).write_text("100")
    # a crash mid-save leaves a .tmp directory without the completion marker
    (tmp_path / "iter_0000200.tmp").mkdir()
    assert ckpt.latest_iteration(str(tmp_path)) == 100


def test_stale_or_missing_tracker_falls_back_to_scan(tmp_path):
    _complete(tmp_path, 100)
    _complete(tmp_path, 300)
    (ckpt.checkpoint_dir(str(tmp_path), 400)).mkdir()  # renamed but no marker: not complete
    (tmp_path / ckpt.TRACKER).write_text("400")
    assert ckpt.latest_iteration(str(tmp_path)) == 300
    (tmp_path / ckpt.TRACKER).unlink()
    assert ckpt.latest_iteration(str(tmp_path)) == 300


# -- megatron_m2/checkpoint_layout.py owns the layout: publish, atomic tracker, no copies elsewhere -------------------

def test_publish_renames_marks_and_tracks(tmp_path):
    from megatron_m2 import checkpoint_layout as layout

    staged = layout.staging_dir(tmp_path, 7)
    staged.mkdir()
    (staged / "common.pt").write_text("x")
    assert layout.latest_iteration(tmp_path) is None  # staged is not a checkpoint
    final = layout.publish(tmp_path, 7)
    assert final == tmp_path / "iter_0000007" and (final / "common.pt").exists() and layout.is_complete(final)
    assert not staged.exists()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000007", "latest_checkpointed_iteration.txt"]
    # re-saving the same step replaces the old directory
    layout.staging_dir(tmp_path, 7).mkdir()
    (layout.staging_dir(tmp_path, 7) / "new").write_text("y")
    final = layout.publish(tmp_path, 7)
    assert (final / "new").exists() and not (final / "common.pt").exists()


def test_tracker_write_is_atomic(tmp_path, monkeypatch):
    # A crash while the tracker is written must leave the old tracker readable, never a truncated file.
    from megatron_m2 import checkpoint_layout as layout

    tracker = tmp_path / layout.TRACKER
    layout.write_text_atomic(tracker, "100")

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(layout.os, "replace", crash)
    try:
        layout.write_text_atomic(tracker, "200")
    except OSError:
        pass
    assert tracker.read_text() == "100"


def test_remove_staging_dirs_keeps_complete_checkpoints(tmp_path):
    from megatron_m2 import checkpoint_layout as layout

    _complete(tmp_path, 100)
    layout.staging_dir(tmp_path, 200).mkdir()
    layout.remove_staging_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000100"]


def test_layout_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, megatron_m2.checkpoint_layout; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_hf_reader_resolves_through_the_layout(tmp_path):
    # the converters find the newest COMPLETE checkpoint as training does (even without a tracker)
    from megatron_m2.hf.megatron_io import resolve_checkpoint_dir

    for iteration in (100, 200):
        _complete(tmp_path, iteration)
        (ckpt.checkpoint_dir(str(tmp_path), iteration) / ".metadata").write_text("")
    ckpt.checkpoint_dir(str(tmp_path), 300).mkdir()  # renamed, no marker
    (tmp_path / ckpt.TRACKER).write_text("300")
    assert resolve_checkpoint_dir(tmp_path) == ckpt.checkpoint_dir(str(tmp_path), 200)


def test_no_other_module_spells_the_layout():
    """The tracker name, done marker and iter_%07d format live in checkpoint_layout.py only (docstrings aside)."""
    import ast
    from pathlib import Path

    from megatron_m2 import checkpoint_layout as layout

    package = Path(layout.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == Path(layout.__file__):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if layout.TRACKER in node.value or layout.DONE in node.value or node.value in ("07d", "iter_"):
                    offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not offenders, offenders


# -- checkpointing.py at scale: fully parallel save, async save, the distributed-optimizer format --------

class _Weights(torch.nn.Module):
    """Two 1 MiB tensors, replicated over the data-parallel ranks like every model weight at TP1 x PP1."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.arange(2**18, dtype=torch.float32))
        self.b = torch.nn.Parameter(-torch.arange(2**18, dtype=torch.float32))

    def sharded_state_dict(self):
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing import ShardedTensor

        replica = parallel_state.get_data_parallel_rank()
        return {k: ShardedTensor.from_rank_offsets(k, v.detach(), replica_id=replica)
                for k, v in (("a", self.a), ("b", self.b))}


def _stub_distributed_optimizer():
    """A DistributedOptimizer (for isinstance) that records the metadata megatron would build its state from."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    class Stub(DistributedOptimizer):
        def __init__(self):  # noqa: D107 - no buffers: the real one needs nccl (CPU cannot build it)
            self.seen, self.loaded = [], None

        def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None, **kwargs):
            self.seen.append((is_loading, metadata))
            return {"stub_state": 1}

        def load_state_dict(self, state_dict):
            self.loaded = state_dict

    return Stub()


def _save_load_at_scale(root: str, async_save: bool):
    from pathlib import Path

    from megatron_m2 import parallel
    from megatron_m2.testing import forking_allowed

    parallel.initialize_model_parallel(1, 1)
    with forking_allowed():
        model, optimizer = _Weights(), _stub_distributed_optimizer()
        path = ckpt.save_checkpoint(root, 5, model, optimizer, None, {"rank": torch.distributed.get_rank()},
                                    async_save=async_save)
        published_before_finalize = ckpt.latest_iteration(root)
        with torch.no_grad():  # training goes on while the writer runs: the checkpoint must keep step 5's values
            model.a.add_(1000.0)
        finalized = ckpt.finalize_async_saves(blocking=True)
    torch.distributed.barrier()
    sizes = {p.name: p.stat().st_size for p in Path(path).glob("*.distcp")}
    fresh, fresh_optimizer = _Weights(), _stub_distributed_optimizer()
    with torch.no_grad():
        fresh.a.zero_(), fresh.b.zero_()
    iteration, rank_state, _ = ckpt.load_checkpoint(root, fresh, fresh_optimizer)
    return dict(published_before_finalize=published_before_finalize, finalized=finalized, iteration=iteration,
                rank_state=rank_state, sizes=sizes, saved_with=optimizer.seen, loaded_with=fresh_optimizer.seen,
                optimizer_state=fresh_optimizer.loaded, a_ok=bool(torch.equal(fresh.a, torch.arange(2**18.0))),
                b_ok=bool(torch.equal(fresh.b, -torch.arange(2**18.0))))


@pytest.mark.parametrize("async_save", [False, True])
def test_save_at_scale(tmp_path, async_save):
    from megatron_m2.testing import run_distributed

    results = run_distributed(2, _save_load_at_scale, str(tmp_path), async_save)
    for rank, r in enumerate(results):
        # async: published only by finalize_async_saves (so a crash before it leaves no loadable partial checkpoint)
        assert r["published_before_finalize"] == (None if async_save else 5)
        assert r["finalized"] == ([5] if async_save else [])
        assert r["iteration"] == 5 and r["rank_state"] == {"rank": rank}
        assert r["a_ok"] and r["b_ok"]  # the values at save time, not the later in-place update
        # the distributed optimizer's format is named, saved with the checkpoint and used again to load it
        named = {"distrib_optim_sharding_type": "dp_reshardable"}
        assert r["saved_with"] == [(False, named)] and r["loaded_with"] == [(True, named)]
        assert r["optimizer_state"] == {"stub_state": 1}
    # fully parallel save: each data-parallel rank wrote one of the two replicated 1 MiB tensors into its own
    # __RANK_THREAD.distcp files (without the wrapper DP rank 0 writes both: __0_0 and __0_1, nothing from rank 1)
    written = {rank: sum(size for name, size in results[0]["sizes"].items() if name.startswith(f"__{rank}_"))
               for rank in range(2)}
    assert all(2**20 < size < 2 * 2**20 for size in written.values()), results[0]["sizes"]


def test_dp_reshardable_optimizer_refuses_a_layout_change():
    from megatron_m2.errors import ConfigError

    named = {"distrib_optim_sharding_type": "dp_reshardable"}
    same = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    ckpt.check_optimizer_resharding("ck", named, same, dict(same))
    ckpt.check_optimizer_resharding("ck", None, same, {**same, "tensor_model_parallel_size": 1})  # older format
    ckpt.check_optimizer_resharding("ck", named, None, same)  # written before the layout was recorded
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size 2 -> 1.*--no-load-optim"):
        ckpt.check_optimizer_resharding("ck", named, same, {**same, "tensor_model_parallel_size": 1})


# -- loading into a mixed-precision optimizer's model ------------------------------------------------------------

def _bf16_training_state(seed: int):
    """The tiny model in bf16 under megatron's DDP and its real mixed-precision optimizer (fp32 master copies).

    megatron-core builds Float16OptimizerWithFloat16Params only for CUDA tensors (a `param.type()` check); every
    other step of it runs on CPU, so the check alone is bypassed while the optimizer is built."""
    from megatron_m2.config import load_config, transformer_overrides
    from megatron_m2.models import build_model
    from megatron_m2.training.arguments import build_parser
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp

    torch.manual_seed(seed)
    model = build_model(load_config("tiny"), spec="local", **transformer_overrides(bf16=True))
    args = build_parser().parse_args(["--bf16", "--weight-decay", "0", "--lr-warmup-iters", "0", "--train-iters", "100"])
    args.lr_decay_iters = args.train_iters
    ddp = wrap_ddp(model, args)
    tensor_type = torch.Tensor.type
    torch.Tensor.type = lambda self, *a, **k: tensor_type(self, *a, **k) if a or k else \
        tensor_type(self).replace("torch.", "torch.cuda.")
    try:
        optimizer, scheduler = build_optimizer(ddp, args)
    finally:
        torch.Tensor.type = tensor_type
    return model, optimizer, scheduler


def _weights_after_loading_into_bf16_optimizer(root: str, how: str):
    """Save model A, load it into a fresh model B whose optimizer exists already (as in the trainer), take one
    optimizer step that changes nothing (zero gradients, no weight decay): B must still hold A's weights."""
    from megatron_m2 import parallel

    parallel.initialize_model_parallel(1, 1)
    model, optimizer, scheduler = _bf16_training_state(seed=0)
    optimizer.step()  # zero gradients: the weights stay, Adam's state exists (as in any checkpoint of a run)
    saved = {name: param.detach().clone() for name, param in model.named_parameters()}
    common = {"converted_from_hf": True} if how == "model-only checkpoint" else None
    from megatron_m2.testing import forking_allowed

    with forking_allowed():
        ckpt.save_checkpoint(root, 1, model, None if common else optimizer, None if common else scheduler, {},
                             common=common)
    model, optimizer, scheduler = _bf16_training_state(seed=1)
    ckpt.load_checkpoint(root, model, optimizer, scheduler, load_optimizer_state=how != "--no-load-optim")
    optimizer.step()
    return {name: bool(torch.equal(param, saved[name])) for name, param in model.named_parameters()}


@pytest.mark.parametrize("how", ["--no-load-optim", "model-only checkpoint", "full resume"])
def test_loaded_weights_survive_the_first_step_of_a_mixed_precision_optimizer(tmp_path, how):
    # bf16 keeps fp32 master copies of the weights in the optimizer, cloned when it is built, i.e. before the trainer
    # loads a checkpoint. Unless the optimizer's own state (with its masters) is loaded too, the load must refresh
    # them (reload_model_params), or the first step writes the initial weights back.
    from megatron_m2.testing import run_distributed

    same = run_distributed(2, _weights_after_loading_into_bf16_optimizer, str(tmp_path), how)
    for rank_result in same:
        assert rank_result and all(rank_result.values()), [n for n, ok in rank_result.items() if not ok]
