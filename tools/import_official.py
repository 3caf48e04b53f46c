#!/usr/bin/env python
"""Import a released M2-Encoder .ckpt into a Hugging Face folder (and/or a megatron checkpoint).

Every official key is accounted for: the ones the model needs are renamed (megatron_m2/hf/key_mapping.py), the
known-unused ones (backbone_vl B copies, training-only parts such as the MIM tokenizer and the itc_teacher*
distillation heads, logit_vl_scale) are listed in the log, and any missing or unknown key is an error that lists them.
As the release's inference: the logit scale is the checkpoint's logit_scale, and the model config records the
release's preprocessing (squash to image_size x image_size, bicubic, mean/std 0.5), which the evaluator and the HF
image processor apply.

  python tools/import_official.py --checkpoint m2_encoder_1B.ckpt --hf-output out/m2-1b-hf \
      --tokenizer-model glm_sp.model

Exit codes: 0 success, 2 bad flags / files / checkpoint contents.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_m2.errors import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="official .ckpt (Lightning state_dict, module/model wrapper, "
                                                       "or bare state dict; _forward_module. prefix accepted)")
    p.add_argument("--hf-output", help="write a Hugging Face folder here")
    p.add_argument("--megatron-output", help="write a megatron-core dist checkpoint here (see convert_from_hf.py)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP of --megatron-output")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP of --megatron-output")
    p.add_argument("--tokenizer-model", help="GLM SentencePiece model to ship in the HF folder as tokenizer.model")
    p.add_argument("--num-attention-heads", type=int, help="head count (default: from the official size table)")
    p.add_argument("--max-text-length", type=int, default=52, help="text length of the processor (default 52)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size of --hf-output (default 5GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load with weights_only=False (only for checkpoints you trust)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if not args.hf_output and not args.megatron_output:
            raise ConfigError("nothing to write: pass --hf-output and/or --megatron-output")
        from megatron_m2.hf.export import save_hf_folder
        from megatron_m2.hf.modeling_m2 import M2EncoderModel
        from megatron_m2.hf.official import config_from_official, load_official_state_dict, official_to_hf_state_dict

        if not os.path.isfile(args.checkpoint):
            raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
        start = time.perf_counter()
        logging.info("loading %s (%.1f GB) ...", args.checkpoint, os.path.getsize(args.checkpoint) / 1e9)
        official = load_official_state_dict(args.checkpoint, allow_pickle=args.allow_pickle)
        config = config_from_official(official, num_attention_heads=args.num_attention_heads,
                                      max_text_length=args.max_text_length)
        state = official_to_hf_state_dict(official, config)
        model = M2EncoderModel(config)
        model.load_state_dict(state, strict=True)
        logging.info("imported %d tensors: %d+%d layers, hidden %d (%.0f s)", len(state), config.num_layers,
                     config.num_vl_layers, config.hidden_size, time.perf_counter() - start)
        if args.hf_output:
            save_hf_folder(model, args.hf_output, args.tokenizer_model, args.max_shard_size)
            logging.info("wrote %s", args.hf_output)
        if args.megatron_output:
            from megatron_m2.hf.convert import hf_to_megatron, m2_config_from_hf
            hf_to_megatron(model.state_dict(), m2_config_from_hf(config), args.megatron_output,
                           args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
            logging.info("wrote %s", args.megatron_output)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
