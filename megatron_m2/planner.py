"""Memory and communication planner: which TP/PP/DP/ITC-group layouts of a preset fit a cluster, and how fast.

Everything here is arithmetic on the model's shapes (no torch, no allocation), so `tools/plan.py` and the trainer's
--dry-run can call it anywhere. The numbers are estimates from stated assumptions; BENCHMARKS.md compares them with
measured peaks. Sizes are in bytes, communication in bytes sent per GPU per optimizer step.

Model of a training step (megatron-core as the trainer configures it, training/optimizer.py):
- weights in bf16 (2 B) or fp32 (4 B); gradients in an fp32 grad buffer (grad_reduce_in_fp32); Adam keeps fp32
  master weights (bf16 only) and two fp32 moments, sharded over data-parallel ranks by the distributed optimizer.
- activations per transformer layer and token, without sequence parallelism (the trainer does not enable it): see
  `layer_activation_bytes`. 1F1B keeps up to PP - stage micro-batches in flight on a stage; with full recompute a
  layer keeps only its input, plus one layer's working set during its recompute.
- rank order tp-dp-pp (megatron-core's): a TP group is on one node; a DP or ITC group spans tp x size ranks; a PP group
  spans the whole job. A group whose span fits in one node uses NVLink, otherwise the inter-node network.
- step time = compute / (peak x MFU) x (1 + pipeline bubble (PP - 1) / micro-batches) + all communication, which is
  counted as exposed (an upper bound: the trainer overlaps the DP gradient reduction with backward on GPU).
- GBA-ITC batch accumulation (training/batch_accumulation.py), with more than one micro-batch per step: one more
  forward pass (+1/3 of compute, +1/4 with full recompute), its TP all-reduces and PP sends, the loss over the rank's
  whole step (M x b rows against g x M x b columns), the cached embeddings and gradients, and the step's micro-batches
  kept on the first stage for the replay.
- the masked-modelling objectives (`Training.masked`, CMLM / CMIM): their decoders' parameters on the last stage
  (arithmetic.stage_parameters), the masked streams through the backbone towers in the forward-backward pass (their
  activations, TP all-reduces and PP sends; not in GBA-ITC's forward-only pass), the decoders' activations and the
  CMLM logits of the masked tokens on the last stage, and their FLOPs (arithmetic.model_flops_per_sample).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

from megatron_m2.arithmetic import MaskedPasses, model_flops_per_sample, stage_parameters
from megatron_m2.config import M2Config, layers_per_stage, validate_parallel_shapes
from megatron_m2.errors import ConfigError

GB = 1024**3
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Hardware:
    """Assumptions about one GPU and the network; defaults are an H100 SXM 80 GB node with 8 x 400 Gb/s InfiniBand."""

    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak of an H100 SXM
    mfu: float = 0.40  # fraction of peak reached inside the kernels (the pipeline bubble is modelled separately)
    nvlink_gbps: float = 300.0  # effective collective bandwidth per GPU inside a node, GB/s (NVLink 4: 450 raw)
    internode_gbps: float = 40.0  # effective per-GPU bandwidth between nodes, GB/s (400 Gb/s NIC per GPU = 50 raw)
    reserved_gb: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    # read + decode + augment + tokenise of one 500x375 JPEG (72 KiB) to 224 px per CPU-second (Pillow): 181 measured
    # by benchmarks/data_loader.py on the 2-core development machine (BENCHMARKS.md "Data loader"), rounded down
    decode_samples_per_core_s: float = 180.0


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
    itc_batch_accumulation: bool = True  # GBA-ITC: one loss over all micro-batches of a step (one extra forward)
    masked: MaskedPasses = MaskedPasses()  # CMLM / CMIM on (--cmlm-weight / --cmim-weight > 0)


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
    extra_forward: float = 0.0  # compute added by batch accumulation's forward-only pass, as a fraction
    cpu_cores_per_gpu: float = 0.0  # data decoding that keeps up with the step (one decode per model replica)

    @property
    def samples_per_second(self) -> float:
        return 0.0 if not self.time["step"] else self._global_batch / self.time["step"]

    _global_batch: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# activations

def layer_activation_bytes(config: M2Config, tokens: int, seq_length: int, tensor_model_parallel_size: int,
                           bf16: bool, spec: str) -> float:
    """Bytes one layer copy keeps for backward, for `tokens` = micro-batch x seq_length tokens.

    Per token, in the activation dtype (dt): the pre-LN inputs and outputs (4h, replicated over TP), q, k, v and the
    out_proj input (4h/t), the GELU input and the fc2 input (2f/t). Each Sub-LN (models/sub_ln.py, not fused) keeps
    three fp32 tensors of its input size (its fp32 input, the centred input, the normalised output): 12 B x (h + f)/t.
    Flash attention (te spec) keeps its output too, a tensor of its own in bf16 (in fp32 it is the Sub-LN's input).
    The local spec's unfused attention keeps the softmax probabilities, a x s / t per token: fp32 for the softmax
    backward, plus the bf16 copy that the probs x V matmul keeps when training in bf16.
    """
    h, f, t = config.hidden_size, config.ffn_hidden_size, tensor_model_parallel_size
    dt = 2 if bf16 else 4
    per_token = dt * (4 * h + 4 * h / t + 2 * f / t) + 12 * (h + f) / t
    if spec == "te" and bf16:
        per_token += dt * h / t
    if spec == "local":
        per_token += (4 + (dt if bf16 else 0)) * config.num_attention_heads * seq_length / t
    return tokens * per_token


def cross_attention_bytes(config: M2Config, queries: int, keys: int, key_length: int, tensor_model_parallel_size: int,
                          bf16: bool, spec: str) -> float:
    """Bytes a decoder layer's cross-attention sublayer keeps for backward, for `queries` query tokens and `keys` key
    tokens (micro-batch x length): per query its pre-LN input and output, q, the context (Sub-LN'd as in
    layer_activation_bytes); per key k and v; the local spec's softmax over key_length keys per query."""
    h, t = config.hidden_size, tensor_model_parallel_size
    dt = 2 if bf16 else 4
    per_query = dt * (2 * h + 2 * h / t) + 12 * h / t
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
    s_img, s_txt = config.vision_seq_length, config.max_text_length
    masked = training.masked

    def copy_bytes(seq: int) -> float:
        return layer_activation_bytes(config, b * seq, seq, tp, training.bf16, training.spec)

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
    boundary = dt * b * (s_img + s_txt + _masked_tokens(config, masked)) * h  # the stage's input, kept for backward
    if is_last and masked.cmlm:  # the masked tokens' fp32 vocab-parallel logits and the cross-entropy's softmax
        boundary += 2 * 4 * b * masked.text_mask_prob * s_txt * config.vocab_size / tp
    if is_first:
        boundary += dt * b * config.num_channels * config.image_size**2
    if recompute:
        kept = boundary + sum(dt * b * seq * h for seq in layers)
        working = max((copy_bytes(seq) for seq in layers), default=0.0)
        return kept, working
    return boundary + full, 0.0


def itc_bytes(config: M2Config, micro_batch_size: int, itc_group_size: int, chunk_size: int = 0,
              num_microbatches: int = 1) -> float:
    """Loss memory on the last stage: the gathered image and text features of the group (fp32) and, for both
    directions, the logits and their softmax of b_local x (g x b_local) (or x chunk with --itc-chunk-size).

    With batch accumulation (num_microbatches M > 1) b_local is the rank's whole step, M x micro-batch rows, and the
    step also keeps the rows' embeddings and their cached gradients (fp32, both modalities)."""
    b, g, d = micro_batch_size * num_microbatches, itc_group_size, config.out_dim
    columns = g * b if not chunk_size else min(chunk_size, g * b)
    cache = 2 * 2 * b * d if num_microbatches > 1 else 0
    return 4 * (2 * g * b * d + 2 * 2 * b * columns + cache)


# ---------------------------------------------------------------------------------------------------------------------
# the plan of one layout

def _bandwidth(hw: Hardware, span: int) -> float:
    return (hw.nvlink_gbps if span <= hw.gpus_per_node else hw.internode_gbps) * 1e9


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
    accumulate = training.itc_batch_accumulation and m > 1
    loss_rows = m * b if training.itc_batch_accumulation else b  # a rank's rows in one contrastive loss
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
    per_stage_layers = layers_per_stage(config, pp)
    memories = []
    for stage, (params, backbone_layers) in enumerate(zip(stages, per_stage_layers)):
        n = params.per_gpu(tp)
        kept, working = _stage_activation_bytes(config, backbone_layers, stage == 0, stage == pp - 1, tp, training,
                                                recompute)
        in_flight = min(pp - stage, m)
        memory = dict(
            params=float(n * dt),
            grads=float(n * 4),
            optimizer=n * optimizer_bytes / (dp if training.use_distributed_optimizer else 1),
            # batch accumulation replays the step's micro-batches: the first stage keeps them (uint8 images + text)
            activations=kept * in_flight + working + (m * b * _batch_bytes(config) if accumulate and stage == 0
                                                      else 0.0),
            itc=itc_bytes(config, b, g, training.itc_chunk_size, m if accumulate else 1) if stage == pp - 1 else 0.0,
            reserved=hardware.reserved_gb * GB,
        )
        memory["total"] = sum(memory.values())
        memories.append((memory, n))
    peak_stage = max(range(pp), key=lambda s: memories[s][0]["total"])
    memory, n_peak = memories[peak_stage]

    # communication, bytes sent per GPU per step, for the busiest stage of each kind
    s_img, s_txt, h = config.vision_seq_length, config.max_text_length, config.hidden_size
    ring = lambda size: (size - 1) / size  # noqa: E731 - ring collectives move (n-1)/n of the data per GPU
    all_reduces_per_layer = 6 if recompute else 4  # 2 forward (+2 again in recompute), 2 backward
    masked_tokens = _masked_tokens(config, training.masked)

    def layer_tokens(stage: int) -> tuple[float, float]:
        """(tokens x layers of the forward-backward pass, of GBA-ITC's forward-only pass) on a stage; a decoder layer
        has 3 all-reduces where a layer has 2 (its cross-attention)."""
        layers, vl = per_stage_layers[stage], config.num_vl_layers if stage == pp - 1 else 0
        unmasked = (layers + vl) * (s_img + s_txt)
        decoders = sum(1.5 * q for q, _ in _decoder_streams(config, training.masked)) if stage == pp - 1 else 0.0
        return unmasked + layers * masked_tokens + decoders, float(unmasked)

    # batch accumulation's forward-only pass: 2 all-reduces per layer over the unmasked streams
    tp_tokens = max(train * all_reduces_per_layer + (2 * itc if accumulate else 0)
                    for train, itc in map(layer_tokens, range(pp)))
    tp_bytes = m * tp_tokens * 2 * ring(tp) * dt * b * h if tp > 1 else 0.0
    # activations forward, gradients backward (with the masked streams), the forward-only pass's activations once more
    pp_bytes = (m * dt * b * h * (2 * (s_img + s_txt + masked_tokens) + (s_img + s_txt if accumulate else 0))
                if pp > 1 else 0.0)
    n_max = max(params.per_gpu(tp) for params in stages)
    if dp == 1:
        dp_bytes = 0.0
    elif training.use_distributed_optimizer:
        dp_bytes = ring(dp) * n_max * (4 + dt)  # reduce-scatter fp32 grads, all-gather updated weights
    else:
        dp_bytes = 2 * ring(dp) * n_max * 4  # all-reduce fp32 grads
    # image + text features: all-gather, reduce-scatter (fp32 in the accumulated loss); the same bytes whether the
    # step gathers M micro-batches at once or one at a time
    itc_comm = m * 2 * 2 * (g - 1) * b * config.out_dim * (4 if accumulate else dt)
    communication = dict(tp=tp_bytes, pp=pp_bytes, dp=dp_bytes, itc=itc_comm)

    # in forward-pass units: forward + backward = 3, full recompute +1, batch accumulation's extra forward +1 (of the
    # ITC-only model: the masked streams are not in that pass)
    units = 4 if recompute else 3
    train_flops = model_flops_per_sample(config, training.masked) * units / 3
    extra_flops = model_flops_per_sample(config) / 3 if accumulate else 0.0
    extra_forward = extra_flops / train_flops
    flops = (train_flops + extra_flops) * training.global_batch_size
    compute = flops / num_gpus / (hardware.peak_tflops * 1e12 * hardware.mfu) * (1 + (pp - 1) / m)
    time = dict(
        compute=compute,
        tp=tp_bytes / _bandwidth(hardware, tp),
        pp=pp_bytes / _bandwidth(hardware, num_gpus),
        dp=dp_bytes / _bandwidth(hardware, tp * dp),
        itc=itc_comm / _bandwidth(hardware, tp * g),
    )
    time["step"] = sum(time.values())
    return Plan(tp, pp, dp, g, recompute, m, peak_stage, n_peak, memory, communication, time,
                fits=memory["total"] <= hardware.gpu_memory_gb * GB, contrastive_batch=g * loss_rows,
                extra_forward=extra_forward, _global_batch=training.global_batch_size,
                cpu_cores_per_gpu=decode_cores_per_gpu(training.global_batch_size, time["step"], num_gpus, hardware))


def decode_cores_per_gpu(global_batch_size: int, step_time_s: float, num_gpus: int, hardware: Hardware) -> float:
    """CPU cores per GPU that decode a step's samples within the step (each sample once per model replica: its reader
    broadcasts to the TP and PP peers). The readers sit on the first pipeline stage, so with PP across nodes those
    nodes need PP times this average."""
    return global_batch_size / (step_time_s * hardware.decode_samples_per_core_s) / num_gpus


def _batch_bytes(config: M2Config) -> float:
    """One training sample on the device: uint8 image, int64 token ids, bool padding mask."""
    return config.num_channels * config.image_size**2 + 9 * config.max_text_length


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
             itc_group_size: int = 0, tensor_model_parallel_size: int = 0, pipeline_model_parallel_size: int = 0
             ) -> tuple[list[Plan], list[str]]:
    """Plans of every candidate layout (fitting or not), fastest first, and why the others were skipped.

    itc_group_size / tensor_model_parallel_size / pipeline_model_parallel_size: 0 = every valid value.
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
            plans.append(plan_layout(config, num_gpus, tp, pp, g, training, hardware))
        except ConfigError as error:
            skipped.append(f"TP={tp} PP={pp} DP={dp} g={g}: {error}")
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
