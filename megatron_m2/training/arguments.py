"""Command-line flags (Megatron-LM names) and their validation, done before any heavy work."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megatron_m2.contrastive import add_negatives_arguments, check_negatives_arguments
from megatron_m2.config import PRESETS, M2Config, load_config, validate_parallel_shapes
from megatron_m2.data.masking import check_masking
from megatron_m2.errors import ConfigError
from megatron_m2.eval.flags import add_eval_data_arguments, check_eval_data_arguments
from megatron_m2.parallel import Layout, validate_layout
from megatron_m2.training.batch_schedule import resolve_training_length
from megatron_m2.training.wandb_run import check_wandb_arguments


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
    g.add_argument("--drop-path-rate", type=float, default=0.0,
                   help="stochastic depth (BEiT-3 / torchscale, M2-Encoder's release trains with 0.1): each residual "
                   "branch (attention, MLP; cross-attention in the decoders) of a sample is dropped with a per-layer "
                   "rate rising linearly from 0 to this over each stack's depth (towers, VL layers, decoders), and "
                   "scaled by 1 / keep otherwise; exact under GBA-ITC's batch accumulation (pass 3 replays pass 1's "
                   "masks)")
    g.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout on each residual branch's output (megatron's hidden_dropout); exact under GBA-ITC's "
                   "batch accumulation")
    g.add_argument("--attention-dropout", type=float, default=0.0,
                   help="dropout on the attention probabilities (megatron's attention_dropout); exact under GBA-ITC's "
                   "batch accumulation")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks that split each layer")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP: stages; must divide num_layers + num_vl_layers of the model")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of every collective (process groups of torch.distributed and megatron-core): a rank "
                   "that waits longer for a peer that failed or hung raises instead of waiting (torch's default "
                   "is 30 minutes)")
    g.add_argument("--itc-group-size", type=int, default=0,
                   help="data-parallel ranks whose features the contrastive loss aggregates (M2-Encoder's grouped "
                   "aggregation); 0 = the whole data-parallel group (exact CLIP loss)")
    g.add_argument("--itc-chunk-size", type=int, default=0,
                   help="compute the contrastive softmax in column chunks of this size to bound logit memory; "
                   "0 = unchunked")
    add_negatives_arguments(g)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron-LM's sequence parallelism (needs TP > 1): the LayerNorms, residuals and dropout "
                   "of every layer run on 1/TP of the tokens, so their activations take 1/TP of the memory; the "
                   "TP all-reduces become reduce-scatter + all-gather pairs (the same bytes). Each token stream is "
                   "padded at its end to a multiple of TP (197 image tokens -> 198 at TP 2, 200 at TP 4 and 8), "
                   "the padding masked out of attention: the results are those without the flag")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient all-reduce (reduce-scatter with "
                   "--use-distributed-optimizer) with the backward pass, bucket by bucket (megatron-core DDP)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer and --overlap-grad-reduce: overlap the all-gather of the "
                   "updated parameters with the next forward pass, bucket by bucket, instead of gathering them "
                   "at the end of the optimizer step")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=16,
                   help="samples per optimizer step over all data-parallel ranks; a multiple of "
                   "micro-batch-size x data-parallel size (the quotient is the number of micro-batches)")
    g.add_argument("--train-iters", type=int, default=None,
                   help="optimizer steps to train for (default 100; exclusive with --train-samples)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="linear warmup steps (default 10; with --train-samples use --lr-warmup-samples)")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="steps of cosine decay after which lr stays at --min-lr (default: --train-iters)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="sample-based training, as Megatron-LM: train over this many samples (instead of "
                   "--train-iters; the iterations follow from the batch sizes, --rampup-batch-size included), and "
                   "the learning-rate schedule counts samples (--lr-warmup-samples, --lr-decay-samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=0,
                   help="with --train-samples: samples of linear learning-rate warmup")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="with --train-samples: samples of cosine decay, after which lr stays at --min-lr "
                   "(default: --train-samples)")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "SAMPLES"),
                   help="ramp the global batch size up from START by INCREMENT to --global-batch-size over SAMPLES "
                   "samples (megatron-core's num_microbatches_calculator; needs --train-samples, as in "
                   "Megatron-LM), e.g. 16 8 300000 with --global-batch-size 1024: (1024 - 16) / 8 = 126 increments "
                   "of about 2380 samples each. Every step's micro-batches form its contrastive batch, so that "
                   "follows the ramp too; every batch size must be a multiple of micro-batch-size x "
                   "data-parallel size")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay; never applied to biases, norms, the logit scale and the CLS token")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.98, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="check every step's loss and gradients for NaN/Inf (all ranks agree in one all-reduce) and "
                   "skip the update of a step that has one: no weight or schedule change, counted in the log's "
                   "skipped and nan iterations")
    g.add_argument("--max-consecutive-nan-iterations", type=int, default=3,
                   help="with --check-for-nan-in-loss-and-grad: stop with an error at the (N+1)-th non-finite step "
                   "in a row (a diverged run); 0 = at the first one, as Megatron-LM's check does")
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
                   "process; default: on a GPU machine the CPU cores per local rank - 1, at most 16; without a GPU 0 "
                   "(the cores compute the step; give decode-heavy CPU runs workers). Batches are the same for any "
                   "value")
    g.add_argument("--prefetch-factor", type=int, default=2,
                   help="micro-batches each data worker prepares ahead")
    g.add_argument("--dataloader-timeout", type=float, default=300.0,
                   help="seconds the reading rank waits for a micro-batch from its data workers before it stops "
                   "with an error (a hung worker: a stuck file system, a pathological image) and exits, so the "
                   "launcher ends the job; 0 = wait forever. Keep it below --distributed-timeout-minutes, which "
                   "ends the peers waiting for this rank")
    g.add_argument("--no-hflip", dest="hflip", action="store_false",
                   help="no random horizontal flip in the train augmentation (for images where a mirror changes the "
                   "meaning: digits, text)")
    g.add_argument("--randaugment", nargs=2, type=float, default=None, metavar=("N", "M"),
                   help="RandAugment after the crop and flip, as M2-Encoder's release trains (its values: 2 7): N "
                   "operations per image, each applied with probability 0.5, at magnitude M on ALBEF's 0-10 scale; "
                   "seeded per sample (batches do not depend on --num-workers or a resume); default: off")
    g.add_argument("--min-caption-chars", type=int, default=0,
                   help="skip pairs whose caption has fewer characters (the M2 paper cleans with 5); counted per "
                   "source as skipped/short_caption; 0 = off")
    g.add_argument("--max-aspect-ratio", type=float, default=0.0,
                   help="skip pairs whose image's longer side exceeds this times the shorter one (the M2 paper cleans "
                   "with 3; read from the image header, no decode); counted as skipped/aspect_ratio; 0 = off")
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
    g.add_argument("--use-persistent-ckpt-worker", action=argparse.BooleanOptionalAction, default=None,
                   help="with --async-save: one persistent writer process per rank (megatron-core's "
                   "PersistentAsyncCaller, spawned once, which copies the tensors off the GPU itself) instead of "
                   "a process forked for every save; default: on with CUDA, off on CPU (the spawned writer needs "
                   "CUDA; a forked one snapshots CPU tensors by copy-on-write)")
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
    g.add_argument("--wandb-project", default=None,
                   help="also log the TensorBoard scalars to this Weights & Biases project (the logging rank; the "
                   "flags are the run's config; a resume continues the same run). Needs the wandb extra: pip install "
                   "'megatron-m2[wandb]'; WANDB_MODE=offline logs without network")
    g.add_argument("--wandb-exp-name", default=None, help="the wandb run's name (default: wandb's)")
    g.add_argument("--wandb-save-dir", default=None,
                   help="folder for wandb's local files (default: SAVE/wandb with --save, else ./wandb)")
    g.add_argument("--profile", action="store_true",
                   help="profile the steps from --profile-step-start to --profile-step-end with torch.profiler (CPU "
                   "and CUDA activities, the step's phases as named ranges) on --profile-ranks; one trace per rank "
                   "under --tensorboard-dir (TensorBoard's profile plugin, Perfetto or chrome://tracing open it)")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="profile from the step after this many completed iterations (Megatron-LM's counting)")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="stop profiling once this many iterations are completed")
    g.add_argument("--profile-ranks", nargs="+", type=int, default=[0], help="global ranks to profile")
    g.add_argument("--timing-log-level", type=int, default=0, choices=range(0, 3),
                   help="megatron-core Timers printed at --log-interval (ms per iteration, min and max over ranks), "
                   "as Megatron-LM: 0 = none beyond the iteration time (no overhead); 1 = once-per-step phases: "
                   "forward-backward, optimizer (and its parts), all-grads-sync, GBA-ITC's passes "
                   "(itc-embeddings-forward, itc-loss), the momentum towers' pass (momentum-forward); 2 = also per-micro-batch ones: batch-generator (data "
                   "wait), forward-compute, backward-compute, pipeline send/recv, itc-gather. Levels 1 and 2 "
                   "synchronise the device around each timer and may slow the step")
    g.add_argument("--timing-log-option", default="minmax", choices=["max", "minmax", "all"],
                   help="timings over ranks: max, min and max, or every rank")
    g.add_argument("--no-barrier-with-L1-time", dest="barrier_with_L1_time", action="store_false",
                   help="no barrier over the ranks before the level-1 timers start and stop (the barrier makes "
                   "their times comparable across ranks)")
    g.add_argument("--log-straggler", action="store_true",
                   help="megatron-core's straggler detector: every --log-interval, rank 0 logs the slowest and "
                   "fastest ranks by forward time, data wait and estimated TFLOP/s, with GPU power, temperature, "
                   "utilisation and clock (CUDA events and NVML: needs nvidia-ml-py; off on CPU)")
    g.add_argument("--disable-straggler-on-startup", action="store_true",
                   help="with --log-straggler: start with the detector off; toggle it at run time through "
                   "--straggler-ctrlr-port (e.g. curl localhost:PORT on rank 0's node)")
    g.add_argument("--straggler-ctrlr-port", type=int, default=65535,
                   help="with --log-straggler: rank 0's TCP port that toggles the detector on and off")
    g.add_argument("--straggler-minmax-count", type=int, default=1,
                   help="with --log-straggler: how many of the slowest and fastest ranks to list")

    g = p.add_argument_group("launch")
    g.add_argument("--dry-run", action="store_true",
                   help="validate the configuration, print parameters per rank and a memory estimate, and exit "
                   "without allocating the model")
    g.add_argument("--world-size", type=int, default=None,
                   help="for --dry-run only: the number of processes to plan for (default: $WORLD_SIZE or 1)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="for --dry-run: memory per GPU to check against")
    return p


def check_communication_flags(args: argparse.Namespace) -> None:
    """--sequence-parallel and the DDP overlap flags, under Megatron-LM's rules."""
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel splits sequences over the tensor-parallel ranks: it needs "
                          "--tensor-model-parallel-size > 1 (drop it at TP 1)")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather overlaps the distributed optimizer's parameter all-gather: it "
                          "needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")


