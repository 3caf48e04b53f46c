"""The M2-Encoder as one megatron-core pipeline stage.

Each stage holds a contiguous slice of BOTH towers (vision = official multiway copy A, text = copy B): the embeddings
on the first stage; the towers' final LayerNorms, the shared VL layers (official backbone_vl, A weights, applied to
each modality separately), the VL final LayerNorm, the bias-free heads and logit_scale on the last stage.
Between stages the two streams travel packed in one tensor [S_img + S_txt, b, h] so megatron-core's schedules can send
them; either modality may be absent (S = 0). With sequence parallelism each stream is padded to a multiple of TP and
split over the TP ranks, and the packed tensor holds this rank's parts of both (models/sequence_parallel.py).

With the masked-modelling objectives (CMLM / CMIM, `cmlm=` / `cmim=`), the masked copies of the caption and of the
image travel in the same tensor, [S_img + S_txt + S_img' + S_txt', b, h] with S_img' = S_img when CMIM is on and
S_txt' = S_txt when CMLM is on: one tensor shape per schedule call, whatever the objectives. Inside a stage each tower
runs once over its unmasked and masked streams side by side along the batch ([S, 2b, h]: one set of larger matmuls,
not two calls), or, when training draws random masks (dropout, drop path), in two calls, the masked one (and the
decoders) on generators of its own (megatron_m2/random_state.py). The last stage's decoders (models/decoders.py)
then read the unmasked streams as keys/values and the masked ones as queries; the VL layers and the ITC heads see
only the unmasked streams.
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import nullcontext
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_m2.config import (M2Config, layers_per_stage, padded_length, transformer_config,
                                validate_parallel_shapes)
from megatron_m2.models.decoders import CrossModalDecoders, MaskedInputs
from megatron_m2.models.drop_path import drop_path_rates
from megatron_m2.models.init import initialize_weights
from megatron_m2.models.layer_spec import get_final_norm_spec, get_layer_spec, resolve_spec
from megatron_m2.models.sequence_parallel import first_token, padded_key_mask, scatter_sequence
from megatron_m2.models.text import TextEmbedding
from megatron_m2.models.vision import VisionEmbedding
from megatron_m2.random_state import masked_streams_random_state

Embeddings = tuple[Optional[torch.Tensor], ...]

VISION_MODULES = ("vision_embed", "vision_encoder", "image_projection", "backbone_image_projection")
TEXT_MODULES = ("text_embed", "text_encoder", "text_projection", "backbone_text_projection")
# the training-only parts of the masked-modelling objectives: the decoders and heads (last stage), the mask token
DECODER_MODULES = ("decoders",)
DECODER_PARAMETERS = ("cmim_mask_token",)
# checkpoint keys (and parameter names, wrapper prefixes aside) of each objective's parts
OBJECTIVE_KEYS = {"cmlm": re.compile(r"(^|\.)decoders\.cmlm_"),
                  "cmim": re.compile(r"(^|\.)(decoders\.cmim_|cmim_mask_token)")}


def packed_sequence_length(config: M2Config, with_images: bool = True, with_text: bool = True,
                           sequence_parallel_size: int = 1, with_masked_images: bool = False,
                           with_masked_text: bool = False) -> int:
    """Length of the packed [image; text; masked image; masked text] activation that travels between pipeline stages
    (the masked streams only with CMIM / CMLM), before the split over `sequence_parallel_size` ranks (the TP size
    with --sequence-parallel; each stream padded to a multiple of it). megatron-core's schedules take this and divide
    it by TP under sequence parallelism."""
    image = padded_length(config.vision_seq_length, sequence_parallel_size)
    text = padded_length(config.max_text_length, sequence_parallel_size)
    return image * (with_images + with_masked_images) + text * (with_text + with_masked_text)


def stage_sequence_length(model: torch.nn.Module, with_images: bool = True, with_text: bool = True,
                          with_masked_images: bool = False, with_masked_text: bool = False) -> int:
    """`packed_sequence_length` for this stage's model (DDP-wrapped or not), sequence parallelism as it is built."""
    stage = getattr(model, "module", model)
    return packed_sequence_length(stage.m2_config, with_images, with_text, stage.sequence_parallel_size,
                                  with_masked_images, with_masked_text)


