"""The data path: GLM-compatible tokenizer, image transforms, webdataset tar shards and training batches.

The trainer's interface:

- `parse_data_path(values) -> [(weight, [shard paths])]`: `--data-path` as paths (one source) or alternating
  `weight path` pairs (`0.7 zh-shards/ 0.3 en-shards/`, weights normalised); ConfigError names the flag.
  `name_sources(pairs) -> [Source(name, weight, paths)]` names them (no file-system access); the builders below take
  Sources as they are, so the trainer resolves its shards once.
- `build_train_data(shards_or_blend, tokenizer, config, micro_batch_size, dp_rank, dp_size, seed, num_workers=0,
  prefetch_factor=2, hflip=True, masker=None) -> ImageTextBatches`: one DP rank's endless iterator; `shards_or_blend` is a shard
  spec (str or list of paths/patterns), a [(weight, shards)] blend or Sources. `next()` returns
  dict(images uint8 [b,3,H,W] (pinned when CUDA is available), text_ids int64 [b,L], text_padding_mask bool [b,L]);
  images are normalised on the device with `normalize(images)`. With a masker (`masking.build_masker`, the CMLM /
  CMIM objectives) batches also carry the masks of data/masking.py, drawn per sample from its seed in the workers. `num_workers` processes decode, augment and
  tokenise (None: `default_num_workers()`), `prefetch_factor` micro-batches each ahead; batches are identical for
  any worker count. `state_dict()` is the position after the last batch returned (not prefetched),
  `load_state_dict(state)` resumes at exactly the next batch; `stats` is a flat dict of per-source counts
  (`data/<source>/samples`, `data/<source>/skipped`, `data/<source>/skipped/<reason>`, `data/samples`,
  `data/skipped`); `close()` (or `with`) stops the workers.
- `build_replica_train_data(shards_or_blend, tokenizer, config, micro_batch_size, seed, num_workers=0,
  prefetch_factor=2, hflip=True, masker=None) -> ReplicaBatches`: the same interface in megatron-core's layout, one decode per
  model replica (data/broadcast.py): TP rank 0 of the first stage reads and broadcasts; later stages get
  `images` on the meta device. Collective: every rank of a replica calls next() equally often.
  `reduce_stats(stats, group)` sums the stats over a group (collective).
- `to_device(batch, device, dtype)` (data/device.py): the batch on the model's device, uint8 images normalised there
  (`model_images`), meta tensors left as they are; the evaluator uses it, and the trainer's step with dtype=None
  (images stay uint8 until each micro-batch's forward).
The measured decode + augment + tokenise rate of one core (benchmarks/data_loader.py) is a hardware assumption of
the planner (`planner.Hardware.decode_samples_per_core_s`), which reports the CPU cores per GPU a layout needs.
"""
from megatron_m2.data.blend import Source, name_sources, parse_data_path
from megatron_m2.data.broadcast import ReplicaBatches, build_replica_train_data, reduce_stats
from megatron_m2.data.device import model_images, to_device
from megatron_m2.data.loader import ImageTextBatches, build_train_data, cores_per_local_rank, default_num_workers
from megatron_m2.data.shards import ShardStream, resolve_shards
from megatron_m2.data.tokenizer import GLMTokenizer, check_vocab, load_tokenizer
from megatron_m2.data.transforms import eval_transform, normalize, train_transform

__all__ = ["GLMTokenizer", "ImageTextBatches", "ReplicaBatches", "ShardStream", "Source", "build_replica_train_data",
           "build_train_data", "check_vocab", "cores_per_local_rank", "default_num_workers", "eval_transform",
           "load_tokenizer", "model_images", "name_sources", "normalize", "parse_data_path", "reduce_stats",
           "resolve_shards", "to_device", "train_transform"]
