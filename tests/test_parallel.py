"""The foundation: process groups, megatron-core's parallel layers and pipeline schedule on CPU/gloo."""
import pytest
import torch
import torch.distributed as dist

from megatron_m2 import parallel
from megatron_m2.errors import ConfigError
from megatron_m2.testing import run_distributed


def _group_layout(tp, pp, itc_group_size=None):
    from megatron.core import parallel_state as ps

    parallel.initialize_model_parallel(tp, pp, itc_group_size)
    return {
        "tp": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
        "pp": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
        "dp": dist.get_process_group_ranks(ps.get_data_parallel_group()),
        "itc": parallel.get_itc_group_ranks(),
    }


def test_rank_layout_world8_follows_megatron_order():
    # megatron-core's order is tp-cp-ep-dp-pp: TP neighbours, then DP, then PP (stride TP*DP).
    layouts = run_distributed(8, _group_layout, 2, 2)
    for rank, groups in enumerate(layouts):
        tp_base = rank - rank % 2
        assert groups["tp"] == [tp_base, tp_base + 1]
        assert groups["pp"] == [rank % 4, rank % 4 + 4]
        dp_base = (rank // 4) * 4 + rank % 2
        assert groups["dp"] == [dp_base, dp_base + 2]
        assert groups["itc"] == groups["dp"]  # default ITC group = whole DP group


def test_itc_subgroups_split_dp_contiguously():
    layouts = run_distributed(8, _group_layout, 1, 1, 2)
    for rank, groups in enumerate(layouts):
        assert groups["dp"] == list(range(8))
        assert groups["itc"] == [rank - rank % 2, rank - rank % 2 + 1]


def _threads_after_layouts(cycles):
    import os

    for _ in range(cycles):
        parallel.initialize_model_parallel(2, 2, 1)
        parallel.destroy_model_parallel()
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_destroy_frees_the_process_groups_and_their_threads():
    # Each gloo group holds threads; if destroy leaked them, a worker that runs many tests would pile up thousands.
    once = run_distributed(4, _threads_after_layouts, 1)
    many = run_distributed(4, _threads_after_layouts, 6)
    assert many == once, (once, many)


def _groups_around_a_command():
    from megatron.core import parallel_state as ps

    with parallel.command_process_groups():
        parallel.initialize_model_parallel(2, 2)
        inside = len(dist.distributed_c10d._world.pg_map)
    return inside, len(dist.distributed_c10d._world.pg_map), ps.model_parallel_is_initialized(), dist.is_initialized()


_FRESH_COMMAND = """
import torch.distributed as dist
from megatron_m2 import parallel
with parallel.command_process_groups():
    parallel.initialize_model_parallel(1, 1)
    assert dist.is_initialized()
print(dist.is_initialized())
"""


def test_a_command_destroys_the_process_groups_it_made_when_it_ends():
    # a worker that made the default group before the command keeps it (the tests' pools); the command's own go
    for inside, after, model_parallel, default in run_distributed(4, _groups_around_a_command):
        assert inside > 1 and after == 1 and not model_parallel and default
    # a process whose command made the default group (python -m megatron_m2.train) ends without any: gloo's threads
    # are joined before the interpreter exits, not in its teardown (pytorch#190489: SIGABRT after a good run)
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FRESH_COMMAND], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["False"], result.stderr[-3000:]


@pytest.mark.parametrize(
    "world,tp,pp,group,flag",
    [
        (8, 3, 1, None, "--tensor-model-parallel-size"),
        (8, 2, 3, None, "--pipeline-model-parallel-size"),
        (8, 2, 1, 3, "--itc-group-size"),
        (8, 0, 1, None, "--tensor-model-parallel-size"),
    ],
)
def test_bad_layout_names_the_flag(world, tp, pp, group, flag):
    with pytest.raises(ConfigError, match=flag):
        parallel.validate_layout(world, tp, pp, group)


def _linear_pair(tp, seed=0):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    parallel.initialize_model_parallel(tp, 1)
    hidden, ffn, batch = 8, 16, 5
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=2, use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
    )
    torch.manual_seed(seed)
    w1, b1 = torch.randn(ffn, hidden) / hidden**0.5, torch.randn(ffn) * 0.1
    w2, b2 = torch.randn(hidden, ffn) / ffn**0.5, torch.randn(hidden) * 0.1
    x = torch.randn(batch, hidden)
    fc1 = ColumnParallelLinear(hidden, ffn, config=config, init_method=torch.nn.init.zeros_, bias=True,
                               gather_output=False)
    fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=torch.nn.init.zeros_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    rank, shard = ps.get_tensor_model_parallel_rank(), ffn // tp
    with torch.no_grad():
        fc1.weight.copy_(w1[rank * shard:(rank + 1) * shard])
        fc1.bias.copy_(b1[rank * shard:(rank + 1) * shard])
        fc2.weight.copy_(w2[:, rank * shard:(rank + 1) * shard])
        fc2.bias.copy_(b2)
    out = fc2(torch.nn.functional.gelu(fc1(x)[0]))[0]
    out.pow(2).mean().backward()
    grads = [fc1.weight.grad, fc2.weight.grad]
    gathered = []
    for g, dim in zip(grads, (0, 1)):
        parts = [torch.empty_like(g) for _ in range(tp)]
        dist.all_gather(parts, g.contiguous(), group=ps.get_tensor_model_parallel_group())
        gathered.append(torch.cat(parts, dim=dim))
    return out.detach(), gathered, (w1, b1, w2, b2, x)


