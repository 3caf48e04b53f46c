"""The Slurm launch (examples/slurm/) run for real in bash, with fake `srun`, `scontrol` and `torchrun` on PATH.

The fakes record what they were called with; srun runs its command once per node with the SLURM_NODEID that a
real `srun --ntasks-per-node=1` would give, so the test sees the exact torchrun command line of every node.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = 4242
HOSTS = ["gpu-a017", "gpu-a018", "gpu-b001", "gpu-b002"]

FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") [[ "$3" == "$FAKE_NODELIST" ]] || exit 3; printf '%s\\n' $FAKE_HOSTS ;;
  *) echo "$*" >> "$FAKE_LOG/scontrol" ;;
esac
"""
# Records its options, then runs the command once per node (sequentially; the fake torchrun returns at once).
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "$1" >> "$FAKE_LOG/srun"; shift; done
if [[ -n "${FAKE_SRUN_BLOCK:-}" ]]; then
  sleep 30 & sleeper=$!
  trap 'echo TERM >> "$FAKE_LOG/srun.signals"; kill $sleeper; exit 0' TERM
  echo $$ > "$FAKE_LOG/srun.pid"; touch "$FAKE_LOG/srun.started"; wait; exit 1
fi
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  (cd "$FAKE_REPO" && SLURM_NODEID=$node SLURM_PROCID=$node "$@") || exit $?
done
"""
FAKE_SQUEUE = """#!/usr/bin/env bash
printf '%s\\n' "$SLURM_JOB_ID.batch" "$SLURM_JOB_ID.extern" "$SLURM_JOB_ID.0"
"""
# scancel --signal=TERM reaches the step's processes: here, the blocked fake srun.
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scancel"
kill -TERM "$(cat "$FAKE_LOG/srun.pid")"
"""
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_LOG/torchrun.$$"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("squeue", FAKE_SQUEUE),
                       ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def env(nodes: int, **extra: str) -> dict[str, str]:
        keep = {k: os.environ[k] for k in ("HOME", "LANG") if k in os.environ}
        return {**keep, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_REPO": str(ROOT),
                "FAKE_HOSTS": " ".join(HOSTS[:nodes]), "FAKE_NODELIST": f"gpu-nodes[{nodes}]",
                "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
                "SLURM_JOB_NODELIST": f"gpu-nodes[{nodes}]", "SLURM_GPUS_ON_NODE": "8",
                "SLURM_SUBMIT_DIR": str(ROOT), "LOG_DIR": str(tmp_path / "logs"),
                "DATA_PATH": "/data/shards/{00000..00009}.tar", "TOKENIZER_MODEL": "/data/glm_sp.model",
                "CONTAINER_IMAGE": "/images/megatron-m2.sqsh", **extra}

    return env, log


def _torchrun_calls(log: Path) -> list[list[str]]:
    return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(log.glob("torchrun.*"))]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("nodes", [1, 4])
