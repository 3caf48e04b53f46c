"""The planner counts every collective the trainer issues (megatron_m2/collectives.py against a real step).

World 8 = TP2 x PP2 x DP2, the tiny preset, 2 micro-batches of 2 per data-parallel rank: the trainer's own model,
DDP, optimizer, `train_step` and data broadcast (data/broadcast.py's ReplicaBatches around an in-memory loader), and
the loop's per-step SIGTERM agreement. torch.distributed's collective and p2p functions are wrapped while the step
runs; every rank's calls, grouped by (operation, group), must equal `stage_collectives` for its pipeline stage, in
number and in bytes. gloo has no reduce-scatter: the ITC loss's backward uses all_to_all_single instead (loss.py),
counted here as the reduce-scatter it stands for.
"""
from __future__ import annotations

import collections
import functools

import pytest

from megatron_m2.config import load_config
from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS, num_masked_patches

pytestmark = pytest.mark.slow
WORLD, TP, PP, MICRO_BATCH, NUM_MICROBATCHES = 8, 2, 2, 2, 2
DP = WORLD // (TP * PP)
WRAPPED = ("all_reduce", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "reduce_scatter",
           "all_to_all_single", "all_to_all", "broadcast", "send", "isend", "batch_isend_irecv", "barrier", "reduce",
           "gather", "scatter", "all_gather_object", "broadcast_object_list")
OP_NAMES = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
            "all_to_all_single": "reduce_scatter", "isend": "send"}


def _group_label(group) -> str:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_m2 import parallel

    if group is None or group is dist.group.WORLD:
        return "world"
    for label, candidate in (("tp", ps.get_tensor_model_parallel_group()),
                             ("pp", ps.get_pipeline_model_parallel_group()),
                             ("dp", ps.get_data_parallel_group()),
                             ("dp", ps.get_data_parallel_group(with_context_parallel=True)),
                             ("mp", ps.get_model_parallel_group()), ("itc", parallel.get_itc_group())):
        if group is candidate:
            return label
    return f"unknown group of {dist.get_world_size(group)}"


def _nbytes(name: str, args: tuple, kwargs: dict) -> int:
    tensor = kwargs.get("tensor", kwargs.get("output_tensor", args[0] if args else None))
    if name == "all_to_all_single":  # (output, input): the input is what a reduce-scatter reduces
        tensor = args[1] if len(args) > 1 else kwargs["input"]
    return tensor.numel() * tensor.element_size()


class _Recorder:
    """Wraps torch.distributed's functions (both namespaces) and records (op, group) -> [calls, bytes]."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
        self._saved: list = []
        self._depth = 0

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        if name == "batch_isend_irecv":
            for op in args[0]:
                if getattr(op.op, "__name__", "") == "isend":
                    self._add("send", "pp", op.tensor.numel() * op.tensor.element_size())
            return
        group = kwargs.get("group")
        if group is None and name == "all_reduce" and len(args) > 2:
            group = args[2]
        self._add(OP_NAMES.get(name, name), "pp" if name in ("send", "isend") else _group_label(group),
                  _nbytes(name, args, kwargs))

    def _add(self, op: str, group: str, nbytes: float) -> None:
        entry = self.calls[(op, group)]
        entry[0] += 1
        entry[1] += nbytes

    def __enter__(self) -> "_Recorder":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        from megatron.core.tensor_parallel import layers, mappings

        wrappers = {}
        for name in WRAPPED:
            original = getattr(c10d, name, None) or getattr(dist, name, None)
            if original is None:
                continue
            wrapper = wrappers[original] = self._wrap(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    self._saved.append((module, name, original))
                    setattr(module, name, wrapper)
        # megatron's mappings bind some at import (dist_all_gather_func = all_gather_into_tensor: the ITC gather)
        for module in (mappings, layers):
            for name, value in list(vars(module).items()):
                if callable(value) and value in wrappers:
                    self._saved.append((module, name, value))
                    setattr(module, name, wrappers[value])
        return self

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if not self._depth:  # a collective made of other collectives (batch_isend_irecv's isends) counts once
                self._record(name, args, kwargs)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    def __exit__(self, *exc) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)


def _trainer_args(extra: list[str]):
    from megatron_m2.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(
        ["--model", "tiny", "--tensor-model-parallel-size", str(TP), "--pipeline-model-parallel-size", str(PP),
         "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(DP * NUM_MICROBATCHES * MICRO_BATCH),
         "--clip-grad", "1.0", "--dry-run", *extra])
    args.model_config = load_config("tiny")
    args.layout = validate_args(args, world_size=WORLD)
    return args


def _replica_batches(config, args):
    """The trainer's data path after the loader: the replica's reader broadcasts each micro-batch. With CMLM / CMIM
    each batch carries their masks: exactly text_mask_prob of every caption's tokens (so the planner's expected count
    of masked tokens is the count), image_mask_ratio of the patches."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_m2.data.broadcast import ReplicaBatches, _replica_reader

    mp_group, tp_group = ps.get_model_parallel_group(), ps.get_tensor_model_parallel_group()
    first_stage = ps.is_pipeline_first_stage()
    reader = _replica_reader(mp_group, ps.get_tensor_model_parallel_rank(), first_stage)
    g = torch.Generator().manual_seed(ps.get_data_parallel_rank())

    def batches():
        while True:
            ids = torch.randint(0, config.vocab_size, (MICRO_BATCH, config.max_text_length), generator=g)
            yield dict(images=torch.randint(0, 256, (MICRO_BATCH, config.num_channels, config.image_size,
                                                     config.image_size), generator=g, dtype=torch.uint8),
                       text_ids=ids, text_padding_mask=torch.zeros_like(ids, dtype=torch.bool),
                       **_masks(config, args, ids, g))

    inner = batches() if torch.distributed.get_rank() == reader else None
    mask_keys = tuple(key for key, on in ((MASKED_TEXT_IDS, args.cmlm_weight), (TEXT_TARGETS, args.cmlm_weight),
                                          (IMAGE_PATCH_MASK, args.cmim_weight)) if on)
    return ReplicaBatches(inner, micro_batch_size=MICRO_BATCH, image_size=config.image_size, mask_keys=mask_keys,
                          num_patches=config.num_patches, images_to_all_stages=bool(args.cmim_weight),
                          text_length=config.max_text_length, reader=reader, first_stage=first_stage,
                          mp_group=mp_group, tp_group=tp_group)


