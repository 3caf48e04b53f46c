"""End-to-end training on CPU: torchrun with 4 gloo processes (TP=2 x PP=2) on the embedded digits data.

The runs marked MASKED train M2's full objective, ITC + CMIM + CMLM (their masks drawn from each sample's seed):
- a run killed with SIGKILL mid-way (during an async save) resumes from its last complete checkpoint onto the same
  per-step ITC, CMLM and CMIM losses as a run that was never interrupted;
- SIGTERM to every process of the run, data workers included (Slurm preemption), saves a checkpoint, exits cleanly
  and resumes onto the uninterrupted run's losses;
- a TP=2 x PP=2 checkpoint (decoders included) loads into TP=1 x PP=1 and continues on the same three losses;
- GBA-ITC: micro-batches accumulate into one contrastive batch, and the CMLM / CMIM losses are means over every masked
  token / patch of the step (TP2 4 x 4 = TP1 1 x 16);
- a blended --data-path trains and resumes exactly;
- with drop path, hidden and attention dropout (and the masked objectives) a PP2 run resumes onto the uninterrupted
  run's losses (every rank's random states in the checkpoint).

Runs whose process matters (killed, signalled) are real torchrun launches; the others run the same command line on the
shared worker pool (megatron_m2.testing.run_trainer), which saves each rank's seconds of imports. The real runs
resume onto the pooled reference's losses, so the two agree.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_m2.testing import CommandRun, run_trainer

pytestmark = pytest.mark.slow
ITERS = 8
MASKED = ("--cmlm-weight", "0.5", "--cmim-weight", "1")
LOSSES = ("itc_loss", "cmlm_loss", "cmim_loss")


def _torchrun(nproc: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_m2.train", *flags]


def _flags(data: Path, run_dir: Path, tp: int, pp: int, *extra: str) -> list[str]:
    return ["--model", "tiny", "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", str(ITERS),
            "--lr", "2e-3", "--lr-warmup-iters", "2", "--log-interval", "1", "--seed", "7",
            "--data-path", str(data / "data" / "train"), "--tokenizer-model", str(data / "tokenizer.model"),
            "--metrics-file", str(run_dir / "metrics.jsonl"), *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line]
    return {r["iteration"]: r["itc_loss"] for r in records if r["kind"] == "train"}


def _all_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per iteration: the ITC, CMLM and CMIM losses (the ones the run logs)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["iteration"]: {k: r[k] for k in LOSSES if k in r} for r in records if r["kind"] == "train"}


def _assert_same_losses(got: dict, want: dict, rel: float) -> None:
    for iteration, losses in got.items():
        assert set(losses) == set(LOSSES), losses  # all three objectives logged
        for name, value in losses.items():
            assert value == pytest.approx(want[iteration][name], rel=rel, abs=1e-6), (iteration, name)


def _train(world_size: int, flags: list[str]) -> CommandRun:
    """`torchrun --nproc-per-node=world_size -m megatron_m2.train FLAGS`, on the worker pool; must succeed."""
    result = run_trainer(world_size, flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def reference_checkpoints(demo_data, tmp_path_factory) -> tuple[dict[int, dict], Path]:
    """The uninterrupted TP2 x PP2 run with ITC + CMIM + CMLM: its per-step losses, and its checkpoints of iterations
    4 and 8 (decoders included)."""
    run_dir = tmp_path_factory.mktemp("reference")
    _train(4, _flags(demo_data, run_dir, 2, 2, *MASKED, "--save", str(run_dir / "ckpt"), "--save-interval", "4"))
    losses = _all_losses(run_dir)
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses, run_dir / "ckpt"


@pytest.fixture(scope="module")
def reference_run(reference_checkpoints) -> dict[int, dict]:
    return reference_checkpoints[0]


def _wait_for_iteration(run_dir: Path, iteration: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= iteration:
            return
        assert proc.poll() is None, f"training exited early: {proc.returncode}"
        time.sleep(0.2)
    raise TimeoutError(f"iteration {iteration} not reached")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and all its descendants at once (torchrun starts each worker in a session of its own, so
    killing torchrun's process group alone would leave the workers training).

    The tree is frozen first (SIGSTOP, then a fresh look for children, until no new one appears): a process forked
    between one look and the kill, such as an async save's writer, would otherwise outlive the test as an orphan
    blocked on a pipe (one was found holding 335 MB an hour later)."""
    import psutil

    def tree() -> set:
        try:
            return {psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    stopped: set = set()
    while new := tree() - stopped:
        for victim in new:
            try:
                victim.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:  # a short-lived child (a loader worker) exited on its own meanwhile
                pass
        stopped |= new
    for victim in stopped:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(stopped), timeout=30)
    proc.wait()


