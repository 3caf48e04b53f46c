"""The progress log speaks Megatron-LM: TensorBoard tags, the log line, skipped/NaN counts, the JSONL metrics."""
import json
import math

from megatron_m2.training.progress import MetricsLogger


def _tags(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_megatron_tags_log_line_and_metrics_file(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path / "tb"), train_iters=3, flops_per_sample=1e9, world_size=1, on_gpu=False,
                           metrics_file=str(tmp_path / "metrics.jsonl"))
    steps = [dict(itc_loss=2.5, lr=1e-3, grad_norm=4.0, logit_scale=14.0),
             dict(itc_loss=math.nan, lr=2e-3, grad_norm=5.0, logit_scale=14.0, skipped=1.0),
             dict(itc_loss=2.0, lr=3e-3, grad_norm=3.0, logit_scale=14.0)]
    for iteration, metrics in enumerate(steps, start=1):
        logger.step(iteration, iteration * 16, 16, metrics, print_line=iteration == 3)
    logger.scalars("eval", {"en/top1": 50.0}, 3)
    logger.close()

    line = capsys.readouterr().out.strip().splitlines()[-1]
    for part in ("iteration        3/       3", "consumed samples:           48", "elapsed time per iteration (ms):",
                 "learning rate: 3.000000E-03", "global batch size:    16", "itc loss: 2.000000E+00",
                 "grad norm: 3", "number of skipped iterations:   1", "number of nan iterations:   1", "samples/s:"):
        assert part in line, (part, line)
    tags = _tags(tmp_path / "tb")
    for tag in ("learning-rate", "learning-rate vs samples", "itc-loss", "itc-loss vs samples", "grad-norm",
                "grad-norm vs samples", "batch-size", "batch-size vs samples", "iteration-time", "skipped-iterations",
                "nan-iterations", "eval/en/top1"):
        assert tag in tags, (tag, sorted(tags))
    assert [step for step, _ in tags["learning-rate vs samples"]] == [16, 32, 48]  # x axis: consumed samples
    assert tags["nan-iterations"][-1] == (3, 1.0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["consumed_samples"] for r in records if r["kind"] == "train"] == [16, 32, 48]
    assert records[0]["itc_loss"] == 2.5 and records[-1] == {"kind": "eval", "iteration": 3, "en/top1": 50.0}
