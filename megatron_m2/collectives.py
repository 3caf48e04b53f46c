"""Every collective one training step issues on one rank: what, on which group, how often, how many bytes.

Arithmetic on the layout and the model's shapes (no torch), for the planner (planner.py costs each entry with the
hardware's latency and bandwidth) and for tests/test_collectives.py, which counts what the trainer really issues by
wrapping torch.distributed and compares it with `stage_collectives` rank by rank.

What a step of the trainer does (training/step.py), per micro-batch and layer copy (a backbone layer has a vision and
a text copy; a VL layer runs once per modality):
- tensor parallelism (TP > 1), megatron-core's ColumnParallelLinear / RowParallelLinear: forward, an all-reduce of
  the out_proj and fc2 outputs; backward, an all-reduce of the qkv and fc1 input gradients. With sequence
  parallelism (Korthikanti et al. 2022, megatron's implementation) each all-reduce becomes an all-gather before the
  column-parallel GEMM and a reduce-scatter after the row-parallel one; backward, the reduce-scatter's gradient is an
  all-gather, the all-gather's a reduce-scatter, and the column-parallel GEMMs gather their (sequence-sharded) saved
  input again for the weight gradient. Full recompute runs the forward collectives once more in backward.
- Sub-LN (models/sub_ln.py): each of the two Sub-LNs all-reduces its per-token sum and sum of squares (fp32), once
  forward and once backward (all_reduce_with_grad), also under sequence parallelism (it normalises the TP-split
  hidden dimension of the full sequence).
- the vocab-parallel text embedding all-reduces its output (reduce-scatter with sequence parallelism, whose backward
  is an all-gather; the vision embedding's scatter into the sequence-parallel region gathers in backward). With
  sequence parallelism the last stage gathers each tower's final hidden states for the CLS heads (as megatron's GPT
  gathers before its output layer): an all-gather forward, a reduce-scatter backward. How the trainer wires sequence
  parallelism into the embeddings and heads is the assumption here; the rest is megatron-core's.
- pipeline parallelism: one activation message to the next stage per micro-batch, one gradient message to the
  previous stage (the packed [S_img + S_txt, b, h] tensor, sequence-sharded with sequence parallelism).
- GBA-ITC batch accumulation (--itc-batch-accumulation exact, more than one micro-batch): a forward-only pass first,
  with the forward TP collectives and activation messages once more; --momentum-towers: the EMA model's
  forward-only pass, the same collectives once more again (both counted in the "forward" phase). Memory mode and the
  --itc-queue-size queue add none: their negatives are features the loss gathered anyway.
Once per step (the "step" phase):
- the data: the reading rank of a replica broadcasts each micro-batch's text (int64, with a status word) to the
  model-parallel group and its uint8 images to the first stage's TP group (data/broadcast.py);
- the ITC loss on the last stage (loss.py): a 2 x int64 shape check (all-reduce), the all-gather of the rows'
  [image; text] features and, in backward, their reduce-scatter; once per step with batch accumulation (fp32),
  else once per micro-batch (model dtype); with --momentum-towers, the all-gather of the EMA model's [image; text]
  features of the step (fp32, no backward) for the queue;
- data-parallel gradients (megatron-core DDP, grad_reduce_in_fp32): an all-reduce per bucket, or with the
  distributed optimizer a reduce-scatter per bucket and an all-gather of the updated (model-dtype) weights. One
  bucket per stage unless --overlap-grad-reduce, which splits the first stage's grads into buckets of
  max(40M, 1M x DP) elements (megatron-core's default; later stages keep one bucket). With sequence parallelism the
  grads of the replicated LayerNorm weights and row-parallel biases are all-reduced over TP (one flat tensor);
- the optimizer's gradient-norm all-reduce over the model-parallel group (--clip-grad > 0), the loss metrics'
  all-reduce over DP on the last stage (training/step.py reduce_metrics), and the loop's SIGTERM agreement (one
  int32 all-reduce over the world, training/loop.py).
Collectives on a group of one rank move nothing and are left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_m2.arithmetic import stage_parameters
from megatron_m2.config import M2Config, layers_per_stage

if TYPE_CHECKING:
    from megatron_m2.planner import Training

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send")
GROUPS = ("tp", "pp", "dp", "itc", "mp", "world")
PHASES = ("forward", "main", "step")  # accumulation's forward-only pass, the 1F1B pass, once per step
DDP_MIN_BUCKET = 40_000_000  # megatron-core DistributedDataParallel's default bucket: max(40M, 1M x DP) elements
LOSS_METRICS = 4  # itc_loss, logit_scale, i2t_acc, t2i_acc (loss.py)


@dataclass(frozen=True)
class Collective:
    """`calls` calls per step on one rank, each moving a tensor of `bytes` (all-reduce, broadcast: the tensor;
    all-gather: its output; reduce-scatter: its input; send: the message)."""

    kind: str  # the planner's column: tp, pp, dp, itc, data, other
    what: str
    op: str  # one of OPS
    group: str  # one of GROUPS
    group_size: int
    span: int  # consecutive global ranks the group spans (rank order tp-dp-pp): inside a node or not
    phase: str  # one of PHASES
    calls: int
    bytes: float

    @property
    def bytes_sent(self) -> float:
        """Bytes one rank sends per call: ring all-reduce 2(n-1)/n, all-gather / reduce-scatter (n-1)/n of the
        tensor; a broadcast forwards it once (ring), a send sends it."""
        n = self.group_size
        return self.bytes * {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n,
                             "reduce_scatter": (n - 1) / n}.get(self.op, 1.0)


def _layer_groups(config: M2Config, pipeline_model_parallel_size: int, stage: int, masked, phase: str
                  ) -> list[tuple[str, int, int, int]]:
    """(tower, sequence length, layer copies, batch factor) of the layer copies a stage runs per micro-batch: its
    backbone layers' vision and text copies, on the last stage each VL layer once per modality. In the
    forward-backward pass a tower with a masked stream (CMIM: vision, CMLM: text) runs its backbone layers over both
    streams side by side along the batch (models/m2_model.py): the same calls on twice the rows."""
    backbone = layers_per_stage(config, pipeline_model_parallel_size)[stage]
    vl = config.num_vl_layers if stage == pipeline_model_parallel_size - 1 else 0
    groups = []
    for tower, seq, with_masked in (("vision", config.vision_seq_length, masked.cmim),
                                    ("text", config.max_text_length, masked.cmlm)):
        if with_masked and phase == "main" and backbone:
            groups += [(tower, seq, backbone, 2), (tower, seq, vl, 1)]
        else:
            groups.append((tower, seq, backbone + vl, 1))
    return [group for group in groups if group[2]]


def num_microbatches(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    return global_batch_size // (micro_batch_size * data_parallel_size)


def ddp_buckets(parameters: int, data_parallel_size: int, stage: int, overlap_grad_reduce: bool) -> int:
    """Gradient buckets of one stage's DDP buffer (megatron-core: buckets only with overlap, only on stage 0)."""
    if not overlap_grad_reduce or stage > 0:
        return 1
    return max(1, math.ceil(parameters / max(DDP_MIN_BUCKET, 1_000_000 * data_parallel_size)))


