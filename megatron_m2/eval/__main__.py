"""Zero-shot classification and retrieval of a checkpoint, at any TP/PP layout (one process per GPU, or on CPU).

    torchrun --nproc-per-node 4 -m megatron_m2.eval --load runs/demo/checkpoints \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --tokenizer-model runs/demo/tokenizer.model \\
        --zeroshot-data runs/demo/data/eval \\
        --zeroshot-classnames en=runs/demo/data/classnames_en.txt zh=runs/demo/data/classnames_zh.txt \\
        --zeroshot-templates en=runs/demo/data/templates_en.txt zh=runs/demo/data/templates_zh.txt \\
        --retrieval-data runs/demo/data/retrieval.jsonl --fine-grained-data runs/demo/data/fine_grained.jsonl \\
        --output results.json

The model's shape comes from the checkpoint (the trainer and tools/convert_from_hf.py store it), so any layout the
shape allows works, whatever layout the checkpoint was written at. Exit codes: 0 success, 2 bad flags or inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_m2.errors import ConfigError
from megatron_m2.eval.flags import add_eval_data_arguments, check_eval_data_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_m2.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (its latest complete iteration is evaluated)")
    p.add_argument("--iteration", type=int, default=None, help="evaluate this iteration instead of the latest")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP ranks that split each layer")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP stages")
    p.add_argument("--spec", default="auto", choices=["auto", "local", "te"],
                   help="layer implementation: te (TransformerEngine, GPU), local (pure PyTorch), auto = te if usable")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece model the checkpoint was trained with")
    add_eval_data_arguments(p)
    p.add_argument("--output", default=None, help="also write the metrics to this JSON file (rank 0)")
    return p


def _check(args: argparse.Namespace, world_size: int):
    """Every check that needs no model: returns (model config, layout, checkpoint iteration)."""
    from megatron_m2.config import M2Config, validate_parallel_shapes
    from megatron_m2 import checkpoint_layout
    from megatron_m2.parallel import validate_layout

    if not (args.zeroshot_data or args.retrieval_data or args.fine_grained_data):
        raise ConfigError("nothing to evaluate: pass --zeroshot-data (with --zeroshot-classnames), --retrieval-data "
                          "and/or --fine-grained-data")
    check_eval_data_arguments(args)
    iteration = args.iteration if args.iteration is not None else checkpoint_layout.latest_iteration(args.load)
    if iteration is None or not checkpoint_layout.is_complete(checkpoint_layout.checkpoint_dir(args.load, iteration)):
        raise ConfigError(f"--load {args.load}: no complete checkpoint"
                          + (f" for --iteration {args.iteration}" if args.iteration is not None else ""))
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_layout.checkpoint_dir(args.load, iteration)))
    if "model_config" not in common:
        raise ConfigError(f"--load {args.load}: the checkpoint does not record its model config")
    config = M2Config(**common["model_config"])
    layout = validate_layout(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    validate_parallel_shapes(config, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    return config, layout, iteration


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    """Load --load at the flags' layout and evaluate it; the caller ends the layout (main's command_process_groups,
    once the model is gone)."""
    import torch.distributed as dist

    from megatron_m2 import parallel
    from megatron_m2.data import check_vocab, load_tokenizer
    from megatron_m2.eval.protocol import resolve_protocol
    from megatron_m2.eval.runner import encode_forward_step, make_eval_fn
    from megatron_m2.host_memory import keep_freed_host_memory
    from megatron_m2.models import build_model
    from megatron_m2 import checkpointing
    from megatron_m2.parallel import print_rank_0

    config, layout, iteration = _check(args, int(os.environ.get("WORLD_SIZE", "1")))
    tokenizer = load_tokenizer(args.tokenizer_model, config.max_text_length)
    check_vocab(tokenizer, config.vocab_size)
    args.model_config = config
    evaluate = make_eval_fn(args)  # reads the class folders and name files: bad inputs fail before the model

    keep_freed_host_memory()  # on CPU, each batch's activations re-use the last one's memory
    parallel.initialize_distributed()
    parallel.initialize_model_parallel(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size)
    model = build_model(config, spec=args.spec)
    checkpointing.load_checkpoint(args.load, model, iteration=iteration)
    print_rank_0(f"loaded {args.load} iteration {iteration} at TP {layout.tensor_model_parallel_size} "
                 f"PP {layout.pipeline_model_parallel_size}")
    start = time.perf_counter()
    results = evaluate(encode_forward_step, model, tokenizer)
    print_rank_0(f"evaluated in {time.perf_counter() - start:.1f} s")
    for name, value in results.items():
        print_rank_0(f"  {name:24s} {value:6.2f}")
    if args.output and dist.get_rank() == 0:
        protocol = resolve_protocol(args.eval_protocol, config, args.caption_normalization).name
        Path(args.output).write_text(json.dumps({"load": args.load, "iteration": iteration, "eval_protocol": protocol,
                                                 **results}, indent=1))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_m2 import parallel

    try:
        with parallel.command_process_groups():
            evaluate_checkpoint(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
