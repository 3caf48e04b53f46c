"""The GPU check (issue 15): the first measured figures of the trainer on one GPU, in one command under 8 minutes.

    bash benchmarks/gpu_check.sh [--parts parity,itc,...] [--budget-s 420]   # on the GPU machine
    bash benchmarks/gpu_check.sh --dry-run                                   # every part that can, on CPU

Parts (each one's result, or its error, goes into one JSON; a part that fails does not stop the others):
  parity   the trainer (python -m megatron_m2.train, tiny preset, TP1 x PP1, float32, the digits data, M2's full
           objective ITC + CMIM + CMLM): 6 steps on
           the CPU (CUDA hidden), saving each, then steps 2..6 on CUDA resumed from the CPU's step-1 checkpoint: the
           same per-step losses (rel 1e-4). The CUDA run starts from the CPU's checkpoint because on a GPU megatron
           initialises the weights with the CUDA RNG (other weights than on the CPU); TF32 is off in the CUDA run
           (NVIDIA_TF32_OVERRIDE=0: cuDNN's convolution, the patch embedding, uses TF32 by default).
  itc      megatron_m2.loss.itc_loss on one device (no group): forward + backward time and peak memory of the
           unchunked loss and the chunked one (--itc-chunk-size) at large local batches, bf16 and fp32.
  bf16     a few training steps of the 0.4b and 1b presets (local spec) in float32 and in bf16 from the same weights
           and batches: losses finite and close (first step rel 5e-2, later steps 1e-1); on 0.4b also bf16 with
           --use-distributed-optimizer (same losses as without, rel 1e-3).
  speed    the 1b preset, bf16, local spec, micro-batch sized by the planner for 139 GiB, without and with
           --recompute-activations (at the same micro-batch, and at the largest one recompute allows, at most 512):
           steady-state step time after warm-up (torch.cuda.synchronize after every step), model TFLOP/s
           (arithmetic.model_flops_per_sample x samples/s), hardware TFLOP/s (x 4/3 with recompute: one more forward),
           and MFU / HFU against the H200's measured dense bf16 peak (790 TFLOP/s).
  memory   for the speed part's runs: torch.cuda.max_memory_allocated() against planner.plan_layout's prediction for
           the same settings (without its reserved_gb); the check: the peak stays within the prediction plus the
           planner's reserve (what `fits` promises).
  profile  torch.profiler over one 1b step of the speed part: the ten CUDA kernels with the most time.
  communication  the 10B example's communication flags leave the losses as they are: --overlap-grad-reduce with
           --overlap-param-gather and the distributed optimizer, bf16, 0.4b (rel 1e-5); --sequence-parallel at TP 2
           against TP 2 without it (float32, rel 1e-4), which needs two GPUs (skipped on one).
--dry-run (CPU, CUDA hidden): parity with both runs on CPU, itc at small sizes, bf16 as float32 against float32 on the
tiny preset (megatron's bf16 optimizer needs CUDA), speed and memory on the tiny preset (memory: torch's CPU
allocations counted by torch.profiler), no profile, communication on the tiny preset in float32 (--overlap-grad-reduce
alone; sequence parallelism at TP 2 with gloo).
"""
from __future__ import annotations

# what tests/test_gpu_check.py and the command use; the parts (they import torch when they run) stay in their modules
from benchmarks.gpu_check.runner import (PartTimeout, Skip, check, compare_losses, format_summary, overall_status,
                                         run_parts, time_limit, write_json)
from benchmarks.gpu_check.settings import (DRY_RUN_SETTINGS, ESTIMATE_S, GIB, GPU_MEMORY_GB, GPU_SETTINGS, GRACE_S,
                                           MEMORY_HEADROOM, MICRO_BATCH_CANDIDATES, PARTS, PEAK_TFLOPS, Settings)
from benchmarks.gpu_check.sizing import planned_micro_batch, predicted_memory, speed_plan

__all__ = ["PartTimeout", "Skip", "check", "compare_losses", "format_summary", "overall_status", "run_parts",
           "time_limit", "write_json", "DRY_RUN_SETTINGS", "ESTIMATE_S", "GIB", "GPU_MEMORY_GB", "GPU_SETTINGS",
           "GRACE_S", "MEMORY_HEADROOM", "MICRO_BATCH_CANDIDATES", "PARTS", "PEAK_TFLOPS", "Settings",
           "planned_micro_batch", "predicted_memory", "speed_plan"]
