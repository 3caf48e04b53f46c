"""The trainer against a plain PyTorch loop of the same math, on CPU: what the trainer's machinery costs per step.

    .venv/bin/python -m benchmarks.trainer_overhead [--rounds 3] [--steps 12]   # BENCHMARKS.md records the runs
    .venv/bin/python -m benchmarks.trainer_overhead --breakdown   # the models alone, one linear layer

Both sides train the same model shape (`MODEL`: 4 layers = 3 backbone + 1 VL, hidden 256, 32 px images, batch 64,
fp32, TP1 PP1, one process) on the same data iterator (the trainer's loader over the demo's digit shards, which
`python -m megatron_m2.demo prepare` writes; `--data-dir` reuses them):

  trainer  `python -m megatron_m2.train` with its defaults for this machine (its --num-workers and thread policy,
           megatron-core DDP, optimizer wrapper and schedule, GBA-ITC, metrics, the per-step SIGTERM check),
           per-step times parsed from its log line (--log-interval 1).
  plain    this module's `plain_loop`: the transformers model class (megatron_m2/hf/modeling_m2.py), the symmetric
           CLIP loss, torch.optim.AdamW (the trainer's betas, eps and weight decay, no decay on 1-D parameters),
           gradient clipping to 1.0, the same warmup + cosine learning rate, the loss read back every step; torch's
           default threads (every core) and the loader in the training process (--num-workers 0).
  plain, freed memory kept
           the same plain loop with the trainer's setting of glibc's malloc on CPU (megatron_m2/host_memory.py):
           the trainer's machinery alone against the same loop, the allocator taken out of the comparison.

Each side runs in a fresh process (start-up and the first 3 steps are excluded); they alternate --rounds times, so
all see the same machine load. Reported: the median step time of each over all rounds and the trainer's ratio to each
plain loop.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 256, "num_attention_heads": 8, "ffn_hidden_size": 1024, "num_layers": 3, "num_vl_layers": 1,
         "out_dim": 128, "image_size": 32, "patch_size": 4, "vocab_size": 1024, "max_text_length": 16,
         "text_position_table_size": 18, "init_method_std": 0.0625}
BATCH, WARMUP_STEPS, LR = 64, 3, 1e-4
SIDES = ("trainer", "plain", "plain, freed memory kept")


def _model_file(directory: Path) -> Path:
    path = directory / "trainer_overhead_model.json"
    path.write_text(json.dumps(MODEL))
    return path


def trainer_times(data_dir: Path, steps: int, model_file: Path, extra: list[str]) -> list[float]:
    """Seconds per step of the real trainer (its log line's elapsed time per iteration, --log-interval 1)."""
    cmd = [sys.executable, "-m", "megatron_m2.train", "--model", str(model_file), "--micro-batch-size", str(BATCH),
           "--global-batch-size", str(BATCH), "--train-iters", str(steps), "--lr", str(LR), "--lr-warmup-iters", "2",
           "--log-interval", "1", "--no-hflip", "--data-path", str(data_dir / "data" / "train"),
           "--tokenizer-model", str(data_dir / "tokenizer.model"), *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
    times = [float(t) / 1000 for t in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", out.stdout)]
    return times[WARMUP_STEPS:]


def plain_loop(data_dir: Path, steps: int, keep_freed_memory: bool = False) -> list[float]:
    """Seconds per step of the plain loop (see the module docstring); keep_freed_memory: with the trainer's setting
    of glibc's malloc (megatron_m2/host_memory.py)."""
    import torch
    import torch.nn.functional as F

    from megatron_m2.config import M2Config
    from megatron_m2.data import build_train_data, load_tokenizer, to_device
    from megatron_m2.hf.convert import hf_config_from_m2
    from megatron_m2.hf.modeling_m2 import M2EncoderModel
    from megatron_m2.host_memory import keep_freed_host_memory

    if keep_freed_memory and not keep_freed_host_memory():
        raise SystemExit("glibc's malloc settings could not be changed here (host_memory.py)")
    torch.manual_seed(0)
    config = M2Config(**MODEL)
    model = M2EncoderModel(hf_config_from_m2(config)).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.98), eps=1e-6)
    tokenizer = load_tokenizer(str(data_dir / "tokenizer.model"), config.max_text_length)
    data = build_train_data(str(data_dir / "data" / "train"), tokenizer, config, BATCH, 0, 1, seed=1234,
                            num_workers=0, hflip=False)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = to_device(next(data), torch.device("cpu"))
        lr = LR * min(1.0, (step + 1) / 2) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        image = model.get_image_features(batch["images"])
        text = model.get_text_features(batch["text_ids"], (~batch["text_padding_mask"]).long())
        logits = model.logit_scale.clamp(max=math.log(100)).exp() * image @ text.t()
        labels = torch.arange(logits.shape[0])
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - start)
    data.close()
    return times[WARMUP_STEPS:]


