#!/usr/bin/env python
"""Convert a megatron-core dist checkpoint (saved at ANY TP/PP) into a Hugging Face folder.

The training-only cross-modal decoders of CMLM / CMIM (and the image mask token) are left out: the HF model is the
encoder the release ships, and a converted folder loads back (tools/convert_from_hf.py) with fresh decoders.

The folder holds config.json (with auto_map), model.safetensors (sharded above --max-shard-size), the remote code,
preprocessor_config.json (the model's saved preprocessing) and, with --tokenizer-model, tokenizer.model,
tokenizer_config.json and processor_config.json; AutoModel, AutoProcessor, AutoTokenizer and AutoImageProcessor
(trust_remote_code=True) load it with transformers, torch, sentencepiece and Pillow only, no megatron needed.

Memory: the checkpoint's global tensors are read one at a time (the stacked per-layer block tensors one layer at a
time) and written into safetensors shards flushed at --max-shard-size. Peak memory is about --max-shard-size plus
twice the largest single tensor (a stored chunk is read whole, then copied; for M2 that is the word embedding, under
TP its per-rank chunk), whatever the model size. Measured (CPU, 0.4b preset = 240M params, 961 MB fp32, checkpoint
written at TP1): 1.12 GB max RSS, of which 0.42 GB is importing torch/megatron and 0.71 GB two copies of the 354 MB
word embedding; the same with --max-shard-size 50MB or 200MB. No model is built, no process group is needed.

  python tools/convert_to_hf.py --load checkpoints/m2-1b --hf-output out/m2-1b-hf --tokenizer-model glm_sp.model

Exit codes: 0 success, 2 bad flags / missing files / checkpoint-config mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_m2.errors import ConfigError  # noqa: E402

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="checkpoint root (with latest_checkpointed_iteration.txt) or one iter_NNNNNNN directory")
    p.add_argument("--iteration", type=int, help="iteration to convert (default: the latest complete one)")
    p.add_argument("--hf-output", required=True, help="output folder (created; existing files are overwritten)")
    p.add_argument("--model", help="model preset or JSON (default: the model_config saved in the checkpoint)")
    p.add_argument("--tokenizer-model", help="SentencePiece model to ship as tokenizer.model")
    p.add_argument("--max-shard-size", default="2GB",
                   help="safetensors shard size, e.g. 2GB, 500MB; bounds the memory held before a flush (default 2GB)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                   help="cast floating tensors (default: keep the checkpoint's dtype)")
    p.add_argument("--from-master-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="export a bf16 (or fp16) checkpoint's fp32 master weights from its optimizer state (the "
                   "values training updates) instead of their rounded model copies. Default: on where the checkpoint "
                   "has them, else the model weights with a note why; --from-master-weights: an error if it has "
                   "none; --no-from-master-weights: the model weights as stored. The output says which it wrote")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def convert(args: argparse.Namespace) -> Path:
    import torch

    from megatron_m2.hf.convert import (ShardedSafetensorsWriter, count_read_steps, decoder_keys, hf_config_from_m2,
                                        megatron_config_from_checkpoint, megatron_to_hf_tensors, select_weights)
    from megatron_m2.hf.export import write_processor, write_remote_code
    from megatron_m2.hf.megatron_io import DistCheckpointReader
    from megatron_m2.progress_line import ProgressLine

    if args.tokenizer_model and not Path(args.tokenizer_model).is_file():
        raise ConfigError(f"--tokenizer-model {args.tokenizer_model} does not exist")
    reader = DistCheckpointReader(args.load, args.iteration)
    config = megatron_config_from_checkpoint(reader, args.model)
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    weight_keys, weights = select_weights(reader, config, args.from_master_weights)
    print(f"exporting {weights}" + (f", cast to {args.dtype}" if dtype is not None else ""))
    out = Path(args.hf_output)
    writer = ShardedSafetensorsWriter(out, args.max_shard_size)
    with ProgressLine(f"{reader.path} -> {out}: reading", count_read_steps(config), "layers",
                      enabled=not args.no_progress) as progress:
        for key, tensor in megatron_to_hf_tensors(reader, config, dtype, progress=progress.update,
                                                  weight_keys=weight_keys):
            writer.add(key, tensor)
        shards = writer.finish()
    hf_config = hf_config_from_m2(config)
    hf_config.architectures = ["M2EncoderModel"]
    if dtype is not None:
        hf_config.dtype = str(dtype).removeprefix("torch.")
    write_remote_code(out, hf_config)
    hf_config.save_pretrained(str(out))
    write_processor(out, hf_config, args.tokenizer_model)
    print(f"wrote {out}: {len(shards)} shard(s), {writer.total_bytes / 1e6:.1f} MB of {weights}")
    left_out = decoder_keys(reader)
    if left_out:
        print(f"left out {len(left_out)} tensors of the training-only CMLM/CMIM decoders (the HF model has none): "
              f"{', '.join(sorted({'.'.join(k.split('.')[:2]) for k in left_out}))}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
