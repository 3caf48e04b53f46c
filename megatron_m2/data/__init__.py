"""The data path: GLM-compatible tokenizer, image transforms, webdataset tar shards and training batches."""
from megatron_m2.data.tokenizer import GLMTokenizer, check_vocab, load_tokenizer

__all__ = ["GLMTokenizer", "check_vocab", "load_tokenizer"]
