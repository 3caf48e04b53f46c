"""megatron_m2/host_memory.py: glibc's malloc keeps freed memory on a CPU run, unless the user chose the allocator."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from megatron_m2.host_memory import keep_freed_host_memory, user_chose_allocator

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")

# page faults per training step of a small MLP (16 MiB activations) with glibc's defaults, then in the same process
# after keep_freed_host_memory() (it cannot be undone: a fresh process)
_FAULTS = textwrap.dedent("""
    import resource, torch
    from megatron_m2.host_memory import keep_freed_host_memory
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024),
                                torch.nn.Linear(1024, 256))
    x = torch.randn(4096, 256)
    def faults_per_step():
        def step():
            model(x).square().mean().backward()
        for _ in range(3):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5
    default = faults_per_step()
    print(default, keep_freed_host_memory(), faults_per_step())
""")


@glibc_only
def test_freed_memory_is_reused_without_the_kernel_zeroing_it_again():
    env = {name: value for name, value in os.environ.items() if not user_chose_allocator({name: value})}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True, env=env)
    default, did, kept = out.stdout.split()
    assert did == "True"
    # measured: 8,000-13,000 against 0-820 (a step allocates about 100 MiB; glibc maps much of it afresh)
    assert int(kept) * 3 < int(default), (kept, default)


@pytest.mark.parametrize("environ, chose", [
    ({}, False),
    ({"PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}, False),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"MALLOC_CONF": "background_thread:true"}, True),  # jemalloc's
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}, True),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, True),
])
def test_the_users_allocator_choice_is_recognised(environ, chose):
    assert user_chose_allocator(environ) is chose


def test_nothing_is_changed_when_the_user_chose(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.perturb=0")
    assert keep_freed_host_memory() is False


def test_nothing_is_changed_on_a_gpu_machine(monkeypatch):
    import torch

    for name in [n for n in os.environ if user_chose_allocator({n: os.environ[n]})]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert keep_freed_host_memory() is False
