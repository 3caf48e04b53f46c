"""Run the evaluations with a pipeline-parallel model: every rank calls the encoders in lock-step.

Encoding goes through megatron-core's forward-only pipeline schedule (any TP/PP layout); the last stage's
embeddings are broadcast over the pipeline group so every rank computes the same metrics.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_m2.config import M2Config
from megatron_m2.data.device import to_device
from megatron_m2.models.m2_model import stage_sequence_length


def encode_forward_step(data_iterator, model: torch.nn.Module, **_):
    """The forward step of evaluation alone (the trainer hands its own, training/step.py's, which also computes the
    loss): one micro-batch through this stage; on the last stage the loss function returns the embeddings."""
    batch = next(data_iterator)
    output = model(batch["images"], batch["text_ids"], batch["text_padding_mask"])

    def embeddings(output_tensor, non_loss_data: bool = True):
        return output_tensor[0], output_tensor[1]

    return output, embeddings


def _encode(forward_step_func: Callable, model: torch.nn.Module, config: M2Config, batches: list[dict],
            micro_batch_size: int, with_images: bool, with_text: bool) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=iter(batches),
            model=model,
            num_microbatches=len(batches),
            seq_length=stage_sequence_length(model, with_images, with_text),
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    model.train(was_training)
    total = len(batches) * micro_batch_size
    embeds = torch.empty(total, config.out_dim, device=next(model.parameters()).device)
    if parallel_state.is_pipeline_last_stage():
        embeds.copy_(torch.cat([image if with_images else text for image, text in outputs]).float())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(embeds, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return embeds.cpu()


def _split(tensor: torch.Tensor, micro_batch_size: int) -> tuple[list[torch.Tensor], int]:
    """Micro-batches of equal size (the pipeline's p2p shapes are fixed); the last one padded by repetition."""
    n = tensor.shape[0]
    padded = math.ceil(n / micro_batch_size) * micro_batch_size
    if padded > n:
        tensor = torch.cat([tensor, tensor[-1:].expand(padded - n, *tensor.shape[1:])])
    return list(tensor.split(micro_batch_size)), n


def make_encoders(forward_step_func: Callable, model: torch.nn.Module, tokenizer, config: M2Config,
                  micro_batch_size: int
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
    """encode_images(images [n,3,H,W]) and encode_texts(texts) -> L2-normalised embeddings [n, out_dim].

    `forward_step_func(data_iterator, model)` is the trainer's step function (Megatron-LM's shape); its loss function
    must return the (image, text) embeddings when called with non_loss_data=True."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        chunks, n = _split(images, micro_batch_size)
        batches = [to_device(dict(images=c, text_ids=None, text_padding_mask=None), device, dtype) for c in chunks]
        return _encode(forward_step_func, model, config, batches, micro_batch_size, True, False)[:n]

    def encode_texts(texts: list[str]) -> torch.Tensor:
        ids, mask = tokenizer(list(texts))
        id_chunks, n = _split(ids, micro_batch_size)
        mask_chunks, _ = _split(mask, micro_batch_size)
        batches = [to_device(dict(images=None, text_ids=i, text_padding_mask=m), device, dtype)
                   for i, m in zip(id_chunks, mask_chunks)]
        return _encode(forward_step_func, model, config, batches, micro_batch_size, False, True)[:n]

    return encode_images, encode_texts


def parse_classnames(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def make_eval_fn(args: argparse.Namespace) -> Callable[[Callable, torch.nn.Module, object], dict[str, float]]:
    """The evaluation the flags ask for (zero-shot, retrieval, fine-grained): evaluate(forward_step_func, model,
    tokenizer)."""
    from megatron_m2.eval.datasets import ImageFolderWithClassNames, model_eval_transform
    from megatron_m2.eval.protocol import resolve_protocol
    from megatron_m2.parallel import print_rank_0
    from megatron_m2.eval.fine_grained import evaluate_fine_grained, read_fine_grained_records
    from megatron_m2.eval.retrieval import evaluate_retrieval
    from megatron_m2.eval.zeroshot import evaluate_zero_shot

    config: M2Config = args.model_config
    transform = model_eval_transform(config)  # the model's saved preprocessing (squash for the release's weights)
    protocol = resolve_protocol(args.eval_protocol, config, args.caption_normalization)
    announced = []  # said once, at the first evaluation (the process group exists by then: rank 0 alone prints)
    zeroshot: Optional[ImageFolderWithClassNames] = None
    if args.zeroshot_data:
        zeroshot = ImageFolderWithClassNames(args.zeroshot_data, parse_classnames(args.zeroshot_classnames),
                                             transform, template_files=parse_classnames(args.zeroshot_templates))
    fine_grained = read_fine_grained_records(args.fine_grained_data) if args.fine_grained_data else None

    def evaluate(forward_step_func: Callable, model: torch.nn.Module, tokenizer) -> dict[str, float]:
        if not announced:
            print_rank_0(f"evaluation protocol: {protocol.describe()}")
            announced.append(True)
        encode_images, encode_texts = make_encoders(forward_step_func, model, tokenizer, config, args.eval_batch_size)
        results: dict[str, float] = {}
        if zeroshot is not None:
            results.update(evaluate_zero_shot(zeroshot, zeroshot.class_names, encode_images, encode_texts,
                                              batch_size=args.eval_batch_size,
                                              caption_normalization=protocol.caption_normalization))
        if args.retrieval_data:
            scores = evaluate_retrieval(args.retrieval_data, encode_images, encode_texts, transform,
                                        batch_size=args.eval_batch_size, image_root=args.retrieval_image_root,
                                        caption_normalization=protocol.caption_normalization,
                                        shared_captions_match=protocol.shared_captions_match)
            results.update({f"retrieval/{k}": v for k, v in scores.items()})
        if fine_grained is not None:
            scores = evaluate_fine_grained(args.fine_grained_data, encode_images, encode_texts, transform,
                                           batch_size=args.eval_batch_size, pairs=fine_grained)
            results.update({f"fine/{k}": v for k, v in scores.items()})
        return results

    return evaluate
