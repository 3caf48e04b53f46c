"""The on-disk layout of a checkpoint root, in one place and without torch (the trainer, the converters and the
evaluator all read and write it through here; planning tools can use it without importing torch).

    ROOT/iter_0000100/                        a complete checkpoint: its files plus the done marker
    ROOT/iter_0000100/checkpoint_complete     the done marker, written last into the staging directory
    ROOT/iter_0000200.tmp/                    a save in progress, or one cut short by a crash: never loaded
    ROOT/latest_checkpointed_iteration.txt    the newest complete iteration, replaced atomically after the rename

The names are Megatron-LM's (tracker file, iter_%07d), so its tools find our checkpoints. A checkpoint becomes
visible only by `publish`: marker, then an atomic directory rename, then an atomic tracker update. A crash at any
point leaves either the old state or the new one; `latest_iteration` trusts only directories with the marker.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Union

TRACKER = "latest_checkpointed_iteration.txt"
DONE = "checkpoint_complete"
_STAGING_SUFFIX = ".tmp"

PathLike = Union[str, Path]


def checkpoint_dir(root: PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def staging_dir(root: PathLike, iteration: int) -> Path:
    """Where a save of `iteration` writes before `publish` renames it to checkpoint_dir."""
    return Path(f"{checkpoint_dir(root, iteration)}{_STAGING_SUFFIX}")


def is_complete(path: PathLike) -> bool:
    return (Path(path) / DONE).exists()


def latest_iteration(root: Optional[PathLike]) -> Optional[int]:
    """The newest complete checkpoint under root, or None."""
    if not root or not Path(root).is_dir():
        return None
    tracker = Path(root) / TRACKER
    if tracker.exists():
        iteration = int(tracker.read_text().strip())
        if is_complete(checkpoint_dir(root, iteration)):
            return iteration
    # tracker missing or stale (e.g. crash between rename and tracker update): fall back to a scan
    done = sorted(int(p.name[5:]) for p in Path(root).glob("iter_???????") if is_complete(p))
    return done[-1] if done else None


def remove_staging_dirs(root: PathLike) -> None:
    """Drop the leftovers of saves that never published (only the process that is about to save may call this)."""
    for stale in Path(root).glob(f"iter_*{_STAGING_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Readers see the old content or the new, never a truncated file (rename within one directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(root: PathLike, iteration: int) -> Path:
    """Make the staged save of `iteration` the latest complete checkpoint: done marker, rename, tracker.

    Call once, from one process, after every writer has finished.
    """
    staged, final = staging_dir(root, iteration), checkpoint_dir(root, iteration)
    (staged / DONE).write_text(str(iteration))
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save): the new one wins
        shutil.rmtree(final)
    os.replace(staged, final)
    write_text_atomic(Path(root) / TRACKER, str(iteration))
    return final
