"""Hugging Face side of megatron-m2: transformers config/model/processor (self-contained remote code), key mappings,
the official-checkpoint importer and the HF folder writer."""