def _masks(config, args, ids, generator) -> dict:
    import torch

    masks = {}
    if args.cmlm_weight:
        chosen = round(args.text_mask_prob * config.max_text_length)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[:, 1:1 + chosen] = True
        masks.update({TEXT_TARGETS: targets, MASKED_TEXT_IDS: ids.masked_fill(targets, 3)})
    if args.cmim_weight:
        patches = torch.zeros(ids.shape[0], config.num_patches, dtype=torch.bool)
        patches[:, :num_masked_patches(config.num_patches, args.image_mask_ratio)] = True
        masks[IMAGE_PATCH_MASK] = patches[:, torch.randperm(config.num_patches, generator=generator)]
    return masks


def _count_one_step(extra: list[str]):
    from megatron.core import parallel_state as ps

    from megatron_m2 import parallel
    from megatron_m2.config import transformer_overrides
    from megatron_m2.models import build_model
    from megatron_m2.training.batch_schedule import configure_microbatches
    from megatron_m2.training.loop import SigtermFlag
    from megatron_m2.training.optimizer import build_optimizer, wrap_ddp
    from megatron_m2.training.step import forward_step, step_config_from_args, train_step

    args = _trainer_args(extra)
    parallel.initialize_model_parallel(TP, PP, args.layout.itc_group_size)
    configure_microbatches(args, args.layout)
    model = build_model(args.model_config, spec="local", cmlm=args.cmlm_weight > 0, cmim=args.cmim_weight > 0,
                        **transformer_overrides(args.recompute_activations))
    from megatron_m2.training.negatives import build_negatives_state

    negatives = build_negatives_state(args, model, lambda: build_model(args.model_config, spec="local"))
    ddp = wrap_ddp(model, args)
    optimizer, scheduler = build_optimizer(ddp, args)
    data = _replica_batches(args.model_config, args)
    sigterm = object.__new__(SigtermFlag)  # the loop's agreement, without installing its signal handler
    sigterm.received = False
    with _Recorder() as recorder:
        train_step(forward_step, data, ddp, optimizer, scheduler, step_config_from_args(args), negatives=negatives)
        sigterm.any_rank()
    return ps.get_pipeline_model_parallel_rank(), {key: tuple(value) for key, value in recorder.calls.items()}


def _planned(extra: list[str], stage: int) -> dict[tuple[str, str], tuple[int, float]]:
    from megatron_m2 import planner
    from megatron_m2.collectives import stage_collectives

    args = _trainer_args(extra)
    training = planner.Training(
        micro_batch_size=MICRO_BATCH, global_batch_size=args.global_batch_size, bf16=False, spec="local",
        recompute=args.recompute_activations, itc_batch_accumulation=args.itc_batch_accumulation,
        itc_queue_size=args.itc_queue_size, momentum_towers=args.momentum_towers, overlap_grad_reduce=False, clip_grad=True,  # the CPU trainer's DDP: no overlap, one bucket
        masked=planner.MaskedPasses(args.cmlm_weight > 0, args.cmim_weight > 0, args.text_mask_prob,
                                    args.image_mask_ratio))
    planned: dict = collections.defaultdict(lambda: [0, 0.0])
    for c in stage_collectives(args.model_config, TP, PP, DP, args.layout.itc_group_size, training, stage):
        planned[(c.op, c.group)][0] += c.calls
        planned[(c.op, c.group)][1] += c.calls * c.bytes
    return {key: tuple(value) for key, value in planned.items()}


@pytest.mark.parametrize("extra", [
    # GBA-ITC batch accumulation over the DP group (a forward-only pass, one ITC loss per step), full recompute
    ["--recompute-activations"],
    ["--no-itc-batch-accumulation"],  # one ITC loss (gather, shape check) per micro-batch, inside the 1F1B pass
    # M2's full objective: the masked streams, the decoders, CMLM's vocab-parallel head, the masks in the broadcast
    ["--cmlm-weight", "1", "--cmim-weight", "1", "--text-mask-prob", "0.25", "--recompute-activations"],
    # the paper's feature memory and a queue filled by the momentum towers: their forward-only pass and gather
    ["--itc-batch-accumulation", "memory", "--itc-queue-size", "8", "--momentum-towers", "0.9"],
], ids=["accumulation-recompute", "per-microbatch", "cmlm-cmim-recompute", "memory-queue-momentum"])
def test_planner_counts_every_collective_of_a_real_step(extra):
    from megatron_m2.testing import run_distributed

    for stage, measured in run_distributed(WORLD, _count_one_step, extra):
        planned = _planned(extra, stage)
        assert sorted(measured) == sorted(planned), (stage, sorted(measured), sorted(planned))
        for key, (calls, nbytes) in measured.items():
            assert calls == planned[key][0], (stage, key, measured[key], planned[key])
            assert nbytes == pytest.approx(planned[key][1]), (stage, key, measured[key], planned[key])
