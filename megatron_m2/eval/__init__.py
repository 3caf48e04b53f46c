"""Zero-shot classification and image-text retrieval on embeddings from any encoder callables."""
from megatron_m2.eval.datasets import ImageFolderWithClassNames, read_retrieval_records
from megatron_m2.eval.retrieval import evaluate_retrieval, retrieval_metrics
from megatron_m2.eval.zeroshot import build_classifier, evaluate_zero_shot, zero_shot_accuracy

__all__ = ["ImageFolderWithClassNames", "read_retrieval_records", "evaluate_retrieval", "retrieval_metrics",
           "build_classifier", "evaluate_zero_shot", "zero_shot_accuracy"]
