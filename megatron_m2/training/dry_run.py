"""--dry-run: validate the layout and print parameters per rank and the memory estimate, allocating nothing."""
from __future__ import annotations

import argparse

from megatron_m2.arithmetic import MaskedPasses, decoder_parameters
from megatron_m2.contrastive import describe_mode
from megatron_m2.planner import Hardware, Training, format_table, plan_layout


def masked_passes(args: argparse.Namespace) -> MaskedPasses:
    """The masked-modelling objectives the flags turn on, for the arithmetic and the planner."""
    return MaskedPasses(cmlm=args.cmlm_weight > 0, cmim=args.cmim_weight > 0, text_mask_prob=args.text_mask_prob,
                        image_mask_ratio=args.image_mask_ratio)


def negatives_note(plan, args: argparse.Namespace) -> str:
    """How the step forms its contrastive batch, for --dry-run and tools/plan.py (the counts: plan.negatives)."""
    how = describe_mode(args.itc_batch_accumulation, plan.num_microbatches, args.itc_queue_size, args.momentum_towers)
    if plan.extra_forward:
        how += f"; forward-only passes +{100 * plan.extra_forward:.0f}% compute"
    return how


def dry_run(args: argparse.Namespace) -> None:
    layout = args.layout
    training = Training(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                        bf16=args.bf16, use_distributed_optimizer=args.use_distributed_optimizer,
                        recompute=args.recompute_activations,
                        spec="local" if args.spec == "local" else "te", itc_chunk_size=args.itc_chunk_size,
                        itc_batch_accumulation=args.itc_batch_accumulation, itc_queue_size=args.itc_queue_size,
                        momentum_towers=args.momentum_towers, clip_grad=args.clip_grad > 0,
                        sequence_parallel=args.sequence_parallel, overlap_grad_reduce=args.overlap_grad_reduce,
                        masked=masked_passes(args))
    plan = plan_layout(args.model_config, layout.world_size, layout.tensor_model_parallel_size,
                       layout.pipeline_model_parallel_size, layout.itc_group_size, training,
                       Hardware(gpu_memory_gb=args.gpu_memory_gb))
    print(f"dry run: {args.model} on {layout.world_size} processes: TP {layout.tensor_model_parallel_size} "
          f"PP {layout.pipeline_model_parallel_size} DP {layout.data_parallel_size} "
          f"ITC group {layout.itc_group_size}")
    print(format_table([plan]))
    print(f"contrastive batch: {plan.negatives.describe()} ({negatives_note(plan, args)})")
    masked = training.masked
    if masked.active:
        decoders = decoder_parameters(args.model_config, layout.tensor_model_parallel_size, masked)
        names = " + ".join(name for name, on in (("CMLM", masked.cmlm), ("CMIM", masked.cmim)) if on)
        print(f"masked modelling: {names}: {decoders.total / 1e6:.1f}M decoder parameters on the last stage "
              f"({args.model_config.decoder_num_layers} layers per decoder), the masked streams through the towers "
              "in the forward-backward pass (counted in the table)")
    print("fits" if plan.fits else f"does NOT fit in {args.gpu_memory_gb} GB per GPU")