def test_kill9_during_async_save_resumes_from_the_last_complete_checkpoint(demo_data, reference_run, tmp_path):
    # The crash case (SIGKILL mid-run, TP2 x PP2, 2 micro-batches per step: GBA-ITC accumulation on, CMLM and CMIM
    # on), made harder by --async-save (one launch for both; the synchronous save is covered by the SIGTERM and
    # layout tests): iteration 3's checkpoint is written in the background and published at a later step; the kill
    # lands while iteration 6's is being written. Resuming must pick 3 (6 is an unpublished iter_0000006.tmp) and
    # reproduce the uninterrupted losses, which also proves the background writer saved the state as of step 3, and
    # that the resumed run masks every sample as the uninterrupted one did.
    import queue
    import threading

    ckpt = tmp_path / "ckpt"
    flags = _flags(demo_data, tmp_path, 2, 2, *MASKED, "--save", str(ckpt), "--load", str(ckpt), "--save-interval", "3",
                   "--async-save")
    proc = subprocess.Popen(_torchrun(4, flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    started = f"async save of {ckpt / 'iter_0000006'} started"
    seen: list[str] = []
    try:
        deadline = time.time() + 300
        while not any(started in line for line in seen):
            assert time.time() < deadline and proc.poll() is None, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
    finally:
        _kill_tree(proc)  # the writer of iteration 6 is a child of the trainers: it dies too
    log = "".join(seen)
    assert f"saved checkpoint {ckpt / 'iter_0000003'} (async)" in log, log[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (ckpt / "iter_0000006.tmp").is_dir() and not (ckpt / "iter_0000006").exists()
    (tmp_path / "metrics.jsonl").unlink()
    _train(4, flags)
    resumed = _all_losses(tmp_path)
    assert min(resumed) == 4, resumed
    _assert_same_losses(resumed, reference_run, rel=1e-5)
    # the resumed run's last async save was finished before the trainers exited
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert (ckpt / f"iter_{ITERS:07d}" / "checkpoint_complete").exists() and not list(ckpt.glob("*.tmp"))


def test_sigterm_to_every_process_saves_exits_and_resumes_exactly(demo_data, reference_run, tmp_path):
    # Slurm signals every process of a job step (preemption, time limit): torchrun, the trainers and their data
    # workers. The trainers (TP2 x PP2: they agree on the step to stop at, once per step) must save and exit
    # cleanly, which a data worker dying of the signal used to prevent, and the resumed run must continue on the
    # uninterrupted run's losses (all three objectives). Two data workers: more than one child per trainer to reap.
    import psutil

    num_workers = 2
    ckpt = tmp_path / "ckpt"
    flags = _flags(demo_data, tmp_path, 2, 2, *MASKED, "--save", str(ckpt), "--load", str(ckpt), "--num-workers",
                   str(num_workers))
    proc = subprocess.Popen(_torchrun(4, flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_for_iteration(tmp_path, 2, proc)
    trainers = psutil.Process(proc.pid).children()
    workers = [child for trainer in trainers for child in trainer.children()]
    assert len(trainers) == 4 and len(workers) == num_workers  # one reading rank (DP 1) with its data workers
    for process in (psutil.Process(proc.pid), *trainers, *workers):
        process.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    # torchrun exits 1 with its own SignalException once the trainers are done; a trainer that failed would show
    # as ChildFailedError or with its error
    assert "SIGTERM received: saved at iteration" in output, output[-4000:]
    assert "ChildFailedError" not in output and "RuntimeError" not in output, output[-4000:]
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < ITERS and (ckpt / f"iter_{saved:07d}" / "checkpoint_complete").exists()
    (tmp_path / "metrics.jsonl").unlink()
    _train(4, flags)
    resumed = _all_losses(tmp_path)
    assert sorted(resumed) == list(range(saved + 1, ITERS + 1))
    _assert_same_losses(resumed, reference_run, rel=1e-5)


def test_checkpoint_loads_into_another_layout(demo_data, reference_checkpoints, tmp_path):
    import shutil

    from megatron_m2.checkpoint_layout import checkpoint_dir, publish, staging_dir

    reference_run, reference_ckpt = reference_checkpoints
    ckpt = tmp_path / "ckpt"  # the TP2 x PP2 run's checkpoint of iteration 4, as the latest one of a directory
    shutil.copytree(checkpoint_dir(reference_ckpt, 4), staging_dir(ckpt, 4))
    publish(ckpt, 4)
    # a changed schedule is refused before anything is built, naming the two ways out
    changed = run_trainer(1, _flags(demo_data, tmp_path, 1, 1, *MASKED, "--load", str(ckpt), "--train-iters", "12"))
    assert changed.returncode == 2 and "lr_decay_steps: checkpoint 8 vs flags 12" in changed.stderr, changed.stderr
    assert "--override-opt-param-scheduler" in changed.stderr and "parameters" not in changed.stdout
    # so is a resume with the optimizer's state but without the objectives whose decoders it holds
    dropped = run_trainer(1, _flags(demo_data, tmp_path, 1, 1, "--load", str(ckpt)))
    assert dropped.returncode == 2 and "trained with the masked-modelling objectives [cmim, cmlm]" in \
        dropped.stderr and "--no-load-optim" in dropped.stderr, dropped.stderr
    second = tmp_path / "tp1pp1"
    second.mkdir()
    # 3 steps at TP1 x PP1 from the TP2 x PP2 checkpoint (megatron reshards the towers and the decoders) agree with
    # the TP2 x PP2 run on all three losses
    _train(1, _flags(demo_data, second, 1, 1, *MASKED, "--load", str(ckpt), "--exit-interval", "7"))
    resumed = _all_losses(second)
    assert sorted(resumed) == [5, 6, 7]
    _assert_same_losses(resumed, reference_run, rel=1e-5)


def test_micro_batches_accumulate_into_one_contrastive_batch(demo_data, tmp_path):
    # GBA-ITC, black-box: at DP 1 and the same seed, TP2 with 4 micro-batches of 4 trains on the same per-step losses
    # as TP1 with one micro-batch of 16 (without accumulation the first would score 4-pair batches: loss ~ln 4); and
    # the CMLM / CMIM losses are means over all the step's masked tokens / patches, not of per-micro-batch means
    runs = {}
    for name, nproc, tp, micro in (("tp2_micro4", 2, 2, 4), ("tp1_micro16", 1, 1, 16)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        flags = _flags(demo_data, run_dir, tp, 1, *MASKED, "--train-iters", "4")
        flags[flags.index("--micro-batch-size") + 1] = str(micro)
        result = _train(nproc, flags)
        assert "contrastive batch 16 pairs per ITC group" in result.stdout, result.stdout[-2000:]
        runs[name] = _all_losses(run_dir)
    assert sorted(runs["tp2_micro4"]) == [1, 2, 3, 4]
    _assert_same_losses(runs["tp2_micro4"], runs["tp1_micro16"], rel=1e-5)


def test_blended_data_path_trains_and_resumes_exactly(demo_data, tmp_path):
    # --data-path 0.7 A 0.3 B (Megatron-style weights): stop at iteration 3, resume with another worker count, and
    # train on the losses of the uninterrupted run; the mix of sources is logged per source
    train = str(demo_data / "data" / "train")
    blend = ["--data-path", "0.7", train, "0.3", train + "/"]
    runs = {}
    for name, extra in (("straight", ["--num-workers", "1"]), ("stopped", ["--num-workers", "2", "--exit-interval", "3"]),
                        ("resumed", ["--num-workers", "0"])):
        run_dir = tmp_path / ("straight" if name == "straight" else "split")
        run_dir.mkdir(exist_ok=True)
        flags = _flags(demo_data, run_dir, 1, 1, "--train-iters", "6", *extra)
        at = flags.index("--data-path")
        flags[at:at + 2] = blend
        if name != "straight":
            flags += ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")]
        _train(1, flags)
        runs[name] = _losses(run_dir)
    assert sorted(runs["straight"]) == list(range(1, 7)) and sorted(runs["resumed"]) == list(range(1, 7))
    for iteration, loss in runs["straight"].items():
        assert runs["resumed"][iteration] == pytest.approx(loss, rel=1e-5, abs=1e-6), iteration
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    per_source = {k: v for k, v in last.items() if k.startswith("data/") and k.endswith("/samples") and k.count("/") == 2}
    assert sum(per_source.values()) == 6 * 16 and sorted(per_source.values()) == [29, 67], per_source


def test_a_resume_at_another_data_parallel_size_continues_the_data(demo_data, tmp_path):
    # DP 2 to iteration 3, then DP 1 (tests/test_data_reshard.py proves the data continues without a replay; here the
    # trainer takes that path: every old rank's position from the checkpoint, the job's sample counts going on)
    ckpt = tmp_path / "ckpt"
    flags = _flags(demo_data, tmp_path, 1, 1, "--train-iters", "6", "--save", str(ckpt), "--load", str(ckpt))
    _train(2, [*flags, "--exit-interval", "3"])
    resumed = _train(1, flags)
    assert "data-parallel size 2 in the checkpoint, 1 now: the data continues the old ranks' epochs" in resumed.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, 7))
    assert train[-1]["data/samples"] == 6 * 16  # the job's total, not the resumed run's alone


def test_drop_path_and_dropout_resume_exactly(demo_data, tmp_path):
    # --drop-path-rate / --hidden-dropout / --attention-dropout with GBA-ITC's exact accumulation (2 micro-batches)
    # and the masked objectives (their streams draw from generators of their own): stopped at iteration 2 and
    # resumed, the run trains on the uninterrupted run's three losses: the random states are saved and restored
    # (megatron_m2/random_state.py). One process: tests/test_drop_path.py restores every rank's states of a TP2 x PP2
    # layout, and fresh ones at another layout.
    randomness = ["--drop-path-rate", "0.1", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                  "--train-iters", "4", *MASKED]
    runs = {}
    for name, extra in (("straight", []), ("stopped", ["--exit-interval", "2"]), ("resumed", [])):
        run_dir = tmp_path / ("straight" if name == "straight" else "split")
        run_dir.mkdir(exist_ok=True)
        if name != "straight":
            extra = extra + ["--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt")]
        result = _train(1, _flags(demo_data, run_dir, 1, 1, *randomness, *extra))
        runs[name] = _all_losses(run_dir)
        if name == "resumed":
            assert "random states restored" in result.stdout, result.stdout[-2000:]
    assert sorted(runs["straight"]) == [1, 2, 3, 4] and sorted(runs["resumed"]) == [1, 2, 3, 4]
    _assert_same_losses(runs["resumed"], runs["straight"], rel=1e-5)
