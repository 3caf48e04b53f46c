"""Distributed init and parallel groups: TP / PP / DP from megatron-core, plus the ITC sub-groups.

One process per device. On a GPU the backend is nccl; on a CPU-only machine it is gloo and megatron-core is made to
run by `_make_megatron_cpu_safe` (the only monkeypatching in this project).
"""
from __future__ import annotations

import gc
import logging
import os
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_m2.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """The parallel layout of one process."""

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    itc_group_size: int

    @property
    def num_itc_groups(self) -> int:
        return self.data_parallel_size // self.itc_group_size


def validate_layout(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    itc_group_size: Optional[int] = None,
) -> Layout:
    """Check a layout without touching any process group; every error names the flag to change."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1:
        raise ConfigError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if pp < 1:
        raise ConfigError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) = {tp * pp}; change one of them or the number of processes"
        )
    dp = world_size // (tp * pp)
    group = dp if itc_group_size in (None, 0) else itc_group_size
    if group < 1 or dp % group != 0:
        divisors = [d for d in range(1, dp + 1) if dp % d == 0]
        raise ConfigError(
            f"--itc-group-size {itc_group_size} must divide the data-parallel size {dp} "
            f"(= world {world_size} / (TP {tp} x PP {pp})); valid values: {divisors}"
        )
    return Layout(world_size, tp, pp, dp, group)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize_distributed(timeout_minutes: int = 30) -> None:
    """Create the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    A single process without torchrun gets a world of one, so tools and the demo need no launcher.
    """
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _make_megatron_cpu_safe()
    timeout = timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=default_backend(), timeout=timeout)
        return
    # No launcher: a world of one on an in-process store. Neither a port nor os.environ is touched, so a
    # process that does this (a tool, a test session) never hands a held MASTER_PORT to the children it starts.
    dist.init_process_group(
        backend=default_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
    )


_ITC_GROUP = None
_ITC_GROUP_RANKS: Optional[list[int]] = None
_LAYOUT: Optional[Layout] = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    itc_group_size: Optional[int] = None,
    seed: int = 1234,
    distributed_timeout_minutes: int = 30,
) -> Layout:
    """Build megatron-core's TP/PP/DP groups and the ITC sub-groups; replaces any earlier layout.

    megatron-core's rank order is tp-cp-ep-dp-pp: TP ranks are adjacent (same node), then DP, then PP.
    The ITC sub-groups split each DP group into contiguous runs of `itc_group_size` DP ranks.
    distributed_timeout_minutes: the timeout of the default process group (if this call creates it) and of every
    group created here (--distributed-timeout-minutes; 30 is torch's and megatron-core's default).
    """
    global _ITC_GROUP, _ITC_GROUP_RANKS, _LAYOUT
    from megatron.core import parallel_state, tensor_parallel

    initialize_distributed(timeout_minutes=distributed_timeout_minutes)
    layout = validate_layout(
        dist.get_world_size(), tensor_model_parallel_size, pipeline_model_parallel_size, itc_group_size
    )
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        distributed_timeout_minutes=distributed_timeout_minutes,
    )
    # Every rank must create every sub-group in the same order, so enumerate all DP groups first.
    own_dp_ranks = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    all_dp_groups: list[list[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(all_dp_groups, own_dp_ranks)
    for dp_ranks in sorted({tuple(r) for r in all_dp_groups}):
        for start in range(0, len(dp_ranks), layout.itc_group_size):
            ranks = list(dp_ranks[start : start + layout.itc_group_size])
            group = dist.new_group(ranks, timeout=timedelta(minutes=distributed_timeout_minutes))
            if dist.get_rank() in ranks:
                _ITC_GROUP, _ITC_GROUP_RANKS = group, ranks
    _LAYOUT = layout
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # the drop-path masks' own state: the same seed on every rank, so TP peers draw the same per-sample masks even
    # inside megatron's sequence-parallel fork of the (per-TP-rank) model-parallel state (models/drop_path.py)
    from megatron_m2.models.drop_path import DROP_PATH_RNG, DROP_PATH_SEED_OFFSET

    tensor_parallel.get_cuda_rng_tracker().add(DROP_PATH_RNG, seed + DROP_PATH_SEED_OFFSET)
    # and the masked streams' own generators (CMLM / CMIM: models/m2_model.py, megatron_m2/random_state.py)
    from megatron_m2.random_state import MASKED_STREAMS_SEED_OFFSET, seed_masked_streams

    seed_masked_streams(seed + MASKED_STREAMS_SEED_OFFSET)
    return layout


def destroy_model_parallel() -> None:
    """Forget the layout and free every process group but the default one.

    megatron-core's own destroy only drops its references (and destroys its *_GLOO groups); the TP/PP/DP groups and
    ours stay registered in torch.distributed, and each gloo group keeps ~3 threads per process. A process that
    re-initialises layouts (tests, tools, evaluation) would pile up thousands of them, which starved 2-core machines.
    Call it after dropping the models built on the layout: their process groups are freed with them.
    """
    global _ITC_GROUP, _ITC_GROUP_RANKS, _LAYOUT
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _ITC_GROUP = _ITC_GROUP_RANKS = _LAYOUT = None
    if dist.is_initialized():
        # torch has no public list of process groups; `_world.pg_map` is where destroy_process_group looks them up
        world = dist.distributed_c10d._world
        groups = [g for g in world.pg_map if g is not dist.GroupMember.WORLD]
        for group in groups:
            dist.destroy_process_group(group)
        # a destroyed group's threads end only when its last reference goes, and models, DDP wrappers and optimizers
        # hold theirs in reference cycles: without a collection a worker that ran a few dozen layouts kept ~400
        # groups' threads alive (1,200 threads per process, load average 170 on 2 cores)
        if groups:
            gc.collect()


@contextmanager
def command_process_groups() -> Iterator[None]:
    """The process groups of one command (the trainer, the evaluator): when it ends normally, every group it made is
    destroyed, the default one too if it was made here (not in a process that made it before: the tests' workers).

    torch asks for this at the end of main(). Without it, gloo's worker threads can still hold finished work when the
    interpreter shuts down and abort the process (SIGABRT, "terminate called without an active exception",
    pytorch#190489) after a run that succeeded, which torchrun and Slurm report as a failed job; seen once in CI at
    TP 2 with --sequence-parallel. After an error nothing is destroyed: the peers may be inside a collective, and
    destroying would wait for them.
    """
    created = not dist.is_initialized()
    yield
    destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    """The rank that logs training metrics: the last one, which is on the last pipeline stage and holds the loss."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def get_layout() -> Layout:
    if _LAYOUT is None:
        raise RuntimeError("call megatron_m2.parallel.initialize_model_parallel() first")
    return _LAYOUT


def get_itc_group() -> dist.ProcessGroup:
    """The sub-group of data-parallel ranks whose features the contrastive loss aggregates."""
    if _ITC_GROUP is None:
        raise RuntimeError("call megatron_m2.parallel.initialize_model_parallel() first")
    return _ITC_GROUP


def get_itc_group_ranks() -> list[int]:
    get_itc_group()
    return list(_ITC_GROUP_RANKS)  # type: ignore[arg-type]


_CPU_PATCHED = False


def _make_megatron_cpu_safe() -> None:
    """Let megatron-core's CUDA-only code paths run on CPU with gloo; a no-op where CUDA exists.

    Why each patch: p2p communication, DDP buffers (param_and_grad_buffer), GlobalMemoryBuffer (megatron `utils`)
    and the dist-checkpoint savers (state_dict_saver's failure check, filesystem_async's preload, the fully parallel
    wrapper, the async caller's all-reduce), the tensor-parallel mappings and linear layers (sequence parallelism's
    gathers and reduce-scatters) and megatron's Timers allocate on `torch.cuda.current_device()` or call
    `torch.cuda.synchronize()`; the pipeline schedules, the optimizer and grad clipping allocate `device="cuda"`
    scalars; the RNG tracker (used by DotProductAttention and model_parallel_cuda_manual_seed) reads and writes CUDA
    generator states; grad clipping asserts grads are `torch.cuda.FloatTensor`; the local multi-tensor l2 norm
    returns a CUDA tensor. We map the device to CPU and the tracked generator to the CPU one by replacing the `torch`
    name of those modules only (so `torch.cuda` of the process stays untouched), and change no layer.
    gloo's reduce_scatter_tensor is an all-reduce of the whole input, twice the bytes of a ring reduce-scatter
    (measured: 6.0 MiB sent per rank for a 4 MiB tensor at world 4; 3.0 MiB with the all-to-all), so the
    reduce-scatter of the mappings and linear layers (sequence parallelism; the backward of loss.py's ITC gather) is
    `_reduce_scatter_by_all_to_all`: CPU runs move, and benchmarks/itc_loss.py counts, what nccl moves.
    Found by tracing every torch.cuda.current_device/synchronize call from a megatron module during
    tests/test_parallel.py and TP/PP/DP training, save and resume on CPU (megatron-core 0.16.1); async and fully
    parallel saves run too (on a CPU build of torch an unpatched call raises "Torch not compiled with CUDA").
    """
    global _CPU_PATCHED
    if _CPU_PATCHED or torch.cuda.is_available():
        return
    from megatron.core import timers as megatron_timers
    from megatron.core import utils as megatron_utils
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async, fully_parallel
    from megatron.core.dist_checkpointing.strategies import state_dict_saver
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import layers as tp_layers
    from megatron.core.tensor_parallel import mappings as tp_mappings
    from megatron.core.tensor_parallel import random as megatron_random

    # a CUDA tuning hint that megatron's layers print on every rank; it has no meaning on CPU
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
    # the RNG tracker's fork logs this whenever a draw inside it moves the CPU generator: on CPU the tracked "CUDA"
    # generator IS the CPU one, so every dropout or drop-path draw in a fork would log it
    logging.getLogger(megatron_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())

    cpu_torch = _TorchWithCudaOnCpu()
    for module in (schedules, p2p_communication, megatron_random, megatron_optimizer, clip_grads, megatron_utils,
                   param_and_grad_buffer, state_dict_saver, filesystem_async, fully_parallel, async_utils,
                   tp_mappings, tp_layers, megatron_timers):
        module.torch = cpu_torch
    for module in (tp_mappings, tp_layers):
        module.dist_reduce_scatter_func = _reduce_scatter_by_all_to_all
    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _CPU_PATCHED = True


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 minus its CUDA-type assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in params:
            if getattr(param, attr, None) is not None:
                getattr(param, attr).detach().mul_(clip_coeff)


def _reduce_scatter_by_all_to_all(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM, group=None,
                                  async_op: bool = False):
    """`dist.reduce_scatter_tensor` (SUM, equal blocks along dim 0) as an all-to-all of the blocks and a local sum."""
    if op != dist.ReduceOp.SUM:
        raise NotImplementedError(f"the gloo reduce-scatter of parallel.py sums; got {op}")
    size = dist.get_world_size(group)
    received = torch.empty_like(input)
    work = dist.all_to_all_single(received, input.contiguous(), group=group, async_op=async_op)

    def finish() -> None:
        torch.sum(received.view(size, *output.shape), dim=0, out=output)

    if not async_op:
        finish()
        return None
    return _SumWhenDone(work, finish)


class _SumWhenDone:
    """The handle of an asynchronous `_reduce_scatter_by_all_to_all`: wait() also does the local sum."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self, *args, **kwargs) -> bool:
        self._work.wait(*args, **kwargs)
        if self._finish is not None:
            self._finish()
            self._finish = None
        return True


class _CudaOnCpu(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside the patched megatron modules."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    get_rng_state = staticmethod(lambda *args, **kwargs: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *args, **kwargs: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    current_device = staticmethod(lambda: torch.device("cpu"))
    synchronize = staticmethod(lambda *args, **kwargs: None)


class _TorchWithCudaOnCpu(types.ModuleType):
    """Stands in for `torch` inside the patched megatron modules: tensor factories asked for "cuda" get CPU."""

    _FACTORIES = {"zeros", "ones", "empty", "tensor", "full", "arange"}

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def on_cpu(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return on_cpu