def stage_collectives(config: M2Config, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                      data_parallel_size: int, itc_group_size: int, training: "Training", stage: int
                      ) -> list[Collective]:
    """The collectives one step issues on a rank of pipeline stage `stage` (all its TP and DP peers issue the same)."""
    tp, pp, dp, g = tensor_model_parallel_size, pipeline_model_parallel_size, data_parallel_size, itc_group_size
    world = tp * pp * dp
    b, h = training.micro_batch_size, config.hidden_size
    m = num_microbatches(training.global_batch_size, b, dp)
    accumulate = training.accumulates(m)
    sp = training.sequence_parallel and tp > 1
    dt = 2 if training.bf16 else 4
    first, last = stage == 0, stage == pp - 1
    s_img, s_txt = config.vision_seq_length, config.max_text_length
    spans = dict(tp=tp, dp=tp * dp, itc=tp * g, pp=world, mp=world if pp > 1 else tp, world=world)
    sizes = dict(tp=tp, dp=dp, itc=g, pp=pp, mp=tp * pp, world=world)
    out: list[Collective] = []

    def add(kind: str, what: str, op: str, group: str, phase: str, calls: int, nbytes: float) -> None:
        if sizes[group] > 1 and calls:
            out.append(Collective(kind, what, op, group, sizes[group], spans[group], phase, calls, float(nbytes)))

    masked = training.masked
    forward_passes = training.forward_only_passes(m)
    passes = [("main", m)] + ([("forward", m * forward_passes)] if forward_passes else [])
    for phase, calls in passes:
        fwd_only = phase == "forward"
        for tower, seq, n, factor in _layer_groups(config, pp, stage, masked, phase):
            tower = tower if factor == 1 else f"{tower} + masked {tower}"
            act = dt * factor * b * seq * h  # one [s, b, h] activation of the micro-batch (gathered)
            stats = 4 * 2 * factor * b * seq  # Sub-LN: fp32 sum and sum of squares per token
            fwd = 1 if fwd_only else 1 + int(bool(training.recompute))  # forward runs (+ recompute)
            if sp:
                add("tp", f"{tower}: all-gather before qkv/fc1", "all_gather", "tp", phase, 2 * n * fwd * calls, act)
                add("tp", f"{tower}: reduce-scatter after out_proj/fc2", "reduce_scatter", "tp", phase,
                    2 * n * fwd * calls, act)
                if not fwd_only:
                    add("tp", f"{tower}: backward all-gathers (output grads, saved inputs for wgrad)", "all_gather",
                        "tp", phase, 4 * n * calls, act)
                    add("tp", f"{tower}: backward reduce-scatter of qkv/fc1 input grads", "reduce_scatter", "tp",
                        phase, 2 * n * calls, act)
            else:
                add("tp", f"{tower}: all-reduce of out_proj/fc2 outputs" + ("" if fwd == 1 else " (+ recompute)"),
                    "all_reduce", "tp", phase, 2 * n * fwd * calls, act)
                if not fwd_only:
                    add("tp", f"{tower}: backward all-reduce of qkv/fc1 input grads", "all_reduce", "tp", phase,
                        2 * n * calls, act)
            add("tp", f"{tower}: Sub-LN statistics (forward" + ("" if fwd_only else " and backward") +
                (", + recompute)" if fwd > 1 else ")"), "all_reduce", "tp", phase,
                2 * n * (fwd + (0 if fwd_only else 1)) * calls, stats)
        if first:
            text = dt * b * s_txt * h
            if sp:
                add("tp", "text embedding reduce-scatter", "reduce_scatter", "tp", phase, calls, text)
                if not fwd_only:
                    add("tp", "text embedding: backward all-gather", "all_gather", "tp", phase, calls, text)
                    add("tp", "vision embedding: backward all-gather (scatter's gradient)", "all_gather", "tp",
                        phase, calls, dt * b * s_img * h)
            else:
                add("tp", "text embedding all-reduce (vocab-parallel)", "all_reduce", "tp", phase, calls, text)
                if masked.cmlm and not fwd_only:
                    add("tp", "masked text embedding all-reduce (vocab-parallel)", "all_reduce", "tp", phase, calls,
                        text)
        if last and not fwd_only and masked.active:
            _decoder_collectives(config, masked, b, dt, int(bool(training.recompute)), calls, phase, add)
        if last and sp:
            for tower, seq in (("vision", s_img), ("text", s_txt)):
                add("tp", f"{tower}: final hidden states gathered for the head", "all_gather", "tp", phase, calls,
                    dt * b * seq * h)
                if not fwd_only:
                    add("tp", f"{tower}: backward reduce-scatter of the final hidden states", "reduce_scatter", "tp",
                        phase, calls, dt * b * seq * h)
        masked_tokens = 0 if fwd_only else s_img * masked.cmim + s_txt * masked.cmlm
        packed = dt * b * (s_img + s_txt + masked_tokens) * h / (tp if sp else 1)
        if not last:
            add("pp", "activations to the next stage", "send", "pp", phase, calls, packed)
        if not first and not fwd_only:
            add("pp", "gradients to the previous stage", "send", "pp", phase, calls, packed)

    # once per step ----------------------------------------------------------------------------------------------
    # the masks of CMLM (masked ids, targets) and CMIM (patches) travel in the same int64 tensor (data/broadcast.py)
    mask_entries = 2 * b * s_txt * masked.cmlm + b * config.num_patches * masked.cmim
    add("data", "text ids + padding mask (+ the masks) (int64) to the replica", "broadcast", "mp", "step", m,
        8 * (1 + 2 * b * config.max_text_length + mask_entries))
    if masked.cmim:  # CMIM's pixel targets: every stage of the replica gets the images
        add("data", "uint8 images to the whole replica (CMIM's targets)", "broadcast", "mp", "step", m,
            b * config.num_channels * config.image_size**2)
    elif first:
        add("data", "uint8 images to the first stage's TP peers", "broadcast", "tp", "step", m,
            b * config.num_channels * config.image_size**2)
    if last:
        loss_calls, rows = (1, m * b) if accumulate else (m, b)
        features = g * rows * 2 * config.out_dim * 4  # the loss gathers float32 features in every mode
        add("itc", "gather of the [image; text] features", "all_gather", "itc", "step" if accumulate else "main",
            loss_calls, features)
        add("itc", "backward reduce-scatter of their gradients", "reduce_scatter", "itc",
            "step" if accumulate else "main", loss_calls, features)
        add("other", "ITC shape check (2 x int64)", "all_reduce", "itc", "step" if accumulate else "main",
            loss_calls, 4 * 8)
        if training.momentum_towers:
            add("itc", "gather of the momentum towers' [image; text] features (the queue's)", "all_gather", "itc",
                "step", 1, g * m * b * 2 * config.out_dim * 4)
        # each metric as a (sum, count) pair (training/step.py's reduce_metrics)
        metrics = LOSS_METRICS + int(masked.cmlm) + int(masked.cmim)
        add("other", "loss metrics", "all_reduce", "dp", "step", 1, 4 * 2 * metrics)
        if masked.active:
            add("other", "the step's masked token / patch counts (the per-token loss scale)", "all_reduce", "dp",
                "step", 1, 8 * 2)
    params = stage_parameters(config, tp, pp, masked=training.masked)[stage]
    n = params.per_gpu(tp)
    buckets = ddp_buckets(n, dp, stage, training.overlap_grad_reduce)
    if training.use_distributed_optimizer:
        add("dp", f"reduce-scatter of fp32 grads ({buckets} bucket(s))", "reduce_scatter", "dp", "step", buckets,
            4 * n / buckets)
        add("dp", f"all-gather of updated weights ({buckets} bucket(s))", "all_gather", "dp", "step", buckets,
            dt * n / buckets)
    else:
        add("dp", f"all-reduce of fp32 grads ({buckets} bucket(s))", "all_reduce", "dp", "step", buckets,
            4 * n / buckets)
    if sp:
        add("tp", "replicated LayerNorm/bias grads (sequence parallelism)", "all_reduce", "tp", "step", 1,
            4 * params.replicated)
    if training.clip_grad:
        add("other", "gradient norm", "all_reduce", "mp", "step", 1, 4)
    add("other", "SIGTERM agreement (training loop)", "all_reduce", "world", "step", 1, 4)
    return out