RANDOMNESS_FLAGS = ("drop_path_rate", "hidden_dropout", "attention_dropout")


def check_randomness_flags(args: argparse.Namespace) -> None:
    """--drop-path-rate / --hidden-dropout / --attention-dropout are probabilities in [0, 1). Every combination stays
    exact under GBA-ITC (megatron_m2/random_state.py: pass 3 replays pass 1's random state, and the masked streams of
    --cmlm-weight / --cmim-weight draw from generators of their own)."""
    for flag in RANDOMNESS_FLAGS:
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")


def model_overrides(args: argparse.Namespace) -> dict:
    """build_model's keyword arguments from the flags: TransformerConfig fields (recompute, bf16, sequence
    parallelism, dropout) and the drop-path rate; one place for the trainer and the benchmarks."""
    from megatron_m2.config import transformer_overrides

    return dict(drop_path_rate=args.drop_path_rate,
                **transformer_overrides(args.recompute_activations, args.bf16, args.sequence_parallel,
                                        hidden_dropout=args.hidden_dropout,
                                        attention_dropout=args.attention_dropout))


def check_monitoring_flags(args: argparse.Namespace) -> None:
    """The straggler detector's flags (training/monitoring.py)."""
    import torch

    if args.straggler_minmax_count < 1:
        raise ConfigError(f"--straggler-minmax-count must be >= 1, got {args.straggler_minmax_count}")
    if not 0 < args.straggler_ctrlr_port < 65536:
        raise ConfigError(f"--straggler-ctrlr-port must be a TCP port (1-65535), got {args.straggler_ctrlr_port}")
    if args.log_straggler and not args.dry_run and torch.cuda.is_available():
        try:
            import pynvml  # noqa: F401  (torch.cuda.power_draw and friends read NVML through it)
        except ImportError:
            raise ConfigError("--log-straggler reads GPU power, temperature and clocks through NVML: "
                              "pip install nvidia-ml-py, or drop the flag") from None


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
    check_communication_flags(args)
    for flag in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    per_step = args.micro_batch_size * layout.data_parallel_size
    if args.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {layout.data_parallel_size} = {per_step}; "
            f"use e.g. --global-batch-size {max(per_step, args.global_batch_size // per_step * per_step)}"
        )
    resolve_training_length(args, layout)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0 (0 = decode in the training process), got {args.num_workers}")
    if args.prefetch_factor < 1:
        raise ConfigError(f"--prefetch-factor must be >= 1, got {args.prefetch_factor}")
    if args.dataloader_timeout < 0:
        raise ConfigError(f"--dataloader-timeout must be >= 0 seconds (0 = no timeout), got {args.dataloader_timeout}")
    if args.distributed_timeout_minutes < 1:
        raise ConfigError(f"--distributed-timeout-minutes must be >= 1, got {args.distributed_timeout_minutes}")
    if args.itc_chunk_size < 0:
        raise ConfigError("--itc-chunk-size must be >= 0")
    check_negatives_arguments(args)
    if args.max_consecutive_nan_iterations < 0:
        raise ConfigError(f"--max-consecutive-nan-iterations must be >= 0, got {args.max_consecutive_nan_iterations}")
    for flag in ("cmlm_weight", "cmim_weight"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, flag)}")
    if args.cmlm_weight or args.cmim_weight:
        check_masking(args.text_mask_prob, args.image_mask_ratio, config.num_patches)
    check_randomness_flags(args)
    if (args.cmlm_weight or args.cmim_weight) and args.sequence_parallel:
        raise ConfigError("--sequence-parallel does not run the masked streams of --cmlm-weight / --cmim-weight yet "
                          "(their decoders read whole token sequences): drop --sequence-parallel, or train ITC only")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    if args.exit_interval < 0:
        raise ConfigError(f"--exit-interval must be >= 0, got {args.exit_interval}")
    if args.save_interval and not args.save:
        raise ConfigError("--save-interval needs --save DIR")
    if args.async_save and not args.save:
        raise ConfigError("--async-save needs --save DIR")
    check_monitoring_flags(args)
    if args.eval_interval and not (args.zeroshot_data or args.retrieval_data or args.fine_grained_data):
        raise ConfigError("--eval-interval needs --zeroshot-data, --retrieval-data and/or --fine-grained-data")
    check_eval_data_arguments(args)
    check_wandb_arguments(args)
    _check_profile_arguments(args, world_size)
    _check_data_cleaning_arguments(args)
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
            if args.use_persistent_ckpt_worker:
                raise ConfigError("--use-persistent-ckpt-worker needs CUDA (megatron-core's persistent writer sets "
                                  "a CUDA device and takes the tensors through CUDA IPC); drop it on CPU, where "
                                  "--async-save forks a writer for each save")
        if args.use_persistent_ckpt_worker is None:
            args.use_persistent_ckpt_worker = torch.cuda.is_available()
        if not args.data_path:
            raise ConfigError("--data-path is required (webdataset tar shards); see tools/make_shards.py")
        if not args.tokenizer_model:
            raise ConfigError("--tokenizer-model is required (SentencePiece model); see tools/train_tokenizer.py")
    return layout