def test_10b_sbatch_gives_each_node_its_torchrun_arguments(fake_slurm, nodes):
    env, log = fake_slurm
    result = subprocess.run(["bash", "examples/slurm/pretrain_m2_10b.sbatch", "--train-iters", "7"], cwd=ROOT,
                            env=env(nodes), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = _torchrun_calls(log)
    port = str(20000 + JOB_ID % 20000)
    prefixes = sorted(call[:call.index("-m") + 2] for call in calls)
    assert prefixes == [["--nnodes", str(nodes), "--node-rank", str(rank), "--nproc-per-node", "8",
                         "--master-addr", HOSTS[0], "--master-port", port, "-m", "megatron_m2.train"]
                        for rank in range(nodes)]
    for call in calls:
        assert _flag(call, "--model") == "10b" and call[-2:] == ["--train-iters", "7"]
        assert _flag(call, "--save") == _flag(call, "--load")  # auto-resume from the latest checkpoint
    srun = (log / "srun").read_text().split()
    assert "--ntasks-per-node=1" in srun and "--container-image=/images/megatron-m2.sqsh" in srun
    assert f"--container-mounts={ROOT}:/workspace/megatron-m2" in srun
    assert "--container-workdir=/workspace/megatron-m2" in srun


def test_gpus_per_node_with_a_gpu_type_and_user_overrides(fake_slurm):
    env, _ = fake_slurm
    fake = env(2, SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="31000")
    del fake["SLURM_GPUS_ON_NODE"]
    out = subprocess.run(["bash", "examples/slurm/slurm_env.sh", "--print"], cwd=ROOT, env={**fake, "SLURM_NODEID": "1"},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == ["NNODES=2", "NODE_RANK=1", "GPUS_PER_NODE=4", f"MASTER_ADDR={HOSTS[0]}",
                           "MASTER_PORT=31000"]


def test_outside_slurm_is_a_clear_error(fake_slurm):
    env, _ = fake_slurm
    fake = env(1)
    del fake["SLURM_JOB_ID"]
    result = subprocess.run(["bash", "examples/slurm/slurm_env.sh", "--print"], cwd=ROOT, env=fake,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "not inside a Slurm job" in result.stderr


def test_without_container_runs_in_the_checkout(fake_slurm):
    env, log = fake_slurm
    subprocess.run(["bash", "examples/slurm/pretrain_m2.sbatch", "examples/pretrain_m2_1b.sh"], cwd=ROOT,
                   env=env(1, CONTAINER_IMAGE="none"), capture_output=True, text=True, timeout=60, check=True)
    srun = (log / "srun").read_text().split()
    assert f"--chdir={ROOT}" in srun and not [a for a in srun if a.startswith("--container")]
    assert _flag(_torchrun_calls(log)[0], "--model") == "1b"


def _signal_running_job(env: dict[str, str], log: Path, sig: int) -> subprocess.CompletedProcess:
    job = subprocess.Popen(["bash", "examples/slurm/pretrain_m2_10b.sbatch"], cwd=ROOT,
                           env={**env, "FAKE_SRUN_BLOCK": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 30
    while not (log / "srun.started").exists():
        assert job.poll() is None and time.monotonic() < deadline, "fake srun never started"
        time.sleep(0.05)
    job.send_signal(sig)
    out, err = job.communicate(timeout=30)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def test_time_limit_signal_saves_then_requeues(fake_slurm):
    env, log = fake_slurm
    result = _signal_running_job(env(4), log, signal.SIGUSR1)
    assert result.returncode == 0, result.stderr
    assert (log / "srun.signals").read_text().split() == ["TERM"]  # the trainers get SIGTERM and save
    assert (log / "scancel").read_text().split() == ["--signal=TERM", f"{JOB_ID}.0"]
    assert (log / "scontrol").read_text().split() == ["requeue", str(JOB_ID)]


@pytest.mark.parametrize("sig,extra", [(signal.SIGTERM, {}), (signal.SIGUSR1, {"SLURM_RESTART_COUNT": "3",
                                                                                "MAX_RESTARTS": "3"})])
def test_no_requeue_on_scancel_or_after_max_restarts(fake_slurm, sig, extra):
    env, log = fake_slurm
    result = _signal_running_job(env(1, **extra), log, sig)
    assert result.returncode == 0, result.stderr
    assert (log / "srun.signals").read_text().split() == ["TERM"]
    assert not (log / "scontrol").exists()


# -- the real thing: a one-node Slurm (examples/slurm/local_slurm.sh) runs the tiny preset through sbatch -------------

def _free_port_pair() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture
def local_slurm(tmp_path):
    import shutil

    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(c, path="/usr/sbin:/usr/bin")
               is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): apt-get install slurmd slurmctld "
                    "slurm-client munge to run this test")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd and munged needs root")
    if os.environ.get("M2_TEST_REAL_SLURM") != "1":
        # Starts daemons and trains for about a minute on 2 cores: opt in (CI images with Slurm set it).
        pytest.skip("set M2_TEST_REAL_SLURM=1 to start a one-node Slurm and submit the tiny job through sbatch")
    cluster = tmp_path / "slurm"
    script = ROOT / "examples" / "slurm" / "local_slurm.sh"
    try:  # stop whatever part of the cluster started, also when start fails or times out
        started = subprocess.run(["bash", str(script), "start", str(cluster), str(_free_port_pair())],
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        yield cluster / "slurm.conf"
    finally:
        stopped = subprocess.run(["bash", str(script), "stop", str(cluster)], capture_output=True, text=True,
                                 timeout=60)
        # stop waits until each daemon (by its pid file) has exited: no munged/slurmctld/slurmd outlives the test
        assert stopped.returncode == 0, stopped.stderr


TINY_LAUNCHER = """RUN_NAME=tiny_slurm
MODEL_ARGS=(--model tiny --spec local)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2)
TRAIN_ARGS=(--micro-batch-size 8 --global-batch-size 16 --train-iters 3 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 1
            --log-interval 1 --save-interval 3)
source {root}/examples/launch.sh
"""


@pytest.mark.slow
def test_real_sbatch_trains_the_tiny_preset(local_slurm, tmp_path):
    import sys

    data = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "megatron_m2.demo", "prepare", "--output-dir", str(data)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    launcher = tmp_path / "pretrain_m2_tiny_slurm.sh"
    launcher.write_text(TINY_LAUNCHER.format(root=ROOT))
    env = {**os.environ, "SLURM_CONF": str(local_slurm), "CONTAINER_IMAGE": "none", "GPUS_PER_NODE": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path / "logs"),
           "DATA_PATH": str(data / "data" / "train"), "TOKENIZER_MODEL": str(data / "tokenizer.model"),
           "CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "OMP_NUM_THREADS": "1"}
    # --no-requeue: a job that hangs must fail this test at its time limit, not be requeued while --wait waits
    job = subprocess.run(["sbatch", "--wait", "--no-requeue", "--gpus-per-node=0", "--time=8",
                          f"--output={tmp_path}/%x-%j.out",
                          "examples/slurm/pretrain_m2.sbatch", str(launcher)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("**/*-*.out")) + sorted(
        (tmp_path / "logs").glob("*.log")))
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{logs[-4000:]}"
    assert "1 node(s) x 2 GPUs" in logs
    from megatron_m2.checkpointing import latest_iteration

    assert latest_iteration(str(tmp_path / "checkpoints")) == 3, logs[-4000:]
