"""Multi-node launches, for real, with two "nodes" on this machine (2 processes each, gloo on CPU).

- Two torchrun launchers with --nnodes 2 and a c10d rendezvous on 127.0.0.1 (each launcher is one node) train the
  tiny preset at DP 4 with --itc-group-size 2: the contrastive loss aggregates inside a node, the node-aligned ITC
  groups of the README (ranks 0, 1 on one node, 2, 3 on the other).
- The Slurm batch script's launch line (examples/slurm/pretrain_m2.sbatch -> slurm_env.sh -> examples/launch.sh ->
  torchrun) with a fake srun that starts the command once per node, both at once, as srun does: the trainers of
  both nodes meet at the first node's address and train.
Each node's output is kept apart, so the tests see which ranks ran on which node.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_slurm import FAKE_SCONTROL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
TRAIN = ["--model", "tiny", "--micro-batch-size", "4", "--global-batch-size", "32", "--itc-group-size", "2",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--num-workers", "0", "--timing-log-level", "2",
         "--log-straggler"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _ranks_by_node(logs: list[str]) -> list[set[int]]:
    return [{int(r) for r in re.findall(r"^\[rank (\d+)\] stage", log, re.M)} for log in logs]


def _check_training(logs: list[str], metrics: Path) -> None:
    nodes = _ranks_by_node(logs)
    assert sorted(map(sorted, nodes)) == [[0, 1], [2, 3]], logs
    groups = {tuple(int(r) for r in g.split(", ")) for g in re.findall(r"ITC group ranks \[([\d, ]+)\]", "".join(logs))}
    assert groups == {(0, 1), (2, 3)}  # each group is one node's ranks
    assert all(set(group) in nodes for group in groups)
    text = "".join(logs)
    assert "contrastive batch 16 pairs per ITC group" in text  # 2 ranks x 2 micro-batches x 4
    lines = re.findall(r"iteration +(\d+)/ +\d+ .*itc loss: ([0-9.E+-]+)", text)
    assert [int(i) for i, _ in lines] == list(range(1, STEPS + 1)) and metrics.exists()
    # the Timers of the step (level 2) and the straggler detector's CPU note
    for timer in ("forward-backward", "batch-generator", "optimizer", "itc-embeddings-forward", "itc-loss",
                  "itc-gather", "all-grads-sync"):
        assert f"    {timer} ." in text, timer
    assert "the straggler detector times CUDA events" in text


def test_two_torchrun_launchers_with_a_c10d_rendezvous(demo_data, tmp_path):
    port = _free_port()
    flags = [*TRAIN, "--train-iters", str(STEPS), "--data-path", str(demo_data / "data" / "train"),
             "--tokenizer-model", str(demo_data / "tokenizer.model"), "--metrics-file", str(tmp_path / "m.jsonl")]
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "m2-two-nodes",
         "-m", "megatron_m2.train", *flags],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = []
    try:
        for launcher in launchers:
            out, _ = launcher.communicate(timeout=600)
            logs.append(out)
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    _check_training(logs, tmp_path / "m.jsonl")


# srun --ntasks-per-node=1: the command once per node, all nodes at once, each with its SLURM_NODEID
PARALLEL_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  (cd "$FAKE_REPO" && SLURM_NODEID=$node SLURM_PROCID=$node "$@") > "$FAKE_LOG/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# launch.sh calls `torchrun`: this interpreter's (the checkout under test), whatever else is on PATH
TORCHRUN = """#!/usr/bin/env bash
exec "$M2_PYTHON" -m torch.distributed.run "$@"
"""
LAUNCHER = """RUN_NAME=tiny_two_nodes
MODEL_ARGS=()
PARALLEL_ARGS=()
TRAIN_ARGS=({train})
source {root}/examples/launch.sh
"""


def test_the_sbatch_launch_line_trains_on_two_nodes(demo_data, tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", PARALLEL_SRUN), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    launcher = tmp_path / "pretrain_m2_tiny_two_nodes.sh"
    launcher.write_text(LAUNCHER.format(train=" ".join([*TRAIN, "--train-iters", str(STEPS), "--metrics-file",
                                                         str(tmp_path / "m.jsonl")]), root=ROOT))
    env = {**_env(), "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_REPO": str(ROOT),
           "M2_PYTHON": sys.executable, "FAKE_HOSTS": "127.0.0.1 127.0.0.1", "FAKE_NODELIST": "localhost[2]",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost[2]",
           "SLURM_SUBMIT_DIR": str(ROOT), "LOG_DIR": str(tmp_path / "logs"), "CONTAINER_IMAGE": "none",
           "GPUS_PER_NODE": "2", "MASTER_PORT": str(_free_port()), "DATA_PATH": str(demo_data / "data" / "train"),
           "TOKENIZER_MODEL": str(demo_data / "tokenizer.model"), "CHECKPOINT_DIR": str(tmp_path / "ckpt")}
    job = subprocess.run(["bash", "examples/slurm/pretrain_m2.sbatch", str(launcher)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    logs = [(log / f"node{node}.log").read_text() for node in range(2)]
    assert job.returncode == 0, job.stdout + job.stderr + "\n".join(text[-3000:] for text in logs)
    assert "2 node(s) x 2 GPUs, rendezvous 127.0.0.1" in job.stdout
    _check_training(logs, tmp_path / "m.jsonl")
    from megatron_m2.checkpointing import latest_iteration

    assert latest_iteration(str(tmp_path / "ckpt")) == STEPS  # launch.sh saves at the end (--save = --load)
