"""Text tower input: vocab-parallel token embedding plus learned absolute positions (offset 2, as torchscale)."""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_m2.config import M2Config, padded_vocab_size


class TextEmbedding(MegatronModule):
    """token ids [b, L] -> [L, b, hidden] (sequence first).

    The token table is padded to padded_vocab_size(vocab_size, TP) rows and split over TP (megatron convention); the
    padding rows are never indexed by a valid tokenizer and converters strip them. Positions are replicated.
    """

    def __init__(self, config: M2Config, transformer_config: TransformerConfig):
        super().__init__(config=transformer_config)
        tp = transformer_config.tensor_model_parallel_size
        self.position_offset = config.position_offset
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab_size(config.vocab_size, tp), config.hidden_size,
            init_method=transformer_config.init_method, config=transformer_config,
        )
        self.position_embeddings = torch.nn.Embedding(config.text_position_table_size, config.hidden_size,
                                                      dtype=transformer_config.params_dtype)
        if transformer_config.perform_initialization:
            transformer_config.init_method(self.position_embeddings.weight)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(text_ids)  # [b, L, h]
        start = self.position_offset
        x = x + self.position_embeddings.weight[start:start + text_ids.shape[1]]
        return x.transpose(0, 1).contiguous()