def test_column_row_parallel_linear_matches_nn_linear():
    results = run_distributed(4, _linear_pair, 2)
    _, _, (w1, b1, w2, b2, x) = results[0]
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    with torch.no_grad():
        fc1.weight.copy_(w1), fc1.bias.copy_(b1), fc2.weight.copy_(w2), fc2.bias.copy_(b2)
    ref = fc2(torch.nn.functional.gelu(fc1(x)))
    ref.pow(2).mean().backward()
    for out, (g1, g2), _ in results:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, fc1.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g2, fc2.weight.grad, rtol=1e-5, atol=1e-5)


class _Stage(torch.nn.Module):
    """A slice of a 4-layer MLP stack, with the interface megatron's schedules expect."""

    def __init__(self, layers, config):
        super().__init__()
        from megatron.core.enums import ModelType

        self.layers = torch.nn.ModuleList(layers)
        self.model_type, self.config, self.input_tensor = ModelType.encoder_or_decoder, config, None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, x):
        h = x if self.input_tensor is None else self.input_tensor
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h


def _pipeline_run(pp, num_microbatches=4, seq=3, mbs=2, hidden=6):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    parallel.initialize_model_parallel(1, pp)
    torch.manual_seed(0)
    full = [torch.nn.Linear(hidden, hidden) for _ in range(4)]
    data = [torch.randn(seq, mbs, hidden) for _ in range(num_microbatches)]
    per_stage = 4 // pp
    stage = ps.get_pipeline_model_parallel_rank()
    config = TransformerConfig(num_layers=4, hidden_size=hidden, num_attention_heads=1,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    model = _Stage(full[stage * per_stage:(stage + 1) * per_stage], config)
    batches = iter(data)

    def forward_step(data_iterator, model):
        x = next(data_iterator)
        out = model(x)
        return out, lambda output: (output.pow(2).mean(), {"loss": output.pow(2).mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=model, num_microbatches=num_microbatches,
        seq_length=seq, micro_batch_size=mbs, forward_only=False,
    )
    grads = {stage * per_stage + i: layer.weight.grad.clone() for i, layer in enumerate(model.layers)}
    return [l["loss"] for l in losses], grads


def test_two_stage_pipeline_matches_one_stage():
    one = run_distributed(4, _pipeline_run, 1)[0]
    two = run_distributed(4, _pipeline_run, 2)
    last_stage = two[2]  # ranks 0,1 are stage 0 (DP 2); ranks 2,3 are stage 1
    torch.testing.assert_close(torch.stack(last_stage[0]), torch.stack(one[0]), rtol=1e-5, atol=1e-6)
    grads = {**two[0][1], **two[2][1]}
    assert sorted(grads) == [0, 1, 2, 3]
    for index, grad in one[1].items():
        torch.testing.assert_close(grads[index], grad, rtol=1e-5, atol=1e-6)


def _cuda_names_after_init():
    import importlib

    parallel.initialize_model_parallel(1, 1)
    patched = {}
    for name in ("distributed.param_and_grad_buffer", "pipeline_parallel.p2p_communication", "utils",
                 "dist_checkpointing.strategies.state_dict_saver", "dist_checkpointing.strategies.async_utils"):
        module = importlib.import_module(f"megatron.core.{name}")
        patched[name] = (str(module.torch.cuda.current_device()), module.torch.cuda.synchronize())
    return torch.cuda.current_device.__module__, torch.cuda.synchronize.__module__, patched


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are a no-op where CUDA exists")
def test_cpu_patches_stay_inside_megatron_modules():
    # The process's torch.cuda is torch's own (other code must still see that CUDA is absent); only the megatron
    # modules that allocate on / synchronise the current CUDA device see a CPU stand-in.
    for process_wide, patched in [(r[:2], r[2]) for r in run_distributed(2, _cuda_names_after_init)]:
        assert process_wide == ("torch.cuda", "torch.cuda")
        assert patched == {name: ("cpu", None) for name in patched}


def _group_timeouts(minutes: int) -> list[float]:
    from megatron.core import parallel_state as ps

    parallel.initialize_model_parallel(2, 2, distributed_timeout_minutes=minutes)
    groups = (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
              ps.get_data_parallel_group(), ps.get_model_parallel_group(), parallel.get_itc_group())
    return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]


def test_distributed_timeout_reaches_every_group():
    # --distributed-timeout-minutes (Megatron-LM's): a rank waiting in a collective for a peer that failed or hung
    # (a data worker past --dataloader-timeout) raises after it, not after torch's 30 minutes
    for timeouts in run_distributed(4, _group_timeouts, 3):
        assert timeouts == [180.0] * 5
