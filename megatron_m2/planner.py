"""Memory and communication planner: which TP/PP/DP/ITC-group layouts of a preset fit a cluster, and how fast.

Everything here is arithmetic on the model's shapes (no torch, no allocation), so `tools/plan.py` and the trainer's
--dry-run can call it anywhere. The numbers are estimates from stated assumptions; BENCHMARKS.md compares them with
measured peaks. Sizes are in bytes, communication in bytes sent per GPU per optimizer step.

Model of a training step (megatron-core as the trainer configures it, training/optimizer.py):
- weights in bf16 (2 B) or fp32 (4 B); gradients in an fp32 grad buffer (grad_reduce_in_fp32); Adam keeps fp32
  master weights (bf16 only) and two fp32 moments, sharded over data-parallel ranks by the distributed optimizer.
- activations per transformer layer and token: see `layer_activation_bytes`; --sequence-parallel (TP > 1) splits the
  replicated part (the LayerNorm inputs and outputs, the residual stream, a stage's input) over TP and pads each
  token stream to a multiple of TP (models/sequence_parallel.py; Korthikanti et al. 2022). 1F1B keeps up to PP - stage micro-batches in flight on a stage; with full recompute a
  layer keeps only its input, plus one layer's working set during its recompute.
- rank order tp-dp-pp (megatron-core's): a TP group is on one node; a DP or ITC group spans tp x size ranks; a PP group
  spans the whole job. A group whose span fits in one node uses NVLink, otherwise the inter-node network.
- communication: every collective of a step, counted per rank by `collectives.stage_collectives` (TP all-reduces or
  sequence-parallel all-gathers/reduce-scatters, the Sub-LN statistics, PP messages, DP buckets, the ITC gather, the
  data broadcast, the small per-step ones); each call costs the domain's latency + bytes sent / bandwidth
  (`Hardware.nvlink_*`, `Hardware.internode_*`), all counted as exposed (an upper bound: on GPU the trainer overlaps
  the DP gradient reduction with backward).
- compute: the GEMMs of `arithmetic.stage_gemms`, each at `gemm_mfu` of peak: `Hardware.mfu` (the MFU of a large
  shape, the step's non-GEMM work included) times d / (d + `Hardware.mfu_half_dim`) for each of its three
  dimensions, so small GEMMs (few text tokens per micro-batch, a narrow TP shard, short attention) run slower.
- step time: the 1F1B pass takes (M + PP - 1) slots of its slowest stage (compute + TP collectives + PP messages of
  one micro-batch: the pipeline bubble is the PP - 1 extra slots), then the once-per-step collectives of the stage
  that needs the longest for them.
- GBA-ITC batch accumulation (training/batch_accumulation.py), with more than one micro-batch per step: one more
  forward pass (+1/3 of compute, +1/4 with full recompute), its TP all-reduces and PP sends, the loss over the rank's
  whole step (M x b rows against g x M x b columns), the cached embeddings and gradients.
- inputs: a step holds its M micro-batches on the device (uint8 images on the first stage, token ids everywhere); each
  micro-batch's normalised images exist only while its forward needs them.
- the masked-modelling objectives (`Training.masked`, CMLM / CMIM): their decoders' parameters on the last stage
  (arithmetic.stage_parameters), the masked streams through the backbone towers in the forward-backward pass (their
  activations, GEMMs, TP collectives and PP sends; not in GBA-ITC's forward-only pass), the decoders' activations,
  GEMMs and collectives and the CMLM logits of the masked tokens on the last stage.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

from megatron_m2.arithmetic import Gemm, MaskedPasses, model_flops_per_sample, stage_gemms, stage_parameters
from megatron_m2.collectives import Collective, stage_collectives
from megatron_m2.contrastive import ContrastiveBatch, contrastive_batch
from megatron_m2.config import M2Config, layers_per_stage, padded_length, validate_parallel_shapes
from megatron_m2.errors import ConfigError

GB = 1024**3
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Hardware:
    """Assumptions about one GPU and the network; defaults are an H100 SXM 80 GB node with 8 x 400 Gb/s InfiniBand."""

    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak of an H100 SXM
    mfu: float = 0.40  # the MFU large GEMM shapes approach in a training step (non-GEMM work included; no bubble)
    nvlink_gbps: float = 300.0  # effective collective bandwidth per GPU inside a node, GB/s (NVLink 4: 450 raw)
    internode_gbps: float = 40.0  # effective per-GPU bandwidth between nodes, GB/s (400 Gb/s NIC per GPU = 50 raw)
    reserved_gb: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    # read + decode + augment + tokenise of one 500x375 JPEG (72 KiB) to 224 px per CPU-second (Pillow): 181 measured
    # by benchmarks/data_loader.py on the 2-core development machine (BENCHMARKS.md "Data loader"), rounded down
    decode_samples_per_core_s: float = 180.0
    # Latency of one collective call or p2p message (NCCL, small messages): order of magnitude of nccl-tests'
    # all_reduce of a few bytes on an 8 x H100 NVLink node (~10 us) and across InfiniBand nodes (a few 10 us).
    nvlink_latency_us: float = 10.0
    internode_latency_us: float = 25.0
    # A GEMM dimension of this size halves the MFU of its GEMM (tile and wave quantisation: a 128 x 128 output tile
    # per SM); 4096 keeps 97%, 416 (8 captions of 52 tokens) 76%, 52 (one caption's attention) 29%.
    mfu_half_dim: float = 128.0


@dataclass(frozen=True)
class Training:
    """The training flags that change memory or communication."""

    micro_batch_size: int = 8
    global_batch_size: int = 4096
    bf16: bool = True
    use_distributed_optimizer: bool = False
    recompute: Optional[bool] = None  # None = off if the layout fits without it, else on
    spec: str = "te"  # te: flash attention (no s^2 activations); local: megatron's unfused attention
    itc_chunk_size: int = 0  # the loss's column chunk; 0 = the whole group's logits at once
    # GBA-ITC (contrastive.py): exact = one loss over all micro-batches of a step (one extra forward); memory = one
    # loss per micro-batch with the step's earlier micro-batches' features as detached negatives; off = one per
    # micro-batch. A bool is read as exact (True) / off (False), as the flag once was.
    itc_batch_accumulation: str = "exact"
    itc_queue_size: int = 0  # --itc-queue-size: queued negatives per row (their bytes on the last stage)
    momentum_towers: float = 0.0  # --momentum-towers: an EMA copy of the model and its forward-only pass per step
    sequence_parallel: bool = False  # --sequence-parallel (TP > 1): activations and collectives change
    overlap_grad_reduce: bool = False  # --overlap-grad-reduce: first-stage grads in buckets of max(40M, 1M x DP)
    clip_grad: bool = True  # --clip-grad > 0: the optimizer all-reduces the gradient norm
    masked: MaskedPasses = MaskedPasses()  # CMLM / CMIM on (--cmlm-weight / --cmim-weight > 0)

    def __post_init__(self) -> None:
        if isinstance(self.itc_batch_accumulation, bool):
            object.__setattr__(self, "itc_batch_accumulation", "exact" if self.itc_batch_accumulation else "off")

    def accumulates(self, num_microbatches: int) -> bool:
        """Batch accumulation's forward-only pass runs (exact mode, more than one micro-batch)."""
        return self.itc_batch_accumulation == "exact" and num_microbatches > 1

    def forward_only_passes(self, num_microbatches: int) -> int:
        """Forward-only passes over the step's micro-batches besides the 1F1B pass: exact accumulation's pass 1 and
        the momentum towers' pass."""
        return int(self.accumulates(num_microbatches)) + int(bool(self.momentum_towers))