def _check_profile_arguments(args: argparse.Namespace, world_size: int) -> None:
    if not args.profile:
        return
    if not args.tensorboard_dir:
        raise ConfigError("--profile writes its traces under --tensorboard-dir: pass --tensorboard-dir DIR")
    if not 0 <= args.profile_step_start < args.profile_step_end:
        raise ConfigError(f"--profile-step-start {args.profile_step_start} must be >= 0 and below "
                          f"--profile-step-end {args.profile_step_end}")
    outside = [rank for rank in args.profile_ranks if not 0 <= rank < world_size]
    if outside:
        raise ConfigError(f"--profile-ranks {outside}: not ranks of this world of {world_size} processes")


def _check_data_cleaning_arguments(args: argparse.Namespace) -> None:
    from megatron_m2.data.filters import SampleFilter
    from megatron_m2.data.randaugment import RandAugment

    SampleFilter(args.min_caption_chars, args.max_aspect_ratio)  # raises ConfigError naming the flag
    if args.randaugment is not None:
        num_ops, magnitude = args.randaugment
        if num_ops != int(num_ops):
            raise ConfigError(f"--randaugment N M: N must be a whole number of operations, got {num_ops}")
        args.randaugment = (int(num_ops), magnitude)
        RandAugment(*args.randaugment)
