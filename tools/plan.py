#!/usr/bin/env python
"""Which TP/PP/DP/ITC-group layouts of an M2-Encoder preset fit a cluster, with memory, communication and step time.

    python tools/plan.py --model 10b --num-gpus 32 --gpu-memory-gb 80 --use-distributed-optimizer
    python tools/plan.py --model 10b --num-gpus 32 --use-distributed-optimizer --explain   # why the best is fastest
    python tools/plan.py --model 10b --num-gpus 32 --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 \
        --explain                                                                             # ... or this layout
    python tools/plan.py --model 0.4b --no-bf16 --spec local --micro-batch-size 2 --global-batch-size 2 \
        --recompute none --measure      # check the prediction against two real steps on this machine

Estimates from the assumptions printed above the table (megatron_m2/planner.py explains the model; BENCHMARKS.md
compares it with measured peaks). A '!' after the total marks a layout that does not fit (shown with --all).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_m2 import planner  # noqa: E402
from megatron_m2.config import PRESETS, load_config  # noqa: E402
from megatron_m2.errors import ConfigError  # noqa: E402
from megatron_m2.contrastive import add_negatives_arguments, check_negatives_arguments  # noqa: E402
from megatron_m2.training.dry_run import negatives_note  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    hw, tr = planner.Hardware(), planner.Training()
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and cluster")
    g.add_argument("--model", default="10b", help=f"preset ({', '.join(PRESETS)}) or a model JSON config")
    g.add_argument("--num-gpus", type=int, default=None, help="GPUs in the job (required unless --measure)")
    g.add_argument("--gpus-per-node", type=int, default=hw.gpus_per_node, help="GPUs per node (TP stays inside one)")
    g.add_argument("--gpu-memory-gb", type=float, default=hw.gpu_memory_gb, help="memory per GPU, GiB")
    g = p.add_argument_group("training (the trainer's flags)")
    g.add_argument("--micro-batch-size", type=int, default=tr.micro_batch_size)
    g.add_argument("--global-batch-size", type=int, default=tr.global_batch_size)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=tr.bf16,
                   help="bf16 weights/activations with fp32 master weights; --no-bf16 plans fp32 (CPU) training")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the fp32 master weights and Adam moments over data-parallel ranks")
    g.add_argument("--recompute", choices=["auto", "full", "none"], default="auto",
                   help="activation recompute (--recompute-activations): auto = only where needed to fit")
    g.add_argument("--spec", choices=["te", "local"], default=tr.spec,
                   help="te: TransformerEngine with flash attention (GPU); local: megatron's unfused attention")
    g.add_argument("--itc-chunk-size", type=int, default=0, help="the loss's column chunk (0 = whole logits)")
    add_negatives_arguments(g)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron's sequence parallelism (TP > 1): TP all-reduces become reduce-scatter + "
                   "all-gather and the activations outside the TP regions are split over TP")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=tr.overlap_grad_reduce,
                   help="DDP reduces the first stage's gradients in buckets of max(40M, 1M x DP) elements while "
                   "backward runs (the trainer's GPU default); --no-overlap-grad-reduce: one bucket per stage")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="gradient clipping as the trainer's flag; > 0 adds the gradient-norm all-reduce")
    g.add_argument("--cmlm-weight", type=float, default=0.0,
                   help="> 0: plan CMLM (its decoder and vocabulary head, the masked captions' pass)")
    g.add_argument("--cmim-weight", type=float, default=0.0,
                   help="> 0: plan CMIM (its decoder and pixel head, the masked images' pass)")
    g.add_argument("--text-mask-prob", type=float, default=0.15, help="CMLM: share of caption tokens predicted")
    g.add_argument("--image-mask-ratio", type=float, default=80 / 196, help="CMIM: share of patches masked")
    g = p.add_argument_group("layouts to show")
    g.add_argument("--tensor-model-parallel-size", type=int, default=0, help="only this TP (0 = all)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=0, help="only this PP (0 = all)")
    g.add_argument("--itc-group-size", type=int, default=0, help="only this ITC group size (0 = every divisor of DP)")
    g.add_argument("--itc-batch", type=int, default=None,
                   help="only layouts whose contrastive batch (pairs each ITC loss scores against each other, the "
                   "ITC batch column) is at least this; default: the global batch (GBA-ITC over the whole data-"
                   "parallel group) with --itc-batch-accumulation exact, any with memory / off (their losses "
                   "score a micro-batch's pairs); 0 = any")
    g.add_argument("--explain", action="store_true",
                   help="after the table, the breakdown of the best layout's step time (or of the layout that "
                   "--tensor-model-parallel-size / --pipeline-model-parallel-size / --itc-group-size name): every "
                   "stage's pipeline slot, the GEMMs with their MFU, every collective with calls, bytes and seconds")
    g.add_argument("--top", type=int, default=20, help="show at most this many layouts (0 = all)")
    g.add_argument("--all", action="store_true", help="also show layouts that do not fit, and why some were skipped")
    g.add_argument("--measure", action="store_true",
                   help="instead of planning: run two real training steps of --model on this machine (one process, "
                   "TP=1 PP=1, synthetic data, global batch = micro-batch) and compare the planner's memory "
                   "prediction with the measured peak (GPU: max_memory_allocated; CPU: peak RSS growth)")
    g = p.add_argument_group("hardware assumptions")
    g.add_argument("--peak-tflops", type=float, default=hw.peak_tflops, help="dense bf16 peak per GPU (H100 SXM)")
    g.add_argument("--mfu", type=float, default=hw.mfu,
                   help="MFU of a large GEMM shape in a training step (the step's non-GEMM work included)")
    g.add_argument("--mfu-half-dim", type=float, default=hw.mfu_half_dim,
                   help="a GEMM dimension of this size halves its MFU: each GEMM runs at mfu x prod d / (d + this) "
                   "over its three dimensions")
    g.add_argument("--nvlink-gbps", type=float, default=hw.nvlink_gbps,
                   help="effective per-GPU collective bandwidth inside a node, GB/s")
    g.add_argument("--internode-gbps", type=float, default=hw.internode_gbps,
                   help="effective per-GPU bandwidth between nodes, GB/s")
    g.add_argument("--nvlink-latency-us", type=float, default=hw.nvlink_latency_us,
                   help="latency of one collective call or message inside a node, microseconds")
    g.add_argument("--internode-latency-us", type=float, default=hw.internode_latency_us,
                   help="latency of one collective call or message between nodes, microseconds")
    g.add_argument("--reserved-gb", type=float, default=hw.reserved_gb,
                   help="per-GPU memory for the CUDA context, NCCL buffers and fragmentation, GiB")
    return p


def _check(args: argparse.Namespace) -> None:
    check_negatives_arguments(args)
    if args.num_gpus is None:
        if not args.measure:
            raise ConfigError("--num-gpus is required: the number of GPUs to plan for")
        args.num_gpus = 1
    for flag in ("num_gpus", "gpus_per_node", "micro_batch_size", "global_batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("gpu_memory_gb", "peak_tflops", "nvlink_gbps", "internode_gbps"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("mfu_half_dim", "nvlink_latency_us", "internode_latency_us"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.itc_batch is None:
        # memory / off score a micro-batch's pairs per loss: the global batch is exact accumulation's alone
        args.itc_batch = args.global_batch_size if args.itc_batch_accumulation == "exact" else 0
    if args.itc_batch < 0:
        raise ConfigError(f"--itc-batch must be >= 0 (0 = any contrastive batch), got {args.itc_batch}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu is a fraction of peak in (0, 1], got {args.mfu}")
    for flag in ("cmlm_weight", "cmim_weight"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, flag)}")
    if args.cmlm_weight or args.cmim_weight:
        from megatron_m2.data.masking import check_masking

        check_masking(args.text_mask_prob, args.image_mask_ratio, load_config(args.model).num_patches)
    if args.tensor_model_parallel_size and args.tensor_model_parallel_size not in planner.TENSOR_PARALLEL_SIZES:
        raise ConfigError(f"--tensor-model-parallel-size must be one of {planner.TENSOR_PARALLEL_SIZES}")


def measure(args: argparse.Namespace, config, training: "planner.Training") -> dict[str, float]:
    """Peak memory of two real training steps (the trainer's own model, DDP, optimizer and train_step).

    The second step is the steady state: Adam's moments exist (they are created in the first step) while
    the activations of the forward/backward are alive. On CPU the peak RSS growth also counts the allocator's
    fragmentation, autograd's transient gradient buffers and the optimizer's temporaries, which the planner does not
    model; the process's RSS before the model is built (torch, megatron-core, the process group) is subtracted.
    """
    import time
    import weakref

    import torch

    from megatron_m2 import parallel
    from megatron_m2.training.bench import build_training, rss_bytes, synthetic_batches, trainer_args

    masked = training.masked
    objective_flags = ["--cmlm-weight", str(args.cmlm_weight), "--cmim-weight", str(args.cmim_weight),
                       "--text-mask-prob", str(args.text_mask_prob), "--image-mask-ratio", str(args.image_mask_ratio)]
    pieces_args = trainer_args(args.model, training.micro_batch_size, bf16=training.bf16,
                               recompute=bool(training.recompute), spec=training.spec,
                               use_distributed_optimizer=training.use_distributed_optimizer, config=config,
                               extra=["--clip-grad", "1.0", *objective_flags])
    parallel.initialize_model_parallel(1, 1)
    on_gpu = torch.cuda.is_available()
    batch = synthetic_batches(config, training.micro_batch_size, device="cuda" if on_gpu else "cpu",
                              image_dtype=torch.bfloat16 if training.bf16 else torch.float32,
                              text_mask_prob=masked.text_mask_prob if masked.cmlm else None,
                              image_mask_ratio=masked.image_mask_ratio if masked.cmim else None)[0]

    def batches():
        while True:
            yield batch

    torch.manual_seed(0)
    baseline = torch.cuda.memory_allocated() if on_gpu else rss_bytes("VmRSS")
    pieces = build_training(pieces_args)
    model, data = pieces.model, batches()
    start = time.perf_counter()
    metrics = [pieces.step(data)]
    # The peak of what autograd keeps alive for backward in the second step (unique storages, weights excluded):
    # the planner's "activations" term, measured without the allocator's noise. A storage counts from the first time
    # an op saves it until the last saved reference to it is freed.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live: dict[int, list[int]] = {}  # storage -> [bytes, saved references alive]
    saved = dict(now=0, peak=0)

    def release(ptr: int) -> None:
        live[ptr][1] -= 1
        if not live[ptr][1]:
            saved["now"] -= live.pop(ptr)[0]

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights:
            entry = live.setdefault(ptr, [tensor.untyped_storage().nbytes(), 0])
            if not entry[1]:
                saved["now"] += entry[0]
                saved["peak"] = max(saved["peak"], saved["now"])
            entry[1] += 1
            weakref.finalize(tensor, release, ptr)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        metrics.append(pieces.step(data))
    seconds = (time.perf_counter() - start) / 2
    peak = torch.cuda.max_memory_allocated() if on_gpu else rss_bytes("VmHWM")
    parallel.destroy_model_parallel()
    return dict(measured=float(peak - baseline), saved=float(saved["peak"]), seconds_per_step=seconds,
                loss=metrics[-1].get("itc_loss", float("nan")),
                device=torch.cuda.get_device_name() if on_gpu else "cpu")


def _report_measurement(args: argparse.Namespace, config, training: "planner.Training") -> int:
    predicted = planner.plan_layout(config, 1, 1, 1, 0, training, planner.Hardware(
        gpu_memory_gb=1e6, reserved_gb=0.0))
    result = measure(args, config, training)
    mem = predicted.memory
    print(f"{args.model} on {result['device']}, micro-batch {training.micro_batch_size}, "
          f"{'bf16' if training.bf16 else 'fp32'}, {training.spec} spec, recompute {predicted.recompute}: "
          f"{result['seconds_per_step']:.2f} s/step, loss {result['loss']:.3f}")
    print(f"predicted GiB: params {mem['params'] / planner.GB:.3f} grads {mem['grads'] / planner.GB:.3f} optimizer "
          f"{mem['optimizer'] / planner.GB:.3f} activations {mem['activations'] / planner.GB:.3f} itc "
          f"{mem['itc'] / planner.GB:.4f} total {mem['total'] / planner.GB:.3f}")
    print(f"measured GiB: peak saved for backward {result['saved'] / planner.GB:.3f} (/ predicted activations = "
          f"{result['saved'] / mem['activations']:.2f}); peak {result['measured'] / planner.GB:.3f} "
          f"(/ predicted total = {result['measured'] / mem['total']:.2f})")
    return 0


def training_from_args(args: argparse.Namespace) -> "planner.Training":
    return planner.Training(
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, bf16=args.bf16,
        use_distributed_optimizer=args.use_distributed_optimizer,
        recompute={"auto": None, "full": True, "none": False}[args.recompute], spec=args.spec,
        itc_chunk_size=args.itc_chunk_size, itc_batch_accumulation=args.itc_batch_accumulation,
        itc_queue_size=args.itc_queue_size, momentum_towers=args.momentum_towers,
        sequence_parallel=args.sequence_parallel, overlap_grad_reduce=args.overlap_grad_reduce,
        clip_grad=args.clip_grad > 0,
        masked=planner.MaskedPasses(args.cmlm_weight > 0, args.cmim_weight > 0, args.text_mask_prob,
                                    args.image_mask_ratio))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        config = load_config(args.model)
        hardware = planner.Hardware(
            gpu_memory_gb=args.gpu_memory_gb, gpus_per_node=args.gpus_per_node, peak_tflops=args.peak_tflops,
            mfu=args.mfu, nvlink_gbps=args.nvlink_gbps, internode_gbps=args.internode_gbps,
            reserved_gb=args.reserved_gb, nvlink_latency_us=args.nvlink_latency_us,
            internode_latency_us=args.internode_latency_us, mfu_half_dim=args.mfu_half_dim)
        training = training_from_args(args)
        if args.measure:
            return _report_measurement(args, config, training)
        plans, skipped = planner.plan_all(config, args.num_gpus, training, hardware, args.itc_group_size,
                                          args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                          itc_batch=args.itc_batch)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    fitting = [p for p in plans if p.fits]
    shown = plans if args.all else fitting
    if args.top:
        shown = shown[:args.top]
    total = sum(s.total for s in planner.stage_parameters(config, masked=training.masked))
    print(f"{args.model}: {total / 1e9:.3f}B parameters, {args.num_gpus} GPUs ({args.gpus_per_node}/node, "
          f"{args.gpu_memory_gb:g} GiB), micro-batch {args.micro_batch_size}, global batch {args.global_batch_size}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {'distributed' if args.use_distributed_optimizer else 'replicated'} "
          f"optimizer, {args.spec} spec")
    print(f"assumptions: {args.peak_tflops:g} TFLOP/s peak x MFU {args.mfu:g} for large GEMMs (x d / (d + "
          f"{args.mfu_half_dim:g}) per GEMM dimension); NVLink {args.nvlink_gbps:g} GB/s + {args.nvlink_latency_us:g}"
          f" us, inter-node {args.internode_gbps:g} GB/s + {args.internode_latency_us:g} us per GPU and call; "
          f"{args.reserved_gb:g} GiB reserved; all communication exposed")
    wanted = (f"contrastive batch >= {args.itc_batch} pairs (--itc-batch"
              + (", default: the global batch)" if args.itc_batch == args.global_batch_size else ")")
              if args.itc_batch else "any contrastive batch (--itc-batch 0)")
    narrower = sum(1 for s in skipped if "--itc-batch" in s)
    print(f"{len(fitting)} of {len(plans)} valid layouts with {wanted} fit"
          + (f" ({narrower} with a smaller contrastive batch left out)" if narrower else "")
          + f"; showing {len(shown)} (fastest first)")
    if shown:
        print(planner.format_table(shown))
        best = shown[0]
        print(f"contrastive batch of the first layout: {best.negatives.describe()} ({negatives_note(best, args)})")
    if args.all and skipped:
        print("skipped:\n  " + "\n  ".join(skipped))
    if args.explain and (fitting or plans):
        print("\n" + planner.format_explain((fitting or plans)[0], hardware))
    if not fitting:
        if narrower and not plans:
            print(f"no layout gives a contrastive batch of {args.itc_batch} pairs: lower --itc-batch (0 = any) or "
                  "drop --itc-group-size", file=sys.stderr)
            return 1
        print("nothing fits: try --use-distributed-optimizer, --recompute full, a smaller --micro-batch-size or "
              "more GPUs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
