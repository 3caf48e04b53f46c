#!/usr/bin/env python
"""Convert a Hugging Face M2-Encoder folder back into a megatron-core dist checkpoint, to continue training.

Writes SAVE/iter_0000000 (+ latest_checkpointed_iteration.txt) in the training loop's layout. A dist checkpoint
stores global tensors, so it loads at any TP/PP: --tensor-model-parallel-size / --pipeline-model-parallel-size are
checked against the model (heads, FFN and layer splits) and the word embedding is padded for that TP. The
checkpoint holds the model only (no optimizer/scheduler state, iteration 0).

Memory: the HF weights plus one TP=1/PP=1 copy of the model (single process, gloo world of one).

  python tools/convert_from_hf.py --hf-input out/m2-1b-hf --save checkpoints/m2-1b-cont \
      --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2

Exit codes: 0 success, 2 bad flags / missing files / layout that does not fit the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_m2.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-input", required=True, help="HF folder (config.json + model*.safetensors)")
    p.add_argument("--save", required=True, help="checkpoint root to create (must not hold iteration 0 already)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP the checkpoint is meant for")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP the checkpoint is meant for")
    return p


def load_hf_state(folder: Path) -> tuple[dict, object]:
    """(state dict, M2EncoderConfig) from the folder's safetensors, without instantiating the HF model."""
    import json

    from safetensors.torch import load_file

    from megatron_m2.hf.configuration_m2 import M2EncoderConfig

    if not (folder / "config.json").is_file():
        raise ConfigError(f"--hf-input {folder}: no config.json")
    config = M2EncoderConfig.from_pretrained(str(folder))
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise ConfigError(f"--hf-input {folder}: missing {name}")
        state.update(load_file(str(folder / name)))
    return state, config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from megatron_m2.hf.convert import hf_to_megatron, m2_config_from_hf

        state, hf_config = load_hf_state(Path(args.hf_input))
        config = m2_config_from_hf(hf_config)
        path = hf_to_megatron(state, config, args.save, args.tensor_model_parallel_size,
                              args.pipeline_model_parallel_size)
        print(f"wrote {path} ({len(state)} HF tensors) for TP {args.tensor_model_parallel_size} "
              f"PP {args.pipeline_model_parallel_size}")
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