@dataclass(frozen=True)
class Plan:
    """Per-GPU memory (of the stage that needs the most), communication and time of one layout."""

    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    itc_group_size: int
    recompute: bool
    num_microbatches: int
    peak_stage: int
    parameters_per_gpu: int
    memory: dict[str, float]  # bytes: params, grads, optimizer, activations, itc, reserved, total
    communication: dict[str, float]  # bytes per GPU per step: tp, pp, dp, itc
    time: dict[str, float]  # seconds per step: compute, tp, pp, dp, itc, step
    fits: bool
    contrastive_batch: int = 0  # pairs each contrastive loss scores against each other (per ITC group)
    extra_forward: float = 0.0  # compute added by the forward-only passes (accumulation, momentum), as a fraction
    cpu_cores_per_gpu: float = 0.0  # data decoding that keeps up with the step (one decode per model replica)
    stages: tuple = ()  # StageCost per pipeline stage: what the time is made of (format_explain prints it)
    critical_stage: int = 0  # the stage whose 1F1B slot paces the pipeline

    @property
    def samples_per_second(self) -> float:
        return 0.0 if not self.time["step"] else self._global_batch / self.time["step"]

    _global_batch: int = 0
    negatives: Optional[ContrastiveBatch] = None  # pairs and negatives per row (contrastive.py)


