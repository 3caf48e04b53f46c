"""Initial weights that do not depend on the parallel layout: every tensor is drawn whole from the seed and its
global name, and each rank keeps its own shard, so the model at step 0 is the same at any TP x PP.

Why: megatron-core draws the weights from the torch RNG while a rank constructs its stage: every pipeline stage
starts from the same seed (stages 1..PP-1 drew their layers from the same numbers, as exact copies of each other),
and on GPU each tensor-parallel rank draws only its shard. Megatron-LM offsets the seed per stage; here the draw
does not depend on the stage, the rank or the construction order at all.

How, for any module (nothing here lists the model's modules, so new ones get the same treatment): megatron's
`sharded_state_dict` names every tensor globally, as checkpoints do: a key (for a layer without its local index),
the global layer index as a prepended axis, the global shape and this rank's offset in it. A tensor is drawn in
blocks of rows of a fixed size (a function of its row length only), each block from a generator seeded by
(seed, key, layer index, block number) on the parameter's device. A row's values therefore depend neither on how
many rows the tensor has (the vocab padding grows with TP) nor on which rank draws it; a rank draws only the blocks
that hold its rows (every block, cut to its columns, for a tensor split along a later dimension), one block at a
time (a few MiB).
Which values: a parameter that construction filled with a single value (LayerNorm ones, zero biases, the logit
scale) is the same at every layout and is kept. Every other one is redrawn with the init its module uses: torch's
default for convolutions, else the owning TransformerConfig's `init_method`, or `output_layer_init_method` for a
row-parallel weight (split along dim 1), as megatron's layers choose. Those functions must treat elements alike
whatever the first dimension's size (megatron's normal and scaled-normal do; torch's kaiming uses the fan-in).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.transformer_config import TransformerConfig

BLOCK_ELEMENTS = 2**20  # elements drawn at a time (4 MiB in float32)

Init = Callable[[torch.Tensor], object]


def initialize_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw `model`'s random parameters in place from `seed` (see the module docstring); call it before DDP and
    the optimizer copy them. Every parameter must appear in the model's sharded_state_dict (as for checkpoints)."""
    if not getattr(model.config, "perform_initialization", True):
        return
    owners = _owners(model)
    done = set()
    with torch.no_grad():
        for sharded in nested_values(model.sharded_state_dict()):
            param = getattr(sharded, "data", None)
            if not isinstance(sharded, ShardedTensor) or id(param) not in owners or id(param) in done:
                continue
            done.add(id(param))
            if _constant(param):
                continue
            module, name, config = owners[id(param)]
            prepend = sharded.prepend_axis_num
            identity = f"{seed}/{sharded.key}/{','.join(map(str, sharded.global_offset[:prepend]))}"
            _draw_shard(param, _init_function(module, name, param, config), identity,
                        tuple(sharded.global_shape[prepend:]), tuple(sharded.global_offset[prepend:]))
    missing = [name for name, param in model.named_parameters() if id(param) not in done]
    if missing:
        raise ValueError(f"parameters missing from the model's sharded_state_dict cannot be initialised "
                         f"independently of the layout (nor checkpointed): {missing}")


def _owners(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, str, Optional[TransformerConfig]]]:
    """id(parameter) -> (the module holding it, its local name, the nearest TransformerConfig up the tree)."""
    configs: dict[str, TransformerConfig] = {}
    owners = {}
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        configs[path] = config if isinstance(config, TransformerConfig) else configs.get(path.rpartition(".")[0])
        for name, param in module.named_parameters(recurse=False):
            owners[id(param)] = (module, name, configs[path])
    return owners


def _constant(param: torch.Tensor) -> bool:
    return param.numel() > 0 and bool((param == param.reshape(-1)[0]).all())


def _init_function(module: torch.nn.Module, name: str, param: torch.Tensor, config: Optional[TransformerConfig]
                   ) -> Init:
    if isinstance(module, torch.nn.modules.conv._ConvNd):  # torch's reset_parameters, on a block of rows
        if name == "weight":
            return lambda t: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        bound = 1 / math.sqrt(fan_in)
        return lambda t: torch.nn.init.uniform_(t, -bound, bound)
    if config is None:
        raise ValueError(f"{type(module).__name__}.{name}: no TransformerConfig up the module tree to take the "
                         "init method from")
    if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", 0) == 1:
        return config.output_layer_init_method
    return config.init_method


def _block_seed(identity: str, block: int) -> int:
    digest = hashlib.blake2b(f"{identity}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _draw_block(init: Init, shape: tuple, seed: int, device: torch.device) -> torch.Tensor:
    """`init` on a new float32 tensor, with the default generator of `device` seeded by `seed` (restored after)."""
    block = torch.empty(shape, dtype=torch.float32, device=device)
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device]), torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
            init(block)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            init(block)
    return block


def _draw_shard(param: torch.Tensor, init: Init, identity: str, full_shape: tuple, offset: tuple) -> None:
    """Fill `param`, the shard at `offset` of a tensor of `full_shape`, with its part of the full draw."""
    if not full_shape:  # a scalar
        param.copy_(_draw_block(init, (), _block_seed(identity, 0), param.device))
        return
    row_shape = full_shape[1:]
    block_rows = max(1, BLOCK_ELEMENTS // max(1, math.prod(row_shape)))
    first, end = offset[0], offset[0] + param.shape[0]
    columns = tuple(slice(o, o + n) for o, n in zip(offset[1:], param.shape[1:]))
    for block in range(first // block_rows, -(-end // block_rows)):
        start = block * block_rows
        values = _draw_block(init, (block_rows, *row_shape), _block_seed(identity, block), param.device)
        lo, hi = max(first, start), min(end, start + block_rows)
        param[lo - first:hi - first].copy_(values[(slice(lo - start, hi - start), *columns)])