def breakdown(reps: int = 8) -> dict[str, float]:
    """Median milliseconds, interleaved in this process: the two models alone (forward + backward of the CLIP loss,
    and forward without grad) on one batch, then one megatron-core ColumnParallelLinear against nn.Linear at the
    models' largest shape, and the two orders of its weight-gradient product. Where the trainer's step differs from
    the plain loop's once the machinery around it is taken away. glibc's malloc is set as the trainer sets it on CPU
    (megatron_m2/host_memory.py)."""
    import torch
    import torch.nn.functional as F

    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_m2 import parallel
    from megatron_m2.config import M2Config
    from megatron_m2.hf.convert import hf_config_from_m2
    from megatron_m2.hf.modeling_m2 import M2EncoderModel
    from megatron_m2.host_memory import keep_freed_host_memory
    from megatron_m2.models import build_model

    keep_freed_host_memory()
    parallel.initialize_model_parallel(1, 1)
    config = M2Config(**MODEL)
    torch.manual_seed(0)
    megatron_model = build_model(config, spec="local")
    hf_model = M2EncoderModel(hf_config_from_m2(config)).train()
    images = torch.randn(BATCH, 3, config.image_size, config.image_size)
    ids = torch.randint(0, config.vocab_size, (BATCH, config.max_text_length))
    padding = torch.zeros(BATCH, config.max_text_length, dtype=torch.bool)
    labels = torch.arange(BATCH)

    def clip(image, text, scale):
        logits = scale * image @ text.t()
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    def megatron_step(grad: bool = True):
        with torch.set_grad_enabled(grad):
            image, text = megatron_model(images, ids, padding)[:2]
            if grad:
                clip(image, text, megatron_model.logit_scale.exp()).backward()

    def hf_step(grad: bool = True):
        with torch.set_grad_enabled(grad):
            image = hf_model.get_image_features(images)
            text = hf_model.get_text_features(ids, (~padding).long())
            if grad:
                clip(image, text, hf_model.logit_scale.exp()).backward()

    tokens, hidden, ffn = (config.vision_seq_length) * BATCH, config.hidden_size, config.ffn_hidden_size
    linear_config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=config.num_attention_heads,
                                      use_cpu_initialization=True)
    column = ColumnParallelLinear(hidden, ffn, config=linear_config, init_method=torch.nn.init.normal_, bias=True,
                                  gather_output=False)
    linear = torch.nn.Linear(hidden, ffn)
    x = torch.randn(config.vision_seq_length, BATCH, hidden, requires_grad=True)
    x2, g = torch.randn(tokens, hidden), torch.randn(tokens, ffn)
    cases = {
        "model forward+backward: megatron-core": megatron_step,
        "model forward+backward: HF class": hf_step,
        "model forward (no grad): megatron-core": lambda: megatron_step(False),
        "model forward (no grad): HF class": lambda: hf_step(False),
        "linear forward+backward: ColumnParallelLinear": lambda: column(x)[0].sum().backward(),
        "linear forward+backward: nn.Linear": lambda: linear(x).sum().backward(),
        "weight gradient g^T x (megatron-core)": lambda: g.t().matmul(x2),
        "weight gradient x^T g (autograd's addmm)": lambda: x2.t().mm(g),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    parallel.destroy_model_parallel()
    return {name: 1000 * statistics.median(values[2:] or values) for name, values in times.items()}


def _plain_in_subprocess(data_dir: Path, steps: int, keep_freed_memory: bool) -> list[float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.trainer_overhead", "--plain-only", "--steps", str(steps),
                          "--data-dir", str(data_dir)] + ["--plain-keeps-freed-memory"] * keep_freed_memory,
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="trainer / plain alternations")
    p.add_argument("--steps", type=int, default=12, help="steps per run (the first 3 are not timed)")
    p.add_argument("--data-dir", default=None, help="the demo's prepared data (default: a temporary one)")
    p.add_argument("--trainer-flags", default="", help="extra trainer flags, e.g. '--num-workers 1'")
    p.add_argument("--breakdown", action="store_true",
                   help="instead: time the two models alone and one megatron-core linear against nn.Linear (where "
                        "the rest of the gap is)")
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain-keeps-freed-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.breakdown:
        for name, ms in breakdown().items():
            print(f"{name:48s} {ms:8.1f} ms")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        if args.plain_only:
            print(json.dumps(plain_loop(data_dir, args.steps, args.plain_keeps_freed_memory)))
            return 0
        if not (data_dir / "tokenizer.model").exists():
            from megatron_m2.demo import prepare

            prepare(data_dir)
        model_file = _model_file(Path(tmp))
        runs: dict[str, list[float]] = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            runs["trainer"] += trainer_times(data_dir, args.steps, model_file, args.trainer_flags.split())
            runs["plain"] += _plain_in_subprocess(data_dir, args.steps, keep_freed_memory=False)
            runs["plain, freed memory kept"] += _plain_in_subprocess(data_dir, args.steps, keep_freed_memory=True)
            print(f"round {round_ + 1} (medians so far): " + ", ".join(
                f"{side} {1000 * statistics.median(times):.1f} ms" for side, times in runs.items()), flush=True)
    medians = {side: statistics.median(times) for side, times in runs.items()}
    trainer, plain, plain_kept = medians.values()
    print(f"trainer {1000 * trainer:.1f} ms per step; plain loop {1000 * plain:.1f} ms: {trainer / plain:.2f}x; "
          f"plain loop with the trainer's malloc setting {1000 * plain_kept:.1f} ms: {trainer / plain_kept:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