def _has_module(name: str, modules: tuple[str, ...]) -> bool:
    # names may carry wrapper prefixes (module., DDP) before ours
    return re.search(r"(^|\.)(" + "|".join(modules) + r")\.", name) is not None


def _stage_block_config(tc: TransformerConfig, num_layers: int, stage_layers: list[int]) -> TransformerConfig:
    """A config whose megatron layer offsets reproduce `stage_layers` (uniform stages, then a shorter last one).

    megatron-core numbers layers (and the PP axis of dist-checkpoint tensors) from config.num_layers, the PP size and
    num_layers_in_last_pipeline_stage, so we express our split in those terms instead of renumbering layers.
    """
    pp, per, last = len(stage_layers), stage_layers[0], stage_layers[-1]
    fields = dict(num_layers=num_layers, num_layers_in_first_pipeline_stage=None,
                  num_layers_in_last_pipeline_stage=None, pipeline_model_parallel_size=pp)
    if pp == 1:
        pass
    elif last == 0:  # the last stage holds only VL layers: the tower is split uniformly over the other stages
        fields["pipeline_model_parallel_size"] = pp - 1
    elif last != per:
        fields["num_layers_in_last_pipeline_stage"] = last
    return dataclasses.replace(tc, **fields)


class M2PipelineStage(MegatronModule):
    """One pipeline stage of the two-tower M2-Encoder (see the module docstring).

    forward(images [b,3,H,W] | None, text_ids [b,L] | None, text_padding_mask [b,L] bool | None, True = padding,
    masked: MaskedInputs | None): every stage gets the same arguments (non-first stages use only presence/shapes and
    the masks). Returns the packed hidden states on non-last stages; on the last stage (image_embeds, text_embeds), each
    [b, out_dim] L2-normalised or None, followed by (backbone_image_embeds, backbone_text_embeds) when
    config.backbone_heads is on, followed by the decoders' MaskedPredictions when `masked` is given (training with
    CMLM / CMIM; needs both modalities and a stage built with those objectives).
    """

    def __init__(self, config: M2Config, transformer_config: TransformerConfig, pre_process: bool,
                 post_process: bool, num_stage_layers: Optional[int] = None, layer_offset: Optional[int] = None,
                 spec: str = "local", cmlm: bool = False, cmim: bool = False, drop_path_rate: float = 0.0):
        super().__init__(config=transformer_config)
        self.m2_config = config
        self.model_type = ModelType.encoder_or_decoder
        # megatron-core's finalize_model_grads asks every model whether to sync tied embedding grads: we tie none
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        self.spec = resolve_spec(spec)
        self.input_tensor: Optional[torch.Tensor] = None
        tc = transformer_config
        # the ranks each stream's sequence is split over (1 = no sequence parallelism)
        self.sequence_parallel_size = tc.tensor_model_parallel_size if tc.sequence_parallel else 1

        pp = tc.pipeline_model_parallel_size
        stage_layers = layers_per_stage(config, pp)
        stage = parallel_state.get_pipeline_model_parallel_rank() if pp > 1 else 0
        expected = (stage_layers[stage], sum(stage_layers[:stage]))
        given = (expected[0] if num_stage_layers is None else num_stage_layers,
                 expected[1] if layer_offset is None else layer_offset)
        if given != expected:
            raise ValueError(f"stage {stage} of {pp} holds {expected[0]} backbone layers from layer {expected[1]} "
                             f"(layers_per_stage), got num_stage_layers={num_stage_layers}, "
                             f"layer_offset={layer_offset}")
        self.num_stage_layers, self.layer_offset = expected

        if pre_process:
            self.vision_embed = VisionEmbedding(config, tc)
            self.text_embed = TextEmbedding(config, tc)
        # stochastic depth over each stack's depth, as the release's two torchscale Encoders (backbone, backbone_vl)
        self.drop_path_rate = drop_path_rate
        layer_spec = get_layer_spec(self.spec, drop_path_rates(drop_path_rate, config.num_layers))
        norm = get_final_norm_spec(self.spec)
        tower_config = _stage_block_config(tc, config.num_layers, stage_layers)
        for name in ("vision_encoder", "text_encoder"):
            block = TransformerBlock(
                tower_config, TransformerBlockSubmodules([layer_spec] * self.num_stage_layers, norm),
                post_layer_norm=True, pre_process=True, post_process=post_process)
            setattr(self, name, block)
        if self.num_stage_layers:
            first = self.vision_encoder.layers[0].layer_number - 1
            assert first == self.layer_offset, f"megatron numbered layer {first}, expected {self.layer_offset}"
        if post_process:
            vl_config = _stage_block_config(tc, config.num_vl_layers, [config.num_vl_layers])
            self.vl_encoder = TransformerBlock(
                vl_config, TransformerBlockSubmodules(
                    [get_layer_spec(self.spec, drop_path_rates(drop_path_rate, config.num_vl_layers))]
                    * config.num_vl_layers, norm),
                post_layer_norm=True, pre_process=True, post_process=True)
            self.image_projection = self._head()
            self.text_projection = self._head()
            self.logit_scale = torch.nn.Parameter(torch.tensor(config.logit_scale_init, dtype=tc.params_dtype))
            if config.backbone_heads:
                self.backbone_image_projection = self._head()
                self.backbone_text_projection = self._head()
                self.backbone_logit_scale = torch.nn.Parameter(
                    torch.tensor(config.logit_scale_init, dtype=tc.params_dtype))
                # Frozen: no training loss uses this second pair of heads (the release's get_backbone_features
                # output). Trainable, they would get no gradient, which megatron's DDP rejects on the next step with
                # overlap_grad_reduce (a bucket waits for every parameter), and weight decay would shrink them every
                # step. Frozen, DDP and the optimizer leave them out; checkpoints and converters still carry them.
                for head in (self.backbone_image_projection.weight, self.backbone_text_projection.weight,
                             self.backbone_logit_scale):
                    head.requires_grad_(False)
        # the masked-modelling parts last, so that without them the towers' initialisation draws what it always did
        self.cmlm, self.cmim = cmlm, cmim
        if pre_process and cmim:
            self.cmim_mask_token = torch.nn.Parameter(torch.empty(config.hidden_size, dtype=tc.params_dtype))
            if tc.perform_initialization:
                tc.init_method(self.cmim_mask_token)
        if post_process and (cmlm or cmim):
            self.decoders = CrossModalDecoders(config, tc, self.spec, cmlm=cmlm, cmim=cmim,
                                               drop_path_rate=drop_path_rate)

    def _head(self) -> torch.nn.Linear:
        """Bias-free projection to out_dim, replicated over TP (it is small)."""
        head = torch.nn.Linear(self.m2_config.hidden_size, self.m2_config.out_dim, bias=False,
                               dtype=self.config.params_dtype)
        if self.config.perform_initialization:
            self.config.init_method(head.weight)
        return head

    # -- megatron-core schedule interface ------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor: Union[torch.Tensor, list, None]) -> None:
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "M2PipelineStage takes one packed input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # -- parameter groups (LiT freezing, partial loading) --------------------------------------------------------
    @staticmethod
    def is_vision_parameter(name: str) -> bool:
        """Vision tower: patch/CLS/position embedding, vision backbone layers + final LN, image head(s)."""
        return _has_module(name, VISION_MODULES)

    @staticmethod
    def is_text_parameter(name: str) -> bool:
        """Text tower: token/position embedding, text backbone layers + final LN, text head(s)."""
        return _has_module(name, TEXT_MODULES)

    @property
    def objectives(self) -> frozenset[str]:
        """The masked-modelling objectives this model was built for (every stage knows, whichever parts it holds)."""
        return frozenset(name for name, on in (("cmlm", self.cmlm), ("cmim", self.cmim)) if on)

    @staticmethod
    def objectives_of(keys: Iterable[str]) -> frozenset[str]:
        """The masked-modelling objectives ("cmlm", "cmim") whose parts appear among these checkpoint keys or
        parameter names (the checkpoint loader asks, to start missing decoders fresh)."""
        keys = list(keys)
        return frozenset(name for name, pattern in OBJECTIVE_KEYS.items() if any(pattern.search(k) for k in keys))

    @staticmethod
    def is_decoder_parameter(name: str) -> bool:
        """The masked-modelling objectives' training-only parts: the decoders and their heads, the image mask token."""
        return _has_module(name, DECODER_MODULES) or re.search(
            r"(^|\.)(" + "|".join(DECODER_PARAMETERS) + r")$", name) is not None

    # -- forward -------------------------------------------------------------------------------------------------
    def _attention_mask(self, padding_mask: Optional[torch.Tensor], batch: int, length: int, device
                        ) -> Optional[torch.Tensor]:
        """[b, 1, 1, L] key-padding mask of a stream of `length` tokens, True = masked, with the sequence-parallel
        padding (L = padded length). Unpadded images need none with the local attention; TE's padding attention
        wants an explicit mask, so it gets an all-False one."""
        mask = padded_key_mask(padding_mask, batch, length, self.sequence_parallel_size, device)
        if mask is not None:
            return mask[:, None, None, :]
        if self.spec == "te":
            return torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
        return None

    def _split(self, hidden: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """An embedded stream [S, b, h] -> this rank's part of it under sequence parallelism."""
        if hidden is None or self.sequence_parallel_size == 1:
            return hidden
        return scatter_sequence(hidden, self.sequence_parallel_size)

    def _first_token(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[0] if self.sequence_parallel_size == 1 else first_token(hidden)

    def _check_masked(self, masked: MaskedInputs, images, text_ids) -> None:
        if self.sequence_parallel_size > 1:
            raise ValueError("the masked streams (CMLM / CMIM) do not run with --sequence-parallel yet")
        if images is None or text_ids is None:
            raise ValueError("the masked streams need both modalities: each decoder attends to the other tower")
        if (masked.cmlm and not self.cmlm) or (masked.cmim and not self.cmim):
            raise ValueError(f"masked inputs for CMLM {masked.cmlm} / CMIM {masked.cmim}, but this stage was built "
                             f"with cmlm={self.cmlm}, cmim={self.cmim}")

    def forward(self, images: Optional[torch.Tensor], text_ids: Optional[torch.Tensor],
                text_padding_mask: Optional[torch.Tensor] = None, masked: Optional[MaskedInputs] = None):
        if images is None and text_ids is None:
            raise ValueError("M2PipelineStage.forward needs images, text_ids or both")
        if masked is not None:
            self._check_masked(masked, images, text_ids)
        with_masked_image, with_masked_text = masked is not None and masked.cmim, masked is not None and masked.cmlm
        # this rank's tokens of each stream in the packed activation
        split = self.sequence_parallel_size
        s_img = padded_length(self.m2_config.vision_seq_length, split) // split if images is not None else 0
        s_txt = padded_length(self.m2_config.max_text_length, split) // split if text_ids is not None else 0
        masked_image_h = masked_text_h = None
        if self.pre_process:
            if with_masked_image:
                image_h, masked_image_h = self.vision_embed.forward_masked(images, masked.image_patches,
                                                                           self.cmim_mask_token)
            else:
                image_h = self._split(self.vision_embed(images)) if images is not None else None
            text_h = self._split(self.text_embed(text_ids)) if text_ids is not None else None
            if with_masked_text:
                masked_text_h = self.text_embed(masked.text_ids)
        else:
            lengths = [s_img, s_txt, s_img * with_masked_image, s_txt * with_masked_text]
            image_h, text_h, masked_image_h, masked_text_h = (
                part if length else None for part, length in zip(self.input_tensor.split(lengths), lengths))

        batch = (images if images is not None else text_ids).shape[0]
        image_mask = text_mask = None
        if image_h is not None:
            image_mask = self._attention_mask(None, batch, self.m2_config.vision_seq_length, image_h.device)
            image_h, masked_image_h = self._tower(self.vision_encoder, image_h, masked_image_h, image_mask)
        if text_h is not None:
            text_mask = self._attention_mask(text_padding_mask, batch, text_ids.shape[1], text_h.device)
            text_h, masked_text_h = self._tower(self.text_encoder, text_h, masked_text_h, text_mask)
        if not self.post_process:
            return torch.cat([h for h in (image_h, text_h, masked_image_h, masked_text_h) if h is not None], dim=0)

        outputs = [self._embed(image_h, image_mask, self.image_projection),
                   self._embed(text_h, text_mask, self.text_projection)]
        if self.m2_config.backbone_heads:
            outputs += [self._project(image_h, self.backbone_image_projection),
                        self._project(text_h, self.backbone_text_projection)]
        if masked is not None:
            with masked_streams_random_state() if self.random else nullcontext():
                outputs.append(self.decoders(image_h, text_h, text_padding_mask, masked_image_h, masked_text_h,
                                             masked))
        return tuple(outputs)

    @property
    def random(self) -> bool:
        """Whether training draws random masks (drop path, hidden or attention dropout)."""
        return self.training and bool(self.drop_path_rate or self.config.hidden_dropout or
                                      self.config.attention_dropout)

    def _tower(self, block: TransformerBlock, hidden: torch.Tensor, masked_hidden: Optional[torch.Tensor],
               mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The tower over a stream and, if given, its masked copy side by side along the batch (one call). With random
        masks the masked copy runs in a second call on the masked streams' generators (megatron_m2/random_state.py),
        so that the stream draws what it draws without the masked objectives (GBA-ITC's pass 1)."""
        if masked_hidden is None:
            return block(hidden, mask), None
        if self.random:
            output = block(hidden, mask)
            with masked_streams_random_state():
                return output, block(masked_hidden, mask)
        both_mask = None if mask is None else torch.cat([mask, mask])
        both = block(torch.cat([hidden, masked_hidden], dim=1), both_mask)
        return both.split(hidden.shape[1], dim=1)

    def _embed(self, hidden: Optional[torch.Tensor], mask: Optional[torch.Tensor], head: torch.nn.Linear
               ) -> Optional[torch.Tensor]:
        """VL layers (shared weights) -> final LN -> CLS -> head -> L2 normalise."""
        if hidden is None:
            return None
        return self._project(self.vl_encoder(hidden, mask), head)

    def _project(self, hidden: Optional[torch.Tensor], head: torch.nn.Linear) -> Optional[torch.Tensor]:
        if hidden is None:
            return None
        return F.normalize(head(self._first_token(hidden)), dim=-1)


def build_model(config: M2Config, spec: str = "auto", seed: Optional[int] = None, cmlm: bool = False,
                cmim: bool = False, drop_path_rate: float = 0.0, **transformer_config_overrides) -> M2PipelineStage:
    """This rank's pipeline stage, from megatron-core's parallel state (call parallel.initialize_model_parallel first).

    The initial weights are a function of `seed` alone, the same at every TP x PP layout (models/init.py); the
    trainer passes --seed. seed=None draws one from torch's default generator, so `torch.manual_seed(k)` before the
    call picks the weights (the same on every rank that seeded alike).
    cmlm / cmim: build the training-only parts of those objectives (models/decoders.py).
    drop_path_rate: stochastic depth of every layer stack (models/drop_path.py; --drop-path-rate).
    Overrides go to the TransformerConfig (e.g. recompute_granularity="full", bf16=True, params_dtype=...).
    Layout errors are raised before anything is allocated.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    validate_parallel_shapes(config, tp, pp)
    spec = resolve_spec(spec)
    overrides = dict(transformer_config_overrides)
    overrides.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    overrides.setdefault("pipeline_dtype", overrides.get("params_dtype", torch.float32))
    tc = transformer_config(config, tp, pp, **overrides)
    model = M2PipelineStage(config, tc, pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage(), spec=spec, cmlm=cmlm, cmim=cmim,
                           drop_path_rate=drop_path_rate)
    # Every parameter in params_dtype, as Megatron-LM's Float16Module casts them: megatron's torch LayerNorm (local
    # spec) is built in float32 whatever params_dtype says, and float32 parameters in a bf16 model break the
    # mixed-precision optimizer's checkpoint (its sharded_state_dict numbers the 16-bit parameters only).
    model.to(dtype=tc.params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if tc.perform_initialization:
        initialize_weights(model, int(torch.randint(2**62, (), device="cpu")) if seed is None else seed)
    return model
