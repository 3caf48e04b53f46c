"""The M2-Encoder on megatron-core: layer specs (local / te), Sub-LN under TP, towers, the pipeline-stage model.

Importing this package never requires TransformerEngine or apex (the te spec imports them only when selected).
"""
from megatron_m2.models.layer_spec import get_layer_spec, resolve_spec, te_available
from megatron_m2.models.m2_model import M2PipelineStage, build_model
from megatron_m2.models.sub_ln import SubLNRowParallelLinear, TensorParallelLayerNorm

__all__ = [
    "M2PipelineStage", "build_model", "get_layer_spec", "resolve_spec", "te_available",
    "SubLNRowParallelLinear", "TensorParallelLayerNorm",
]