# ---------------------------------------------------------------------------------------------------------------------
# activations

def layer_activation_bytes(config: M2Config, tokens: int, seq_length: int, tensor_model_parallel_size: int,
                           bf16: bool, spec: str, sequence_parallel: bool = False) -> float:
    """Bytes one layer copy keeps for backward, for `tokens` = micro-batch x seq_length tokens.

    Per token, in the activation dtype (dt): the pre-LN inputs and outputs (4h, replicated over TP; split over TP
    with sequence parallelism, which saves the column-parallel GEMMs' inputs before their all-gather), q, k, v and the
    out_proj input (4h/t), the GELU input and the fc2 input (2f/t). The two Sub-LNs (models/sub_ln.py) keep, without
    TP, their inputs (torch's layer_norm: dt x (h + f)) and a mean and rstd per token (16 B); under TP, their
    normalised fp32 shards and an rstd per token: 4 B x (h + f)/t + 8 B. Flash attention (te spec) keeps its output,
    which is the Sub-LN's input: a tensor of its own only under TP in bf16.
    The local spec's unfused attention keeps the softmax probabilities, a x s / t per token: fp32 for the softmax
    backward, plus the bf16 copy that the probs x V matmul keeps when training in bf16.
    """
    h, f, t = config.hidden_size, config.ffn_hidden_size, tensor_model_parallel_size
    dt = 2 if bf16 else 4
    sub_ln = dt * (h + f) + 16 if t == 1 else 4 * (h + f) / t + 8
    per_token = dt * (4 * h / (t if sequence_parallel else 1) + 4 * h / t + 2 * f / t) + sub_ln
    if spec == "te" and bf16 and t > 1:
        per_token += dt * h / t
    if spec == "local":
        per_token += (4 + (dt if bf16 else 0)) * config.num_attention_heads * seq_length / t
    return tokens * per_token


def cross_attention_bytes(config: M2Config, queries: int, keys: int, key_length: int, tensor_model_parallel_size: int,
                          bf16: bool, spec: str) -> float:
    """Bytes a decoder layer's cross-attention sublayer keeps for backward, for `queries` query tokens and `keys` key
    tokens (micro-batch x length): per query its pre-LN input and output, q, the context and its Sub-LN (as
    layer_activation_bytes counts one); per key k and v; the local spec's softmax over key_length keys per query."""
    h, t = config.hidden_size, tensor_model_parallel_size
    dt = 2 if bf16 else 4
    sub_ln = dt * h + 8 if t == 1 else 4 * h / t + 4  # its Sub-LN, as layer_activation_bytes counts them
    per_query = dt * (2 * h + 2 * h / t) + sub_ln
    if spec == "local":
        per_query += (4 + (dt if bf16 else 0)) * config.num_attention_heads * key_length / t
    return queries * per_query + keys * dt * 2 * h / t


def _decoder_streams(config: M2Config, masked: MaskedPasses) -> list[tuple[int, int]]:
    """(query length, key length) of each decoder layer: CMLM's queries are the caption, CMIM's the image."""
    s_img, s_txt = config.vision_seq_length, config.max_text_length
    streams = [(s_txt, s_img)] * masked.cmlm + [(s_img, s_txt)] * masked.cmim
    return [stream for stream in streams for _ in range(config.decoder_num_layers)]


def _masked_tokens(config: M2Config, masked: MaskedPasses) -> int:
    """Tokens of the masked streams per sample (the extra length of the packed activation)."""
    return config.vision_seq_length * masked.cmim + config.max_text_length * masked.cmlm


