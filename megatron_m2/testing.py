"""Run a function on N CPU processes (gloo) and collect what each rank returns.

Starting a process costs seconds (torch + megatron-core imports), so a `WorkerPool` starts its processes once and
runs many functions in them; tests and benchmarks share it. Its processes are forked from multiprocessing's fork
server, which imports those modules once: a pool of 8 starts in 4 s instead of 17 s on 2 cores, later pools in a
fraction of a second. A failing or hung function brings the whole pool down (the next call starts a fresh one), so
one broken test cannot poison the next.

`run_command` / `run_trainer` run a command line (`megatron_m2.train.main`, ...) on such a pool, for tests about what
a run computes (losses, resume, resharding); tests about what a process does (signals, kill -9, exit codes,
torchrun, Slurm) launch real processes.
"""
from __future__ import annotations

import gc
import importlib
import io
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable, Sequence

_STARTUP_TIMEOUT_S = 300
# imported once by the fork server the workers are forked from (they import everything a test or a command needs)
_PRELOAD = ["megatron_m2.training.loop", "megatron_m2.eval.runner"]


@contextmanager
def forking_allowed():
    """Let a pool worker start child processes (the checkpoint writer forks): multiprocessing forbids a daemonic
    process, which every pool worker is, to have children."""
    process = mp.current_process()
    daemon, process.daemon = process.daemon, False
    try:
        yield
    finally:
        process.daemon = daemon


class RemoteError(AssertionError):
    """A function failed on one of the worker ranks; carries that rank's traceback."""


def _worker_main(rank: int, world_size: int, port: int, conn, num_threads: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # a child of the fork server inherits its start method; a process torchrun starts has the platform's default
    # (fork on Linux), which the data loader's workers and the checkpoint writer are made for
    mp.set_start_method(mp.get_all_start_methods()[0], force=True)
    import torch

    torch.set_num_threads(num_threads)
    from megatron_m2 import parallel

    parallel.initialize_distributed(timeout_minutes=5)
    # the modules' objects live as long as the worker: out of the collector's sight, the full collection that frees
    # each layout's process groups (parallel.destroy_model_parallel) takes milliseconds instead of a second
    gc.freeze()
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        module_name, qualname, args, kwargs = message
        try:
            fn: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - everything goes back to the caller
            conn.send(("error", traceback.format_exc()))
        finally:
            parallel.destroy_model_parallel()


class WorkerPool:
    """`world_size` long-lived CPU processes joined in one gloo process group."""

    def __init__(self, world_size: int, num_threads: int = 1):
        self.world_size = world_size
        # forkserver, not fork: the fork server has imported torch but run nothing (no OpenMP threads, no process
        # group), which a fork of this process (pytest's) could not promise
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(rank, world_size, port, child, num_threads), daemon=True
            )
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for rank in range(world_size):
            self._receive(rank, _STARTUP_TIMEOUT_S)

    def _receive(self, rank: int, timeout_s: float):
        conn, proc = self._conns[rank], self._procs[rank]
        deadline = time.monotonic() + timeout_s
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise RemoteError(f"rank {rank} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} gave no answer in {timeout_s:.0f} s")
        return conn.recv()

    def run(self, fn: Callable, *args, timeout_s: float = 600, **kwargs) -> list:
        """Call `fn(*args, **kwargs)` on every rank; return the per-rank results, rank order."""
        if not self.alive:
            raise RuntimeError("this pool was shut down after an earlier failure")
        message = (fn.__module__, fn.__qualname__, args, kwargs)
        for conn in self._conns:
            conn.send(message)
        results, errors = [None] * self.world_size, {}
        try:
            for rank in range(self.world_size):
                # once a rank failed, the others may be stuck in a collective: wait briefly, then give up
                status, value = self._receive(rank, 20 if errors else timeout_s)
                if status == "ok":
                    results[rank] = value
                else:
                    errors[rank] = value
        except (TimeoutError, RemoteError) as exc:
            self.shutdown()
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
            raise RemoteError(f"{fn.__qualname__} on {self.world_size} ranks: {exc}{detail}") from None
        if errors:
            self.shutdown()
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
            raise RemoteError(f"{fn.__qualname__} failed on ranks {sorted(errors)}:{detail}")
        return results

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def shutdown(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            try:
                if proc.is_alive():
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []


_POOLS: dict[int, WorkerPool] = {}


def run_distributed(world_size: int, fn: Callable, *args, **kwargs) -> list:
    """Run `fn` on a shared pool of `world_size` ranks (started on first use, restarted after a failure).

    `fn` must be a module-level function, importable by its module name from the workers.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        from megatron_m2.data.loader import cores_per_local_rank

        # the cores shared by the ranks, as torchrun's processes share them (one each when oversubscribed)
        threads = max(1, cores_per_local_rank(local_world_size=world_size))
        pool = _POOLS[world_size] = WorkerPool(world_size, num_threads=threads)
    return pool.run(fn, *args, **kwargs)


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown()
    _POOLS.clear()


@dataclass
class CommandRun:
    """What the command under torchrun would have printed: every rank's output, in rank order."""
    returncode: int
    stdout: str
    stderr: str


def run_command(world_size: int, module: str, argv: Sequence[str], timeout_s: float = 600) -> CommandRun:
    """`torchrun --nproc-per-node=WORLD_SIZE -m MODULE ARGV` for a command whose module has `main(argv) -> int`
    (megatron_m2.train, megatron_m2.eval), run on the shared pool of that size.

    The same code from the command line on, without a fresh process's seconds of imports per rank, which made up
    most of the suite's time. What stays of a worker between runs is reset here (torch's thread count, the SIGTERM
    handler) or by the command itself (the layout, megatron-core's micro-batch calculator, the seeds), so a run gives
    the numbers a fresh process gives (tests/test_training.py resumes real torchrun runs onto pooled ones). An
    exception other than the command's own error exit fails the call with the rank's traceback and output.
    """
    results = run_distributed(world_size, _run_main_on_this_rank, module, list(argv), timeout_s=timeout_s)
    return CommandRun(max(code for code, _, _ in results), "".join(out for _, out, _ in results),
                      "".join(err for _, _, err in results))


def run_trainer(world_size: int, argv: Sequence[str], timeout_s: float = 600) -> CommandRun:
    """`torchrun --nproc-per-node=WORLD_SIZE -m megatron_m2.train ARGV` on the pool (see `run_command`)."""
    return run_command(world_size, "megatron_m2.train", argv, timeout_s)


def _run_main_on_this_rank(module: str, argv: list[str]) -> tuple[int, str, str]:
    import torch

    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    threads, sigterm = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:
        # forking_allowed: data workers and the async checkpoint writer are children of this (daemonic) worker
        with forking_allowed(), redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's --help and errors; sys.exit() is 0, sys.exit("message") 1
                code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        raise RuntimeError(f"{module} raised {exc!r}; its output:\n{out.getvalue()[-3000:]}\n"
                           f"{err.getvalue()[-3000:]}") from exc
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()
