"""Command-line flags (Megatron-LM names) and their validation, done before any heavy work."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megatron_m2.config import PRESETS, M2Config, load_config, validate_parallel_shapes
from megatron_m2.data.masking import check_masking
from megatron_m2.errors import ConfigError
from megatron_m2.eval.flags import add_eval_data_arguments, check_eval_data_arguments
from megatron_m2.parallel import Layout, validate_layout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_m2.train",
        description="Pretrain an M2-Encoder (bilingual two-tower image-text encoder) with megatron-core. "
        "Launch one process per GPU with torchrun; on a CPU-only machine the same command runs on gloo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}) or path to a model JSON config")
    g.add_argument("--spec", default="auto", choices=["auto", "local", "te"],
                   help="layer implementation: te = TransformerEngine (GPU), local = pure PyTorch; auto picks te "
                   "when TransformerEngine and CUDA are available")
    g.add_argument("--recompute-activations", action="store_true",
                   help="full activation recompute of every transformer layer (less memory, ~30%% more compute)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks that split each layer")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP: stages; must divide num_layers + num_vl_layers of the model")
    g.add_argument("--itc-group-size", type=int, default=0,
                   help="data-parallel ranks whose features the contrastive loss aggregates (M2-Encoder's grouped "
                   "aggregation); 0 = the whole data-parallel group (exact CLIP loss)")
    g.add_argument("--itc-chunk-size", type=int, default=0,
                   help="compute the contrastive softmax in column chunks of this size to bound logit memory; "
                   "0 = unchunked")
    g.add_argument("--itc-batch-accumulation", action=argparse.BooleanOptionalAction, default=True,
                   help="GBA-ITC batch accumulation: one contrastive loss over ALL micro-batches of a step, so each "
                   "ITC group scores itc-group-size x global-batch-size / DP pairs against each other (the global "
                   "batch with the default group), exact, at the cost of one extra forward pass when a step has "
                   "more than one micro-batch; --no-itc-batch-accumulation: one loss per micro-batch (each "
                   "contrastive batch is itc-group-size x micro-batch-size pairs)")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=16,
                   help="samples per optimizer step over all data-parallel ranks; a multiple of "
                   "micro-batch-size x data-parallel size (the quotient is the number of micro-batches)")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps to train for")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--lr-warmup-iters", type=int, default=10, help="linear warmup steps")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="steps of cosine decay after which lr stays at --min-lr (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay; never applied to biases, norms, the logit scale and the CLS token")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.98, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations with fp32 master weights (GPU)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1; GPU/nccl)")
    g.add_argument("--seed", type=int, default=1234, help="random seed (weights, data order, augmentation)")
    g.add_argument("--freeze-vision", action="store_true",
                   help="LiT-style: keep the vision tower fixed and train the rest (Chinese-CLIP's stage 1)")
    g.add_argument("--load-vision", default=None,
                   help="initialise the vision tower (patch embedding, positions, vision layers and LN) from this "
                   "checkpoint directory")
    g.add_argument("--load-text", default=None,
                   help="initialise the text tower (token embedding, positions, text layers and LN) from this "
                   "checkpoint directory")

    g = p.add_argument_group("objectives: L = L_ITC + cmim-weight x L_CMIM + cmlm-weight x L_CMLM (M2-Encoder)")
    g.add_argument("--cmlm-weight", type=float, default=0.0,
                   help="beta: weight of cross-modal masked language modelling (an image-to-text decoder predicts the "
                   "caption's masked tokens from the masked caption's text-tower states and the image's vision-tower "
                   "states; loss = mean cross-entropy over every masked token of the step); 0 = off: no decoder, no "
                   "masked stream")
    g.add_argument("--cmim-weight", type=float, default=0.0,
                   help="alpha: weight of cross-modal masked image modelling (a text-to-image decoder reconstructs the "
                   "masked patches' per-patch normalised pixels, MAE's target, from the masked image's vision-tower "
                   "states and the caption's text-tower states; loss = mean squared error over every masked patch of "
                   "the step); 0 = off")
    g.add_argument("--text-mask-prob", type=float, default=0.15,
                   help="CMLM: share of a caption's tokens to predict, chosen as whole words (80%% become [MASK], 10%% "
                   "a random token, 10%% stay); the release's mlm_prob")
    g.add_argument("--image-mask-ratio", type=float, default=80 / 196,
                   help="CMIM: share of an image's patches replaced by the learned mask token and reconstructed, "
                   "chosen uniformly at random; default 80 of 196 patches, the release's")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="webdataset tar shards: files, directories or brace patterns (shard-{00000..00099}.tar); "
                   "or a weighted blend of sources as alternating weight path pairs, Megatron-style: "
                   "0.7 zh-shards/ 0.3 en-shards/ (weights normalised)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data worker processes per reading rank (decode, augment, tokenise); 0 = in the training "
                   "process; default: CPU cores per local rank - 1, at most 16. Batches are the same for any value")
    g.add_argument("--prefetch-factor", type=int, default=2,
                   help="micro-batches each data worker prepares ahead")
    g.add_argument("--no-hflip", dest="hflip", action="store_false",
                   help="no random horizontal flip in the train augmentation (for images where a mirror changes the "
                   "meaning: digits, text)")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece model of the GLM-compatible tokenizer")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None,
                   help="directory for checkpoints (megatron-core dist_checkpointing); on SIGTERM (Slurm preemption "
                   "or time limit) the trainer finishes the current step, saves here and exits")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps (0 = only at the end/on SIGTERM)")
    g.add_argument("--load", default=None,
                   help="resume from the latest complete checkpoint in this directory (may equal --save; a missing "
                   "or empty directory starts from scratch)")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer state from --load")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training continues (megatron-core async "
                   "save); a checkpoint becomes the latest only once every rank has finished writing it, and the "
                   "trainer waits for a pending save before the next one and before exiting")
    g.add_argument("--exit-interval", type=int, default=0,
                   help="save (with --save) and exit after the first iteration divisible by N, e.g. to stop a run "
                   "mid-schedule and continue it later, maybe at another TP/PP layout (0 = off)")
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler", action="store_true",
                   help="on resume, take the learning-rate/weight-decay schedule from these flags instead of the "
                   "checkpoint (e.g. after changing --train-iters or --lr); the iteration count is kept")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   action="store_true",
                   help="on resume, take the schedule from the checkpoint even where these flags differ")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="print one line of metrics every N steps")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--eval-interval", type=int, default=0, help="run zero-shot evaluation every N steps (0 = off)")
    add_eval_data_arguments(g)
    g.add_argument("--eval-at-start", action="store_true",
                   help="also evaluate before the first step (the untrained baseline)")
    g.add_argument("--metrics-file", default=None,
                   help="append every logged step and evaluation as one JSON line to this file")

    g = p.add_argument_group("launch")
    g.add_argument("--dry-run", action="store_true",
                   help="validate the configuration, print parameters per rank and a memory estimate, and exit "
                   "without allocating the model")
    g.add_argument("--world-size", type=int, default=None,
                   help="for --dry-run only: the number of processes to plan for (default: $WORLD_SIZE or 1)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="for --dry-run: memory per GPU to check against")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.model_config = load_config(args.model)
    args.layout = validate_args(args)
    return args


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> Layout:
    """Every check that needs no process group and no allocation; raises ConfigError naming the flag."""
    if world_size is None:
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    config: M2Config = args.model_config
    layout = validate_layout(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                             args.itc_group_size or None)
    validate_parallel_shapes(config, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    for flag in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    per_step = args.micro_batch_size * layout.data_parallel_size
    if args.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {layout.data_parallel_size} = {per_step}; "
            f"use e.g. --global-batch-size {max(per_step, args.global_batch_size // per_step * per_step)}"
        )
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0 (0 = decode in the training process), got {args.num_workers}")
    if args.prefetch_factor < 1:
        raise ConfigError(f"--prefetch-factor must be >= 1, got {args.prefetch_factor}")
    if args.itc_chunk_size < 0:
        raise ConfigError("--itc-chunk-size must be >= 0")
    for flag in ("cmlm_weight", "cmim_weight"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, flag)}")
    if args.cmlm_weight or args.cmim_weight:
        check_masking(args.text_mask_prob, args.image_mask_ratio, config.num_patches)
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    if args.exit_interval < 0:
        raise ConfigError(f"--exit-interval must be >= 0, got {args.exit_interval}")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save DIR")
    if args.async_save and not args.save:
        raise ConfigError("--async-save needs --save DIR")
    if args.eval_interval and not (args.zeroshot_data or args.retrieval_data or args.fine_grained_data):
        raise ConfigError("--eval-interval needs --zeroshot-data, --retrieval-data and/or --fine-grained-data")
    check_eval_data_arguments(args)
    if args.freeze_vision and args.load_vision is None and args.load is None:
        raise ConfigError("--freeze-vision freezes a random tower: pass --load-vision DIR (or --load DIR)")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            if args.bf16:
                raise ConfigError("--bf16 needs a GPU (megatron-core's mixed-precision optimizer is CUDA-only); "
                                  "drop it on CPU")
            if args.use_distributed_optimizer:
                raise ConfigError("--use-distributed-optimizer needs nccl (gloo has no reduce-scatter); drop it on CPU")
            if args.spec == "te":
                raise ConfigError("--spec te needs TransformerEngine on a GPU; use --spec local or auto on CPU")
        if not args.data_path:
            raise ConfigError("--data-path is required (webdataset tar shards); see tools/make_shards.py")
        if not args.tokenizer_model:
            raise ConfigError("--tokenizer-model is required (SentencePiece model); see tools/train_tokenizer.py")
    return layout