def _stage_activation_bytes(config: M2Config, backbone_layers: int, is_first: bool, is_last: bool,
                            tp: int, training: Training, recompute: bool) -> tuple[float, float]:
    """(bytes kept per in-flight micro-batch, bytes of the one-layer working set) for one stage."""
    b, h = training.micro_batch_size, config.hidden_size
    dt = 2 if training.bf16 else 4
    split = tp if training.sequence_parallel and tp > 1 else 1  # the ranks a token stream is split over
    s_img, s_txt = padded_length(config.vision_seq_length, split), padded_length(config.max_text_length, split)
    masked = training.masked

    def copy_bytes(seq: int) -> float:
        return layer_activation_bytes(config, b * seq, seq, tp, training.bf16, training.spec, split > 1)

    # the masked streams (forward-backward pass) go through the backbone layers too, not through the VL layers
    streams = (s_img, s_txt) + (s_img,) * masked.cmim + (s_txt,) * masked.cmlm
    layers = [s for s in streams for _ in range(backbone_layers)]
    if is_last:
        layers += [s for s in (s_img, s_txt) for _ in range(config.num_vl_layers)]
    decoders = _decoder_streams(config, masked) if is_last else []
    full = sum(copy_bytes(seq) for seq in layers) + sum(
        copy_bytes(q) + cross_attention_bytes(config, b * q, b * k, k, tp, training.bf16, training.spec)
        for q, k in decoders)
    layers += [q for q, _ in decoders]
    # the stage's input (received or embedded), kept for backward
    boundary = dt * b * (s_img + s_txt + _masked_tokens(config, masked)) * h / split
    if is_last and masked.cmlm:  # the masked tokens' fp32 vocab-parallel logits and the cross-entropy's softmax
        boundary += 2 * 4 * b * masked.text_mask_prob * s_txt * config.vocab_size / tp
    if is_first:
        boundary += dt * b * config.num_channels * config.image_size**2
    if recompute:
        kept = boundary + sum(dt * b * seq * h / split for seq in layers)
        working = max((copy_bytes(seq) for seq in layers), default=0.0)
        return kept, working
    return boundary + full, 0.0


def itc_bytes(config: M2Config, micro_batch_size: int, itc_group_size: int, chunk_size: int = 0,
              num_microbatches: int = 1, negatives: int = 0, held_rows: int = 0) -> float:
    """Loss memory on the last stage: the gathered image and text features of the group (fp32) and, for both
    directions, the logits and their softmax of b_local x (g x b_local) (or x chunk with --itc-chunk-size).

    With batch accumulation (num_microbatches M > 1) b_local is the rank's whole step, M x micro-batch rows, and the
    step also keeps the rows' embeddings and their cached gradients (fp32, both modalities).
    negatives: detached columns each row also scores (the queue; memory mode's earlier micro-batches), which widen
    the logits and are concatenated to the gathered columns (a copy per modality); held_rows: feature rows the step
    keeps for them (the --itc-queue-size queue; memory mode's recorded micro-batches), fp32 image + text."""
    b, g, d = micro_batch_size * num_microbatches, itc_group_size, config.out_dim
    columns = g * b + negatives if not chunk_size else min(chunk_size, g * b + negatives)
    cache = 2 * 2 * b * d if num_microbatches > 1 else 0
    concatenated = 2 * (g * b + negatives) * d if negatives else 0
    return 4 * (2 * g * b * d + 2 * 2 * b * columns + cache + concatenated + 2 * held_rows * d)


# ---------------------------------------------------------------------------------------------------------------------
# the plan of one layout

KINDS = ("tp", "pp", "dp", "itc", "data", "other")  # the time and communication columns, besides compute


def _bandwidth(hw: Hardware, span: int) -> float:
    return (hw.nvlink_gbps if span <= hw.gpus_per_node else hw.internode_gbps) * 1e9


def _latency(hw: Hardware, span: int) -> float:
    return (hw.nvlink_latency_us if span <= hw.gpus_per_node else hw.internode_latency_us) * 1e-6


def collective_seconds(collective: Collective, hardware: Hardware) -> float:
    """All calls of one collective in a step: each the latency of its domain plus its bytes sent / bandwidth."""
    span = collective.span
    return collective.calls * (_latency(hardware, span) + collective.bytes_sent / _bandwidth(hardware, span))


def gemm_mfu(gemm: Gemm, hardware: Hardware) -> float:
    """The fraction of peak a GEMM of this shape reaches: Hardware.mfu, less for each small dimension."""
    factor = 1.0
    for dim in (gemm.m, gemm.n, gemm.k):
        factor *= dim / (dim + hardware.mfu_half_dim)
    return hardware.mfu * factor


