"""The data path: GLM-compatible tokenizer, image transforms, webdataset tar shards and training batches."""
from megatron_m2.data.loader import ImageTextBatches, build_train_data
from megatron_m2.data.shards import ShardStream, resolve_shards
from megatron_m2.data.tokenizer import GLMTokenizer, check_vocab, load_tokenizer
from megatron_m2.data.transforms import eval_transform, train_transform

__all__ = ["GLMTokenizer", "ImageTextBatches", "ShardStream", "build_train_data", "check_vocab", "eval_transform",
           "load_tokenizer", "resolve_shards", "train_transform"]
