"""The life of the loader's worker processes: how they start, which signals end them, how they are stopped.

- A worker ends with its trainer: on Linux the kernel kills it when the training process dies (PR_SET_PDEATHSIG,
  even after kill -9); the loader's shutdown and interpreter exit end it with SIGTERM from the trainer (torch's).
- A SIGTERM from anyone else is ignored. Slurm signals every process of a job step on preemption or at the time
  limit; a worker that died of it made the trainer raise ("DataLoader worker ... killed by signal") instead of
  saving. torch's own worker handler does the opposite (it exits on SIGTERM from the parent, and dies of any other).
  The worker blocks SIGTERM in every thread and one thread takes each with sigwaitinfo, which tells the sender.
  SIGTERM is blocked in the trainer's thread while it forks the workers, so one arriving before a worker has set
  this up stays pending instead of killing it; the trainer's own handler gets its copy when it unblocks.
- A hung worker (a stuck file system, a pathological image) ends in `DataTimeoutError` after --dataloader-timeout
  seconds, and `stop` kills what torch's shutdown could not end, so the trainer can exit (multiprocessing joins its
  children at interpreter exit) and torchrun tear the job down.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

_SIGTERM = {signal.SIGTERM}


class DataTimeoutError(RuntimeError):
    """No micro-batch from the data workers within --dataloader-timeout."""


def worker_init(parent: int, worker_id: int) -> None:
    """DataLoader worker_init_fn (with functools.partial(worker_init, os.getpid())); see the module docstring."""
    # already blocked when forked inside `starting`; blocked here for other start methods
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM)
    try:
        import ctypes

        # The death signal follows the thread that forked the workers: the one calling next(), the training thread.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: torch's workers notice a dead parent within 5 s
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_take_sigterm, args=(parent,), name="sigterm-from-trainer-only", daemon=True).start()


def _take_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo(_SIGTERM).si_pid == parent:
            os._exit(0)  # the trainer's shutdown, as torch's handler does


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """Around the creation of the DataLoader iterator (which forks the workers): SIGTERM blocked in this thread."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def next_batch(iterator, timeout: float):
    """next(iterator), with torch's timeout error made a DataTimeoutError that names the flag."""
    try:
        return next(iterator)
    except RuntimeError as error:
        if timeout and str(error).startswith("DataLoader timed out"):
            raise DataTimeoutError(
                f"no micro-batch from a data worker in {timeout:g} s (--dataloader-timeout): a worker is hung "
                "(decoding an image, reading a file system?) or far too slow; raise --dataloader-timeout if it is "
                "only slow") from None
        raise


def stop(iterator, hung: bool = False) -> None:
    """Stop the iterator's workers now (rather than whenever it is collected); kill the ones torch's shutdown left
    alive (a worker hung while holding the interpreter lock cannot take its SIGTERM).

    hung: the iterator timed out (DataTimeoutError), so a worker is stuck: kill them all first. torch's shutdown
    would wait 5 s (its status-check interval) for each one that does not end, before the caller can go on or
    exit; the iterator is thrown away anyway (a later next() starts new workers)."""
    if not hasattr(iterator, "_shutdown_workers"):
        return
    workers = list(getattr(iterator, "_workers", []))
    if hung:
        if getattr(iterator, "_worker_pids_set", False):
            # out of torch's SIGCHLD watch first, which would raise "worker killed by signal" over the timeout error
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    iterator._shutdown_workers()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