@dataclass(frozen=True)
class StageCost:
    """What one pipeline stage's GPU spends per step: its forward GEMMs of one micro-batch (with their MFU and
    seconds) and its collectives (seconds per step)."""

    gemms: tuple[tuple[Gemm, float, float], ...]  # (gemm, mfu, forward seconds per micro-batch)
    collectives: tuple[tuple[Collective, float], ...]  # (collective, seconds per step)
    units: int  # forward passes a micro-batch costs in the 1F1B pass: forward + backward (x2) (+ recompute)
    num_microbatches: int
    accumulates: bool  # GBA-ITC batch accumulation's forward-only pass runs first
    layers: int = 0  # layers of each tower on the stage (backbone + VL)
    forward_only_compute: float = 0.0  # seconds of one micro-batch's forward in a forward-only pass (no masked stream)
    forward_only_passes: int = 0  # accumulation's pass 1 and the momentum towers' pass (0, 1 or 2)

    @property
    def forward_compute(self) -> float:
        return sum(seconds for _, _, seconds in self.gemms)

    def comm(self, phase: str, kind: Optional[str] = None) -> float:
        return sum(t for c, t in self.collectives if c.phase == phase and kind in (None, c.kind))

    def bytes_sent(self, kind: str) -> float:
        return sum(c.calls * c.bytes_sent for c, _ in self.collectives if c.kind == kind)

    @property
    def main_slot(self) -> float:
        """One micro-batch of the 1F1B pass: forward and backward compute, its TP collectives and PP messages."""
        return self.units * self.forward_compute + self.comm("main") / self.num_microbatches

    @property
    def forward_slot(self) -> float:
        """One micro-batch of the forward-only passes (batch accumulation's, the momentum towers'; 0 without them)."""
        if not self.forward_only_passes:
            return 0.0
        return self.forward_only_passes * self.forward_only_compute + self.comm("forward") / self.num_microbatches


def stage_cost(config: M2Config, tp: int, pp: int, dp: int, itc_group_size: int, training: Training,
               hardware: Hardware, stage: int) -> StageCost:
    """The GEMMs and collectives of one stage's GPU, costed (training.recompute resolved to True/False)."""
    def costed(gemms: list[Gemm]) -> list[tuple[Gemm, float, float]]:
        return [(g, gemm_mfu(g, hardware), g.flops / (hardware.peak_tflops * 1e12 * gemm_mfu(g, hardware)))
                for g in gemms]

    gemms = costed(stage_gemms(config, training.micro_batch_size, tp, pp, stage, training.masked))
    # GBA-ITC's forward-only pass runs the ITC model alone: no masked stream, no decoder
    forward_only = sum(seconds for _, _, seconds in costed(stage_gemms(config, training.micro_batch_size, tp, pp,
                                                                         stage)))
    collectives = [(c, collective_seconds(c, hardware))
                   for c in stage_collectives(config, tp, pp, dp, itc_group_size, training, stage)]
    m = training.global_batch_size // (training.micro_batch_size * dp)
    layers = layers_per_stage(config, pp)[stage] + (config.num_vl_layers if stage == pp - 1 else 0)
    return StageCost(tuple(gemms), tuple(collectives), 4 if training.recompute else 3, m,
                     training.accumulates(m), layers, forward_only, training.forward_only_passes(m))


def _step_time(costs: list[StageCost], m: int, pp: int) -> tuple[dict[str, float], int]:
    """Seconds per step by column, and the stage that paces the 1F1B pass.

    Each pipelined pass takes M + PP - 1 slots of its slowest stage (its bubble: the PP - 1 extra ones); the
    once-per-step collectives follow, those of the stage that needs longest for them."""
    slots = m + pp - 1
    critical = max(range(pp), key=lambda s: costs[s].main_slot)
    forward = max(range(pp), key=lambda s: costs[s].forward_slot)
    last_out = max(range(pp), key=lambda s: costs[s].comm("step"))
    main, fwd, step = costs[critical], costs[forward], costs[last_out]
    time = dict(compute=slots * (main.units * main.forward_compute
                                 + fwd.forward_only_passes * fwd.forward_only_compute))
    for kind in KINDS:
        time[kind] = slots * (main.comm("main", kind) + fwd.comm("forward", kind)) / m + step.comm("step", kind)
    time["step"] = sum(time.values())
    return time, critical


