"""Model presets (JSON files in `configs/`, as in open_clip) and their megatron-core TransformerConfig."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_m2.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
IMAGE_RESIZE_MODES = ("crop", "squash")


@dataclass(frozen=True)
class M2Config:
    """Shapes of an M2-Encoder; defaults are the official ones (arXiv 2401.15896 and its released configs)."""

    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_layers: int  # backbone layers; each has a vision copy and a text copy
    num_vl_layers: int = 3  # shared layers on top, applied to both modalities
    out_dim: int = 1024
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    vocab_size: int = 115244
    max_text_length: int = 52
    # BEiT-3 style learned positions start at index 2 (fairseq's padding offset).
    position_offset: int = 2
    # BEiT-3's max_source_positions; the importer takes the real size from the checkpoint.
    text_position_table_size: int = 1024
    layernorm_epsilon: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    # std of the normal init of every weight matrix and embedding table (megatron's --init-method-std). 0.02 is
    # BEiT-3's; a narrow model needs about hidden^-1/2 (CLIP's width scaling), else at init the CLS outputs of all
    # inputs have cosine ~0.999 and contrastive training sits at loss ln(batch) for hundreds of steps.
    init_method_std: float = 0.02
    # The release also projects the backbone output (before the VL layers); optional second pair of heads.
    backbone_heads: bool = False
    # Evaluation/inference preprocessing, saved with the model so the evaluator and exported HF folders see images as
    # the model expects them. "crop": shorter side to image_size + center crop (what checkpoints without these fields
    # were evaluated with); "squash": the whole image resized to image_size x image_size, no crop (M2-Encoder's
    # release, vlmo/transforms/square_transform.py; the importer sets it).
    image_resize_mode: str = "crop"
    image_interpolation: str = "bicubic"
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # Layers of each training-only cross-modal decoder (CMLM: image-to-text, CMIM: text-to-image; models/decoders.py),
    # built only when --cmlm-weight / --cmim-weight is on; the released weights hold none. A decoder layer is
    # torchscale's DecoderLayer as the release ships it (vlmo/torchscale/architecture/decoder.py: pre-LN
    # self-attention, cross-attention into the other tower, FFN, Sub-LN in all three) at the towers' width, heads and
    # FFN, as CoCa's multimodal decoder has its text tower's width (open_clip's coca_*.json). Depth: neither M2 nor
    # SyCoCa publishes one. CoCa's multimodal decoder is as deep as its unimodal text decoder (n_uni = n_multi), which
    # at M2's sizes would put two decoders as deep as a tower on the last pipeline stage; MAE's decoder is a few light
    # blocks (its ablation: 1 block fine-tunes as well as 8, 84.8 vs 84.9%), and the encoders, not the decoders,
    # are what we keep. So: the depth of the 3 VL layers that share the last stage (1 for tiny).
    decoder_num_layers: int = 3

    def __post_init__(self) -> None:
        # JSON (presets, HF config.json) gives lists: keep the frozen config hashable and equal to the saved one
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_seq_length(self) -> int:
        return self.num_patches + 1  # + CLS

    @property
    def vision_position_table_size(self) -> int:
        return self.vision_seq_length + self.position_offset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"--image-size {self.image_size} not divisible by the patch size {self.patch_size}")
        if self.image_resize_mode not in IMAGE_RESIZE_MODES:
            raise ConfigError(f"image_resize_mode {self.image_resize_mode!r}: use one of {IMAGE_RESIZE_MODES}")
        # the trainer's and the evaluator's transforms (data/transforms.py) resize bicubic and normalise with 0.5
        if self.image_interpolation != "bicubic":
            raise ConfigError(f"image_interpolation {self.image_interpolation!r}: only 'bicubic' is implemented")
        for name in ("image_mean", "image_std"):
            if getattr(self, name) != (0.5,) * self.num_channels:
                raise ConfigError(f"{name} {list(getattr(self, name))}: the data transforms normalise with 0.5 per "
                                  f"channel; only [0.5] * {self.num_channels} is implemented")
        if self.decoder_num_layers < 1:
            raise ConfigError(f"decoder_num_layers {self.decoder_num_layers}: the cross-modal decoders need >= 1 layer")
        if self.max_text_length + self.position_offset > self.text_position_table_size:
            raise ConfigError(f"--max-text-length {self.max_text_length} needs a text position table of "
                              f"{self.max_text_length + self.position_offset} rows, the model has "
                              f"{self.text_position_table_size}")


# Fields that shape only the training-only decoders: a Hugging Face export (which leaves the decoders out) omits them.
DECODER_FIELDS = ("decoder_num_layers",)

PRESETS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def load_config(name_or_path: str, **overrides: Any) -> M2Config:
    """A preset name (tiny, 0.4b, 1b, 10b) or a path to a JSON file, with optional field overrides."""
    path = CONFIG_DIR / f"{name_or_path}.json" if name_or_path in PRESETS else Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    fields = json.loads(path.read_text())
    fields.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(M2Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown model config fields in {path}: {unknown}; known: {sorted(known)}")
    config = M2Config(**fields)
    config.validate()
    return config


def layers_per_stage(config: M2Config, pipeline_model_parallel_size: int) -> list[int]:
    """Backbone layers held by each pipeline stage.

    A backbone layer (vision copy + text copy) and a VL layer (shared weights, both modalities) cost about the same,
    so the pipeline balances num_layers + num_vl_layers units; the VL layers fill the end of the last stage.
    E.g. 10B (21 + 3) at PP=4: [6, 6, 6, 3] backbone layers, then the 3 VL layers on stage 3.
    """
    pp = pipeline_model_parallel_size
    units = config.num_layers + config.num_vl_layers
    if units % pp:
        raise ConfigError(
            f"--pipeline-model-parallel-size {pp} must divide num_layers + num_vl_layers = "
            f"{config.num_layers} + {config.num_vl_layers} = {units}; valid: {[d for d in range(1, units + 1) if units % d == 0 and units // d >= config.num_vl_layers]}"
        )
    per_stage = units // pp
    if per_stage < config.num_vl_layers:
        raise ConfigError(
            f"--pipeline-model-parallel-size {pp} leaves {per_stage} layers per stage, fewer than the "
            f"{config.num_vl_layers} VL layers that must sit on the last stage; use a smaller PP"
        )
    return [per_stage] * (pp - 1) + [per_stage - config.num_vl_layers]


def validate_parallel_shapes(config: M2Config, tensor_model_parallel_size: int,
                             pipeline_model_parallel_size: int) -> None:
    """Errors for impossible TP/PP splits of this model, raised before anything is allocated."""
    tp = tensor_model_parallel_size
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("ffn_hidden_size", config.ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} must divide the model's {name} ({value})")
    layers_per_stage(config, pipeline_model_parallel_size)


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's vocab padding: a multiple of divisible_by x TP so the vocab-parallel embedding splits evenly."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def padded_length(length: int, sequence_parallel_size: int) -> int:
    """A token stream's length under sequence parallelism: rounded up to a multiple of the TP size that splits it
    (1: no sequence parallelism); the padding is masked out of attention (models/sequence_parallel.py)."""
    return -(-length // sequence_parallel_size) * sequence_parallel_size


def transformer_config(config: M2Config, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                       num_layers: Optional[int] = None, **kwargs: Any):
    """megatron-core TransformerConfig for one tower (or the VL layers) of this model."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.utils import init_method_normal
    import torch.nn.functional as F

    defaults = dict(
        num_layers=num_layers if num_layers is not None else config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        ffn_hidden_size=config.ffn_hidden_size,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        layernorm_epsilon=config.layernorm_epsilon,
        activation_func=F.gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        normalization="LayerNorm",
        # as BEiT-3 (unilm's BEiT3Wrapper re-initialises every Linear with one std): output layers not depth-scaled,
        # unlike megatron's GPT default
        init_method_std=config.init_method_std,
        output_layer_init_method=init_method_normal(config.init_method_std),
    )
    defaults.update(kwargs)
    with warnings.catch_warnings():
        # megatron-core 0.16 warns about its own default cuda_graph_scope ("full") even with CUDA graphs off
        warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
        return TransformerConfig(**defaults)


def transformer_overrides(recompute_activations: bool = False, bf16: bool = False,
                          sequence_parallel: bool = False, hidden_dropout: float = 0.0,
                          attention_dropout: float = 0.0) -> dict:
    """The TransformerConfig fields that the trainer's flags set (--recompute-activations, --bf16,
    --sequence-parallel, --hidden-dropout, --attention-dropout): one place for the trainer, the planner's measurement
    and the GPU check."""
    overrides: dict = {}
    if hidden_dropout or attention_dropout:
        overrides.update(hidden_dropout=hidden_dropout, attention_dropout=attention_dropout)
    if sequence_parallel:
        overrides.update(sequence_parallel=True)
    if recompute_activations:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if bf16:
        import torch

        overrides.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    return overrides
