"""megatron-m2: a megatron-core trainer for bilingual (Chinese + English) M2-Encoder image-text encoders."""

__version__ = "0.1.0"