def plan_layout(config: M2Config, num_gpus: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                itc_group_size: int = 0, training: Training = Training(), hardware: Hardware = Hardware()) -> Plan:
    """Memory, communication and step time of one layout; raises ConfigError if the layout is impossible."""
    from megatron_m2.parallel import validate_layout

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    layout = validate_layout(num_gpus, tp, pp, itc_group_size or None)
    validate_parallel_shapes(config, tp, pp)
    if tp > hardware.gpus_per_node:
        raise ConfigError(f"--tensor-model-parallel-size {tp} is larger than --gpus-per-node {hardware.gpus_per_node}"
                          "; TP must stay inside a node")
    dp, g = layout.data_parallel_size, layout.itc_group_size
    b = training.micro_batch_size
    if training.global_batch_size % (b * dp):
        raise ConfigError(f"--global-batch-size {training.global_batch_size} is not divisible by --micro-batch-size "
                          f"{b} x data-parallel size {dp}")
    m = training.global_batch_size // (b * dp)
    accumulate = training.accumulates(m)
    negatives = contrastive_batch(g, b, m, training.itc_batch_accumulation, training.itc_queue_size)
    loss_rows = negatives.pairs // g  # a rank's rows in one contrastive loss
    # the loss's detached columns (the queue, memory mode's earlier micro-batches) and the rows the step keeps for them
    extra_columns = negatives.max_negatives + 1 - negatives.pairs + training.itc_queue_size
    held_rows = training.itc_queue_size + (g * m * b if training.itc_batch_accumulation == "memory" and m > 1 else 0)
    if training.recompute is None:
        plain = plan_layout(config, num_gpus, tp, pp, itc_group_size,
                            dataclasses.replace(training, recompute=False), hardware)
        if plain.fits:
            return plain
        return plan_layout(config, num_gpus, tp, pp, itc_group_size,
                           dataclasses.replace(training, recompute=True), hardware)
    recompute = training.recompute

    dt = 2 if training.bf16 else 4
    optimizer_bytes = 12 if training.bf16 else 8  # (fp32 master +) two fp32 Adam moments
    stages = stage_parameters(config, tp, pp, training.masked)
    # --momentum-towers: an EMA copy of the model without the decoders, in the model's dtype (+ an fp32 shadow in bf16)
    momentum_bytes = [p.per_gpu(tp) * (dt + (4 if training.bf16 else 0)) if training.momentum_towers else 0
                      for p in stage_parameters(config, tp, pp)]
    per_stage_layers = layers_per_stage(config, pp)
    memories = []
    for stage, (params, backbone_layers) in enumerate(zip(stages, per_stage_layers)):
        n = params.per_gpu(tp)
        kept, working = _stage_activation_bytes(config, backbone_layers, stage == 0, stage == pp - 1, tp, training,
                                                recompute)
        in_flight = min(pp - stage, m)
        memory = dict(
            params=float(n * dt + momentum_bytes[stage]),
            grads=float(n * 4),
            optimizer=n * optimizer_bytes / (dp if training.use_distributed_optimizer else 1),
            # the step reads its m micro-batches before its schedule runs (batch accumulation replays them) and holds
            # them on the device as they came: uint8 images on the first stage, token ids and padding masks on all
            activations=kept * in_flight + working + m * b * _batch_bytes(config, images=stage == 0),
            itc=itc_bytes(config, b, g, training.itc_chunk_size, m if accumulate else 1, extra_columns, held_rows)
            if stage == pp - 1 else 0.0,
            reserved=hardware.reserved_gb * GB,
        )
        memory["total"] = sum(memory.values())
        memories.append((memory, n))
    peak_stage = max(range(pp), key=lambda s: memories[s][0]["total"])
    memory, n_peak = memories[peak_stage]

    training = dataclasses.replace(training, recompute=recompute)
    costs = [stage_cost(config, tp, pp, dp, g, training, hardware, stage) for stage in range(pp)]
    communication = {kind: max(c.bytes_sent(kind) for c in costs) for kind in KINDS}
    # in forward-pass units: forward + backward = 3, full recompute +1, batch accumulation's extra forward +1 and the
    # momentum towers' +1 (of the ITC-only model: the masked streams are not in those passes)
    units = 4 if recompute else 3
    extra_forward = (training.forward_only_passes(m) * model_flops_per_sample(config)
                     / (units * model_flops_per_sample(config, training.masked)))
    time, critical = _step_time(costs, m, pp)
    return Plan(tp, pp, dp, g, recompute, m, peak_stage, n_peak, memory, communication, time,
                fits=memory["total"] <= hardware.gpu_memory_gb * GB, contrastive_batch=g * loss_rows,
                extra_forward=extra_forward, _global_batch=training.global_batch_size, negatives=negatives,
                cpu_cores_per_gpu=decode_cores_per_gpu(training.global_batch_size, time["step"], num_gpus, hardware),
                stages=tuple(costs), critical_stage=critical)


def decode_cores_per_gpu(global_batch_size: int, step_time_s: float, num_gpus: int, hardware: Hardware) -> float:
    """CPU cores per GPU that decode a step's samples within the step (each sample once per model replica: its reader
    broadcasts to the TP and PP peers). The readers sit on the first pipeline stage, so with PP across nodes those
    nodes need PP times this average."""
    return global_batch_size / (step_time_s * hardware.decode_samples_per_core_s) / num_gpus


def _batch_bytes(config: M2Config, images: bool = True) -> float:
    """One training sample on the device: uint8 image (first stage only), int64 token ids, bool padding mask."""
    return config.num_channels * config.image_size**2 * images + 9 * config.max_text_length


