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
                 "time left: 0:00:00", "learning rate: 3.000000E-03", "global batch size:    16", "itc loss: 2.000000E+00",
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


def test_progress_line_says_what_how_far_how_fast_and_how_long_is_left(capsys):
    from megatron_m2.progress_line import ProgressLine, format_duration

    assert format_duration(3725.4) == "1:02:05" and format_duration(-3) == "0:00:00"
    with ProgressLine("quick work", 10, "images", quiet_s=1e9) as quiet:  # ends within quiet_s: silent
        quiet.update(10)
    assert capsys.readouterr().out == ""
    with ProgressLine("encoding images", 40_000, "images", interval_s=0, quiet_s=0) as progress:
        progress.start -= 1000.0  # as if 1000 s had passed: 10,000 images in 1000 s is 10 images/s
        progress.update(10_000)
    first, last = capsys.readouterr().out.strip().splitlines()
    assert first == "encoding images: 10,000/40,000 images (25%), 10.0 images/s, 0:50:00 left", first
    assert last.startswith("encoding images: 10,000 images in 0:16:40"), last
    with ProgressLine("counting", None, "rows", interval_s=0, quiet_s=0, enabled=False) as off:
        off.update(5)
    assert capsys.readouterr().out == ""
