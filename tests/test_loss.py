"""Grouped ITC loss: multi-process (gloo) results against a single-process CLIP reference on the same global batch.

What is compared, per rank s of the data-parallel group (DP ranks, g = --itc-group-size, J = mean over ITC groups of
each group's CLIP loss on the global batch, i.e. the objective megatron-core's DP-averaged gradients descend):
  * loss_s (its rows' loss): mean over ranks of loss_s == J; with local_loss=False every rank returns its group's loss.
  * the gradient that reaches rank s's own features through the gather == DP * dJ/dx_s (DDP then divides by DP);
  * mean over ranks of the local logit_scale gradient == dJ/dlogit_scale (what DDP's average produces).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_m2 import parallel
from megatron_m2.errors import ConfigError
from megatron_m2.loss import itc_loss
from megatron_m2.testing import run_distributed

B_LOCAL, DIM = 3, 8
LOG_SCALE = math.log(5.0)  # logits of O(5): the softmax is neither flat nor one-hot


def _features(num_rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(num_rows, DIM, generator=gen), dim=1)
    text = F.normalize(torch.randn(num_rows, DIM, generator=gen) + 0.5 * image, dim=1)
    return image, text


def _clip_reference(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    logits = log_scale.clamp(max=math.log(100)).exp() * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _reference(dp: int, group_size: int):
    """J = mean over groups of the group CLIP loss, with its gradients w.r.t. all global features and the scale."""
    image, text = _features(dp * B_LOCAL)
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(LOG_SCALE, requires_grad=True)
    rows = group_size * B_LOCAL
    group_losses = [
        _clip_reference(image[start : start + rows], text[start : start + rows], log_scale)
        for start in range(0, dp * B_LOCAL, rows)
    ]
    objective = torch.stack(group_losses).mean()
    objective.backward()
    return objective.detach(), group_losses, image.grad, text.grad, log_scale.grad


def _rank_step(tp: int, group_size, chunk_size, local_loss: bool):
    from megatron.core import parallel_state as ps

    layout = parallel.initialize_model_parallel(tp, 1, group_size)
    dp_rank = ps.get_data_parallel_rank()
    image, text = _features(layout.data_parallel_size * B_LOCAL)  # TP peers take identical rows
    rows = slice(dp_rank * B_LOCAL, (dp_rank + 1) * B_LOCAL)
    image, text = image[rows].clone().requires_grad_(True), text[rows].clone().requires_grad_(True)
    log_scale = torch.tensor(LOG_SCALE, requires_grad=True)
    loss, metrics = itc_loss(image, text, log_scale, group=parallel.get_itc_group(), chunk_size=chunk_size,
                             local_loss=local_loss)
    loss.backward()
    return {
        "dp_rank": dp_rank, "dp": layout.data_parallel_size, "loss": loss.detach(), "metrics": metrics,
        "image_grad": image.grad, "text_grad": text.grad, "scale_grad": log_scale.grad,
    }


def _check_against_reference(results, group_size, local_loss=True):
    dp = results[0]["dp"]
    g = group_size or dp
    objective, group_losses, image_grad, text_grad, scale_grad = _reference(dp, g)
    by_dp_rank: dict[int, dict] = {}
    for res in results:
        peer = by_dp_rank.setdefault(res["dp_rank"], res)
        # TP peers computed the loss redundantly on identical features: identical results
        torch.testing.assert_close(res["loss"], peer["loss"], rtol=0, atol=0)
        torch.testing.assert_close(res["image_grad"], peer["image_grad"], rtol=0, atol=0)
    assert sorted(by_dp_rank) == list(range(dp))
    ranks = [by_dp_rank[r] for r in range(dp)]
    if local_loss:
        torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), objective, rtol=1e-5, atol=1e-6)
    else:
        for r in ranks:
            torch.testing.assert_close(r["loss"], group_losses[r["dp_rank"] // g].detach(), rtol=1e-5, atol=1e-6)
    for r in ranks:
        rows = slice(r["dp_rank"] * B_LOCAL, (r["dp_rank"] + 1) * B_LOCAL)
        torch.testing.assert_close(r["image_grad"], dp * image_grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["text_grad"], dp * text_grad[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([r["scale_grad"] for r in ranks]).mean(), scale_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "group_size,chunk_size,local_loss",
    [(None, None, True), (2, None, True), (None, 5, True), (2, 4, True), (None, None, False), (2, None, False)],
)
def test_world4_matches_reference(group_size, chunk_size, local_loss):
    # group None = whole DP: exact CLIP loss of the global batch; group 2: mean of the two group losses.
    # chunk 5 does not divide the group batch (12), chunk 4 covers several chunks of a 6-row group.
    results = run_distributed(4, _rank_step, 1, group_size, chunk_size, local_loss)
    _check_against_reference(results, group_size, local_loss)


@pytest.mark.slow
@pytest.mark.parametrize("group_size,chunk_size", [(None, None), (2, 5)])
def test_world8_tp2_matches_reference(group_size, chunk_size):
    # TP2 x DP4: TP peers are in different ITC groups' replicas and must not be gathered twice
    results = run_distributed(8, _rank_step, 2, group_size, chunk_size, True)
    _check_against_reference(results, group_size)


def _loss_and_grads(image, text, log_scale, **kwargs):
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    log_scale = log_scale.clone().requires_grad_(True)
    loss, metrics = itc_loss(image, text, log_scale, **kwargs)
    loss.backward()
    return loss.detach(), metrics, image.grad, text.grad, log_scale.grad


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 50])
def test_single_process_is_clip_and_chunked_matches(chunk_size):
    image, text = _features(7)
    log_scale = torch.tensor(LOG_SCALE)
    ref = _loss_and_grads(image, text, log_scale)
    torch.testing.assert_close(ref[0], _clip_reference(image, text, log_scale))
    chunked = _loss_and_grads(image, text, log_scale, chunk_size=chunk_size)
    for got, want in zip(chunked[2:] + chunked[:1], ref[2:] + ref[:1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key in ("i2t_acc", "t2i_acc", "logit_scale"):
        torch.testing.assert_close(chunked[1][key], ref[1][key])


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_metrics_survive_the_schedule_scaling_the_loss_in_place(chunk_size):
    # megatron-core's pipeline schedule does `output_tensor /= num_microbatches` on the returned loss
    image, text = _features(6)
    loss, metrics = itc_loss(image, text, torch.tensor(LOG_SCALE), chunk_size=chunk_size)
    logged = loss.item()
    loss /= 4
    assert metrics["itc_loss"].item() == pytest.approx(logged)


def test_logit_scale_is_clamped_at_100():
    image, text = _features(5)
    loss, metrics, _, _, scale_grad = _loss_and_grads(image, text, torch.tensor(math.log(200.0)))
    assert metrics["logit_scale"].item() == pytest.approx(100.0)
    assert scale_grad.item() == 0.0  # clamped: no gradient pushes it further


def _bad_group(group_size):
    try:
        parallel.initialize_model_parallel(1, 1, group_size)
    except ConfigError as exc:
        return str(exc)
    return None


def _uneven_batch():
    parallel.initialize_model_parallel(1, 1, None)
    import torch.distributed as dist

    image, text = _features(2 + dist.get_rank() % 2)
    try:
        itc_loss(image, text, torch.tensor(LOG_SCALE), group=parallel.get_itc_group())
    except ConfigError as exc:
        return str(exc)
    return None


def test_bad_group_size_and_uneven_batches_raise_clear_errors():
    for message in run_distributed(4, _bad_group, 3):
        assert message is not None and "--itc-group-size 3" in message and "valid values: [1, 2, 4]" in message
    for message in run_distributed(4, _uneven_batch):
        assert message is not None and "same local batch" in message


def test_bad_arguments_raise_config_error():
    image, text = _features(4)
    with pytest.raises(ConfigError, match="same shape"):
        itc_loss(image, text[:3], torch.tensor(LOG_SCALE))
    with pytest.raises(ConfigError, match="chunk"):
        itc_loss(image, text, torch.tensor(LOG_SCALE), chunk_size=2, local_loss=False)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_loss_math_is_float32_for_bf16_embeddings(chunk_size):
    # a bf16 model's embeddings (and logit scale) in: logits, softmax and cross-entropy run in float32 in every mode,
    # as batch accumulation's pass 2 always did; the gradients go back in the inputs' dtype
    image, text = (t.bfloat16().requires_grad_(True) for t in _features(6))
    log_scale = torch.tensor(LOG_SCALE, dtype=torch.bfloat16, requires_grad=True)
    loss, metrics = itc_loss(image, text, log_scale, chunk_size=chunk_size)
    want, _ = itc_loss(image.detach().float(), text.detach().float(), log_scale.detach().float(), chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and metrics["itc_loss"].dtype == torch.float32
    assert loss.item() == want.item()  # bit for bit: the same float32 math on the same (bf16-representable) values
    loss.backward()
    assert image.grad.dtype == text.grad.dtype == log_scale.grad.dtype == torch.bfloat16