def candidate_layouts(config: M2Config, num_gpus: int, gpus_per_node: int) -> list[tuple[int, int, int]]:
    """(TP, PP, ITC group) triples that divide the model and the cluster: TP in 1/2/4/8 within a node and dividing
    heads and FFN, PP dividing num_layers + num_vl_layers with the VL layers on the last stage, g dividing DP."""
    layouts = []
    units = config.num_layers + config.num_vl_layers
    for tp in TENSOR_PARALLEL_SIZES:
        for pp in range(1, units + 1):
            if tp > gpus_per_node or num_gpus % (tp * pp):
                continue
            try:
                validate_parallel_shapes(config, tp, pp)
            except ConfigError:
                continue
            dp = num_gpus // (tp * pp)
            layouts += [(tp, pp, g) for g in range(1, dp + 1) if dp % g == 0]
    return layouts


def plan_all(config: M2Config, num_gpus: int, training: Training = Training(), hardware: Hardware = Hardware(),
             itc_group_size: int = 0, tensor_model_parallel_size: int = 0, pipeline_model_parallel_size: int = 0,
             itc_batch: int = 0) -> tuple[list[Plan], list[str]]:
    """Plans of every candidate layout (fitting or not), fastest first, and why the others were skipped.

    itc_group_size / tensor_model_parallel_size / pipeline_model_parallel_size: 0 = every valid value.
    itc_batch: only layouts whose contrastive batch (pairs per ITC group and loss) is at least this (0 = any).
    """
    if num_gpus < 1:
        raise ConfigError(f"--num-gpus must be >= 1, got {num_gpus}")
    plans, skipped = [], []
    for tp, pp, g in candidate_layouts(config, num_gpus, hardware.gpus_per_node):
        if any(want and want != got for want, got in ((tensor_model_parallel_size, tp),
                                                      (pipeline_model_parallel_size, pp))):
            continue
        dp = num_gpus // (tp * pp)
        if itc_group_size and dp % itc_group_size:
            skipped.append(f"TP={tp} PP={pp} DP={dp}: --itc-group-size {itc_group_size} does not divide DP")
            continue
        if itc_group_size and g != itc_group_size:
            continue
        try:
            plan = plan_layout(config, num_gpus, tp, pp, g, training, hardware)
        except ConfigError as error:
            skipped.append(f"TP={tp} PP={pp} DP={dp} g={g}: {error}")
            continue
        if plan.contrastive_batch < itc_batch:
            skipped.append(f"TP={tp} PP={pp} DP={dp} g={g}: contrastive batch {plan.contrastive_batch} < "
                           f"--itc-batch {itc_batch}")
            continue
        plans.append(plan)
    plans.sort(key=lambda p: (not p.fits, p.time["step"], p.memory["total"]))
    return plans, sorted(set(skipped))


# ---------------------------------------------------------------------------------------------------------------------
# output

def format_table(plans: Iterable[Plan]) -> str:
    header = ("  TP  PP    DP     g rec  params/GPU | GiB/GPU: params grads optim  activ   itc  total | "
              "GiB/step: TP    PP     DP    ITC | s/step: compute  comm   step  samples/s | ITC batch  +fwd | "
              "cores/GPU")
    rows = [header, "-" * len(header)]
    for p in plans:
        mem, com, t = p.memory, p.communication, p.time
        comm_time = t["step"] - t["compute"]
        rows.append(
            f"{p.tensor_model_parallel_size:4d}{p.pipeline_model_parallel_size:4d}{p.data_parallel_size:6d}"
            f"{p.itc_group_size:6d} {'yes' if p.recompute else ' no'} {p.parameters_per_gpu / 1e6:9.1f}M |"
            f"        {mem['params'] / GB:6.1f}{mem['grads'] / GB:6.1f}{mem['optimizer'] / GB:6.1f}"
            f"{mem['activations'] / GB:7.1f}{mem['itc'] / GB:6.2f}{mem['total'] / GB:7.1f}"
            f"{'' if p.fits else '!'} |"
            f"     {com['tp'] / GB:7.1f}{com['pp'] / GB:7.2f}{com['dp'] / GB:7.1f}{com['itc'] / GB:7.3f} |"
            f"         {t['compute']:6.2f}{comm_time:6.2f}{t['step']:7.2f}{p.samples_per_second:11.0f} |"
            f"{p.contrastive_batch:10d}{100 * p.extra_forward:5.0f}% |{p.cpu_cores_per_gpu:10.1f}"
        )
    return "\n".join(rows)


