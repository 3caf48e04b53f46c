"""One decode per model replica: the reading rank broadcasts each micro-batch to the rest of its replica.

As Megatron-LM's `broadcast_data`: of the TP x PP ranks of a model replica only one, tensor-model-parallel rank 0
of the first pipeline stage, builds the shard reader and decodes; it broadcasts
- the text (`text_ids`, `text_padding_mask`, packed in one int64 tensor with a status word) on the model-parallel
  group (megatron-core's `get_model_parallel_group()`: all TP and PP ranks of the replica), and
- the uint8 images on its tensor-parallel group (the first stage's TP peers).
Later pipeline stages never see pixels: their `images` is `torch.empty(shape, dtype=uint8, device="meta")`, so the
model knows the image shape without data. Except with CMIM (`images_to_all_stages`): its loss on the last stage
reconstructs pixels, so the images go to the whole replica (a uint8 image is 150 KB at 224 px, a few percent of what
the pipeline sends per sample). The masked-modelling masks (data/masking.py) travel with the text. With nccl the
broadcasts run on the GPU and every rank gets device tensors (the reader copies its pinned batch with
non_blocking=True); with gloo they stay on the CPU. A replica of one rank (TP = PP = 1) returns the loader's (pinned)
batch as it is.
Every rank must call `next()` the same number of times at the same point (the step does: M per step).

Resume: the checkpoint keeps the data state of tensor rank 0 of the first stage of each data-parallel rank
(`checkpointing.save_checkpoint`), i.e. the reader's. `state_dict()` on a rank that does not read returns
{"reader": False}; `load_state_dict()` there ignores what it is given, so the loop may load the DP rank's saved state
on every rank.
If the reader fails (a ConfigError such as an epoch without one usable sample, a dead worker), it sends status 1
before raising, and its peers raise RuntimeError instead of waiting in the broadcast until the timeout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_m2.data.blend import ShardsOrBlend, normalize_sources, stat_keys
from megatron_m2.data.loader import ImageTextBatches, build_train_data
from megatron_m2.data.masking import IMAGE_PATCH_MASK, MASKED_TEXT_IDS, TEXT_TARGETS, Masker
from megatron_m2.data.shards import SKIP_REASONS

_OK, _FAILED, _STOPPED = 0, 1, 2


def _device_for(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ReplicaBatches:
    """Collective iterator over one replica's micro-batches (see the module docstring).

    inner: the real loader on the reading rank, None elsewhere. reader: the reader's global rank.
    first_stage: this rank holds the embeddings (receives images). mp_group / tp_group: this rank's model-parallel and
    tensor-parallel groups. stats_keys: the loader's stat keys (non-readers report zeros under them).
    mask_keys / num_patches: the masker's batch entries (data/masking.py) and the patches per image.
    images_to_all_stages: every rank of the replica receives the images (CMIM's targets), not only the first stage."""

    def __init__(self, inner: Optional[ImageTextBatches], *, micro_batch_size: int, image_size: int,
                 text_length: int, reader: int, first_stage: bool, mp_group=None, tp_group=None,
                 stats_keys: tuple = (), mask_keys: tuple = (), num_patches: int = 0,
                 images_to_all_stages: bool = False) -> None:
        self.inner = inner
        self.is_reader = inner is not None
        self.reader, self.first_stage = reader, first_stage
        self.mp_group, self.tp_group = mp_group, tp_group
        self.mp_size = dist.get_world_size(mp_group) if mp_group is not None else 1
        self.tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        if self.is_reader != (dist.get_rank() == reader if self.mp_size > 1 else True):
            raise ValueError(f"rank {dist.get_rank()}: inner loader given {self.is_reader}, reader is rank {reader}")
        self.image_shape = (micro_batch_size, 3, image_size, image_size)
        self.text_shape = (micro_batch_size, text_length)
        # the int64 / bool entries broadcast in one int64 tensor, in this order: key -> (shape, dtype)
        shapes = {TEXT_TARGETS: self.text_shape, MASKED_TEXT_IDS: self.text_shape,
                  IMAGE_PATCH_MASK: (micro_batch_size, num_patches)}
        self.fields = {"text_ids": (self.text_shape, torch.int64), "text_padding_mask": (self.text_shape, torch.bool),
                       **{key: (shapes[key], torch.int64 if key == MASKED_TEXT_IDS else torch.bool)
                          for key in mask_keys}}
        self.images_to_all_stages = images_to_all_stages
        self.device = _device_for(mp_group) if self.mp_size > 1 else torch.device("cpu")
        self._stats_keys = tuple(stats_keys)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.is_reader else {"reader": False}

    def load_state_dict(self, state: dict) -> None:
        if self.is_reader:
            self.inner.load_state_dict(state)

    @property
    def stats(self) -> dict:
        if self.is_reader:
            return self.inner.stats
        return dict.fromkeys(self._stats_keys, 0)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def __enter__(self) -> "ReplicaBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- batches --------------------------------------------------------------------------------------------
    def __iter__(self) -> "ReplicaBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.mp_size == 1:
            return next(self.inner)
        sizes = [torch.Size(shape).numel() for shape, _ in self.fields.values()]
        packed = torch.zeros(1 + sum(sizes), dtype=torch.int64)
        batch, error = None, None
        if self.is_reader:
            try:
                batch = next(self.inner)
                if tuple(batch["images"].shape) != self.image_shape or \
                        any(tuple(batch[key].shape) != shape for key, (shape, _) in self.fields.items()):
                    raise ValueError(f"the loader's batch has images {tuple(batch['images'].shape)}, "
                                     f"{ {k: tuple(batch[k].shape) for k in self.fields if k in batch} }; its peers "
                                     f"expect {self.image_shape}, { {k: s for k, (s, _) in self.fields.items()} }")
                packed[1:] = torch.cat([batch[key].reshape(-1).to(torch.int64) for key in self.fields])
            except StopIteration as exc:
                packed[0], error = _STOPPED, exc
            except BaseException as exc:  # noqa: BLE001 - tell the peers, then raise it here
                packed[0], error = _FAILED, exc
        packed = packed.to(self.device)
        dist.broadcast(packed, src=self.reader, group=self.mp_group)
        status = int(packed[0].item())
        if error is not None:
            raise error
        if status == _STOPPED:
            raise StopIteration
        if status != _OK:
            raise RuntimeError(f"rank {dist.get_rank()}: the data-reading rank {self.reader} of this model replica "
                               "failed to produce a micro-batch (its log has the error)")
        out = {}
        for (key, (shape, dtype)), part in zip(self.fields.items(), packed[1:].split(sizes)):
            out[key] = part.view(shape) if dtype == torch.int64 else part.view(shape).to(dtype)
        group, size = (self.mp_group, self.mp_size) if self.images_to_all_stages else (self.tp_group, self.tp_size)
        if not (self.first_stage or self.images_to_all_stages):
            images = torch.empty(self.image_shape, dtype=torch.uint8, device="meta")
        elif self.is_reader:
            images = batch["images"].to(self.device, non_blocking=True)
            if size > 1:
                dist.broadcast(images, src=self.reader, group=group)
        else:
            images = torch.empty(self.image_shape, dtype=torch.uint8, device=self.device)
            dist.broadcast(images, src=self.reader, group=group)
        if self.is_reader and self.device.type == "cpu":  # gloo: hand back the loader's own (pinned) tensors
            out = {key: batch[key] for key in self.fields}
        return dict(images=images, **out)


def _replica_reader(mp_group, tp_rank: int, first_stage: bool) -> int:
    """The global rank of tensor rank 0 of the first stage in this rank's model-parallel group."""
    entries = [None] * dist.get_world_size(mp_group)
    dist.all_gather_object(entries, (dist.get_rank(), tp_rank, first_stage), group=mp_group)
    readers = [rank for rank, tp, first in entries if tp == 0 and first]
    if len(readers) != 1:
        raise RuntimeError(f"model-parallel group {entries} has {len(readers)} ranks with TP rank 0 on stage 0")
    return readers[0]


def build_replica_train_data(shards_or_blend: ShardsOrBlend, tokenizer, config, micro_batch_size: int, seed: int,
                             num_workers: Optional[int] = 0, prefetch_factor: int = 2,
                             hflip: bool = True, randaugment: Optional[tuple[int, float]] = None,
                             sample_filter=None, timeout: float = 0, masker: Optional[Masker] = None
                             ) -> ReplicaBatches:
    """The training data of this rank in megatron-core's layout (parallel_state must be initialised; collective
    over the model-parallel group): the reader builds the loader (`build_train_data`, with the masker's masks), the
    others nothing; with CMIM's patch masks the images go to every stage."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    mp_group = parallel_state.get_model_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    sources = normalize_sources(shards_or_blend)  # the same names on every rank (the reader's stats keys)
    reader = _replica_reader(mp_group, tp_rank, first_stage) if dist.get_world_size(mp_group) > 1 else dist.get_rank()
    inner = None
    if dist.get_rank() == reader:
        inner = build_train_data(sources, tokenizer, config, micro_batch_size,
                                 parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size(), seed, num_workers=num_workers,
                                 prefetch_factor=prefetch_factor, hflip=hflip, randaugment=randaugment,
                                 sample_filter=sample_filter, timeout=timeout, masker=masker)
    mask_keys = masker.keys if masker is not None else ()
    return ReplicaBatches(inner, micro_batch_size=micro_batch_size, image_size=config.image_size,
                          text_length=tokenizer.max_length, reader=reader, first_stage=first_stage,
                          mp_group=mp_group, tp_group=tp_group,
                          stats_keys=stat_keys([source.name for source in sources], SKIP_REASONS),
                          mask_keys=mask_keys, num_patches=config.num_patches,
                          images_to_all_stages=IMAGE_PATCH_MASK in mask_keys)


def reduce_stats(stats: dict, group=None) -> dict:
    """Sums the data stats over the data-parallel group (collective: every rank calls it with the same keys; the
    non-reading ranks contribute zeros). For logging the whole job's sample and skip counts on rank 0."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group() if group is None else group
    keys = list(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_device_for(group))
    dist.all_reduce(values, group=group)
    return {k: int(v) if float(v).is_integer() else float(v) for k, v in zip(keys, values.tolist())}
