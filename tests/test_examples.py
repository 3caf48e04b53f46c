"""The multi-GPU examples run the layout the planner finds fastest for their GPU count, memory and contrastive batch.

Each examples/pretrain_m2_<size>.sh is run for real with --dry-run and a fake `python` on PATH that records the
trainer command line; the trainer's own parser reads it. The planner (tools/plan.py's defaults: H100 80 GB nodes of
8 GPUs) then plans the same model, batch and flags with the example's contrastive batch (its ITC group of all
data-parallel ranks: the global batch). The example must use the fastest plan's TP, PP and ITC group, turn
activation recompute on exactly when that plan needs it, and carry no flag that does nothing there (the distributed
optimizer at DP 1). An example may deviate when a comment line starting with "# not the planner's fastest layout:"
says why.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from megatron_m2 import planner
from megatron_m2.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["pretrain_m2_0.4b.sh", "pretrain_m2_1b.sh", "pretrain_m2_10b.sh"]
DEVIATION = "# not the planner's fastest layout:"
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_ARGV"
"""


def _trainer_argv(script: str, tmp_path: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    argv_file = tmp_path / f"{script}.argv"
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "GPUS_PER_NODE", "ITC_GROUP_SIZE",
                                                            "GLOBAL_BATCH_SIZE")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_ARGV=str(argv_file), DATA_PATH="/data/{0..9}.tar",
               TOKENIZER_MODEL="/data/sp.model")
    subprocess.run(["bash", str(ROOT / "examples" / script), "--dry-run"], env=env, check=True, timeout=60,
                   capture_output=True)
    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    assert argv[:2] == ["-m", "megatron_m2.train"], argv
    return argv[2:]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_uses_the_planners_fastest_layout(script, tmp_path):
    from megatron_m2.training.arguments import build_parser

    args = build_parser().parse_args(_trainer_argv(script, tmp_path))
    config = load_config(args.model)
    training = planner.Training(
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, bf16=args.bf16,
        use_distributed_optimizer=args.use_distributed_optimizer, recompute=None,
        spec="local" if args.spec == "local" else "te", itc_chunk_size=args.itc_chunk_size,
        itc_batch_accumulation=args.itc_batch_accumulation, clip_grad=args.clip_grad > 0)
    plans, _ = planner.plan_all(config, args.world_size, training, planner.Hardware(),
                                itc_batch=args.global_batch_size)
    best = next(p for p in plans if p.fits)
    dp = args.world_size // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
    ours = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.itc_group_size or dp)
    fastest = (best.tensor_model_parallel_size, best.pipeline_model_parallel_size, best.itc_group_size)
    text = (ROOT / "examples" / script).read_text()
    if ours != fastest:
        assert DEVIATION in text, (f"{script} runs TP/PP/ITC group {ours}; the planner's fastest is {fastest} at "
                                   f"{best.time['step']:.2f} s/step: use it or say why not ({DEVIATION} ...)")
        return
    assert args.recompute_activations == best.recompute, f"{script}: recompute {args.recompute_activations}"
    assert not (args.use_distributed_optimizer and dp == 1), f"{script}: a distributed optimizer does nothing at DP1"
    # the header states the layout and the step time it was chosen by (within 15%: other estimates may move it)
    assert f"TP={ours[0]}" in text and f"PP={ours[1]}" in text
    stated = re.search(r"predicts ([\d.]+) s/step", text)
    assert stated and float(stated.group(1)) == pytest.approx(best.time["step"], rel=0.15), (script, best.time)


def test_the_10b_sbatch_asks_for_the_examples_nodes():
    sbatch = (ROOT / "examples" / "slurm" / "pretrain_m2_10b.sbatch").read_text()
    script = (ROOT / "examples" / "pretrain_m2_10b.sh").read_text()
    nodes = re.search(r"#SBATCH --nodes=(\d+)", sbatch).group(1)
    assert f"NNODES=${{NNODES:-{nodes}}}" in script and "examples/pretrain_m2_10b.sh" in sbatch