def _domain(collective: Collective, hardware: Hardware) -> str:
    return "NVLink" if collective.span <= hardware.gpus_per_node else "network"


def _forward_only_note(plan: Plan) -> str:
    passes = plan.stages[0].forward_only_passes if plan.stages else 0
    if not passes:
        return "no forward-only pass"
    which = ["batch accumulation"] * plan.stages[0].accumulates + ["momentum towers"] * (
        passes - plan.stages[0].accumulates)
    return f"forward-only pass(es) first: {' + '.join(which)}"


def format_explain(plan: Plan, hardware: Hardware = Hardware()) -> str:
    """What one layout's predicted step time is made of: the time per column, every stage's 1F1B slot, the GEMMs
    of the slowest stage with their MFU, and every collective of every stage (calls, bytes, seconds per step)."""
    t, m, pp = plan.time, plan.num_microbatches, plan.pipeline_model_parallel_size
    slots = m + pp - 1
    lines = [f"TP {plan.tensor_model_parallel_size} PP {pp} DP {plan.data_parallel_size} ITC group "
             f"{plan.itc_group_size}: {m} micro-batches per step, recompute {'on' if plan.recompute else 'off'}, "
             f"{_forward_only_note(plan)}",
             f"step {t['step']:.3f} s = " + " + ".join(f"{k} {t[k]:.3f}" for k in ("compute", *KINDS)),
             f"pipeline: {slots} slots of the slowest stage per pass (M + PP - 1; bubble {(pp - 1) / slots:.1%})",
             "", "stage  layers/tower  1F1B slot ms (compute + collectives)  forward-only slot ms  once per step ms"]
    for stage, cost in enumerate(plan.stages):
        compute = cost.units * cost.forward_compute
        marker = " <- paces the pipeline" if stage == plan.critical_stage else ""
        lines.append(f"{stage:5d}  {cost.layers:12d}  {1e3 * cost.main_slot:12.2f} ({1e3 * compute:.2f} + "
                     f"{1e3 * (cost.main_slot - compute):.2f}){'':12s}{1e3 * cost.forward_slot:12.2f}"
                     f"{1e3 * cost.comm('step'):18.2f}{marker}")
    cost = plan.stages[plan.critical_stage]
    lines += ["", f"GEMMs of stage {plan.critical_stage}, forward, one micro-batch (backward: 2x the FLOPs at the same "
              f"shapes; MFU = {hardware.mfu:g} x prod d / (d + {hardware.mfu_half_dim:g})):",
              f"  {'GEMM':28s} {'m x n x k':>22s} {'count':>7s} {'GFLOP':>9s} {'MFU':>6s} {'ms':>8s}"]
    for gemm, mfu, seconds in cost.gemms:
        lines.append(f"  {gemm.name:28s} {f'{gemm.m} x {gemm.n} x {gemm.k}':>22s} {gemm.count:7d} "
                     f"{gemm.flops / 1e9:9.2f} {mfu:6.3f} {1e3 * seconds:8.3f}")
    flops, seconds = sum(g.flops for g, _, _ in cost.gemms), cost.forward_compute
    lines.append(f"  {'total':28s} {'':>22s} {'':>7s} {flops / 1e9:9.2f} "
                 f"{flops / (hardware.peak_tflops * 1e12 * seconds):6.3f} {1e3 * seconds:8.3f}")
    lines += ["", f"collectives per step (latency NVLink {hardware.nvlink_latency_us:g} us / network "
              f"{hardware.internode_latency_us:g} us per call; phase: main = 1F1B pass, forward = batch accumulation's "
              "forward-only pass, step = once per step):",
              f"  {'stage':>5s} {'kind':5s} {'op':14s} {'group':12s} {'phase':7s} {'calls':>7s} {'MiB/call':>10s} "
              f"{'s/step':>8s}  what"]
    for stage, cost in enumerate(plan.stages):
        for c, seconds in cost.collectives:
            lines.append(f"  {stage:5d} {c.kind:5s} {c.op:14s} {f'{c.group}{c.group_size} {_domain(c, hardware)}':12s} "
                         f"{c.phase:7s} {c.calls:7d} {c.bytes / 2**20:10.4f} {seconds:8.4f}  {c.what}")
        calls = sum(c.calls for c, _ in cost.collectives)
        lines.append(f"  {stage:5d} total: {calls} calls, {sum(t for _, t in cost.collectives):.3f} s of "
                     "collectives per step (before pipelining)")
    return "\n".join(lines)