def _decoder_collectives(config: M2Config, masked, micro_batch_size: int, dt: int, recompute: int, calls: int,
                         phase: str, add) -> None:
    """The TP collectives of the last stage's cross-modal decoders (models/decoders.py) per micro-batch: each
    decoder layer's three row-parallel outputs (self-attention, cross-attention, FFN) forward (+ recompute), the
    input gradients of its four column-parallel linears (qkv, q, kv of the other tower's states, fc1) backward, its
    three Sub-LNs' statistics; CMLM's vocabulary head (its input gradient, and the vocab-parallel cross-entropy's
    max, target logit and sum all-reduces over the masked tokens, text_mask_prob of the caption)."""
    b, h, n = micro_batch_size, config.hidden_size, config.decoder_num_layers
    s_img, s_txt = config.vision_seq_length, config.max_text_length
    fwd = 1 + recompute
    for name, queries, keys, on in (("CMLM", s_txt, s_img, masked.cmlm), ("CMIM", s_img, s_txt, masked.cmim)):
        if not on:
            continue
        q, k = dt * b * queries * h, dt * b * keys * h
        add("tp", f"{name} decoder: all-reduce of its three output projections", "all_reduce", "tp", phase,
            3 * n * fwd * calls, q)
        add("tp", f"{name} decoder: backward all-reduce of qkv / q / fc1 input grads", "all_reduce", "tp", phase,
            3 * n * calls, q)
        add("tp", f"{name} decoder: backward all-reduce of the kv input grads (the other tower's states)",
            "all_reduce", "tp", phase, n * calls, k)
        add("tp", f"{name} decoder: Sub-LN statistics", "all_reduce", "tp", phase, 3 * n * (fwd + 1) * calls,
            4 * 2 * b * queries)
    if masked.cmlm:
        tokens = b * s_txt * masked.text_mask_prob  # the expected masked tokens of a micro-batch
        add("tp", "CMLM head: backward all-reduce of its input grad", "all_reduce", "tp", phase, calls, dt * tokens * h)
        add("tp", "CMLM vocab-parallel cross-entropy (max, target logit, sum of exps)", "all_reduce", "tp", phase,
            3 * calls, 4 * tokens)
