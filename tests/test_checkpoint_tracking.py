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
