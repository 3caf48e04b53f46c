"""Which checkpoint a resume picks: only complete ones, whatever a crash left behind."""
from megatron_m2.training import checkpointing as ckpt


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
