"""The memory/communication planner (megatron_m2/planner.py) and its CLI (tools/plan.py)."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_m2 import arithmetic, planner
from megatron_m2.config import layers_per_stage, load_config, padded_vocab_size
from megatron_m2.errors import ConfigError
from megatron_m2.testing import CommandRun, run_command, run_trainer

ROOT = Path(__file__).resolve().parents[1]
GIB = planner.GB


def _layout(plan: planner.Plan) -> tuple[int, int]:
    return plan.tensor_model_parallel_size, plan.pipeline_model_parallel_size


def test_10b_on_32_h100s_fits_tp8_pp4_and_not_tp1_pp1():
    plans, _ = planner.plan_all(load_config("10b"), 32, planner.Training(micro_batch_size=8, global_batch_size=4096))
    fits = {_layout(p) for p in plans if p.fits}
    assert (8, 4) in fits and (8, 2) in fits
    assert (1, 1) not in fits  # 9.55B x (2 + 4 + 12) bytes = 160 GiB of weights, grads and Adam state
    tp1 = next(p for p in plans if _layout(p) == (1, 1))
    assert tp1.memory["total"] > 150 * GIB and not tp1.fits
    tp8 = next(p for p in plans if _layout(p) == (8, 4) and p.fits)
    # stage 0 (embeddings + 6 layers x 2 copies, 4 micro-batches in flight) needs the most memory
    assert tp8.peak_stage == 0 and 0.36e9 < tp8.parameters_per_gpu < 0.38e9
    assert tp8.parameters_per_gpu == planner.stage_parameters(load_config("10b"), 8, 4)[0].per_gpu(8)
    # listed fastest first among the layouts that fit
    times = [p.time["step"] for p in plans if p.fits]
    assert times == sorted(times)


def test_distributed_optimizer_shards_adam_state_over_dp():
    config = load_config("10b")
    replicated = planner.plan_layout(config, 32, 2, 4, training=planner.Training(recompute=False))
    sharded = planner.plan_layout(config, 32, 2, 4, training=planner.Training(recompute=False,
                                                                               use_distributed_optimizer=True))
    assert replicated.data_parallel_size == 4
    assert sharded.memory["optimizer"] == pytest.approx(replicated.memory["optimizer"] / 4)
    assert sharded.memory["optimizer"] == pytest.approx(replicated.parameters_per_gpu * 12 / 4)
    assert sharded.memory["params"] == replicated.memory["params"] == replicated.parameters_per_gpu * 2


@pytest.mark.parametrize("name", ["tiny", "0.4b", "1b", "10b"])
def test_stage_parameters_sum_to_the_models_count(name):
    from megatron_m2.arithmetic import model_parameter_count

    config = load_config(name)
    units = config.num_layers + config.num_vl_layers
    for tp in (1, 2, 4):
        for pp in [d for d in range(1, units + 1) if units % d == 0 and units // d >= config.num_vl_layers]:
            stages = planner.stage_parameters(config, tp, pp)
            assert len(stages) == pp
            assert sum(s.total for s in stages) == model_parameter_count(config, tp), (tp, pp)


def test_embeddings_on_the_first_stage_vl_and_heads_on_the_last():
    config = load_config("10b")
    first, middle, _, last = planner.stage_parameters(config, 8, 4)
    h = config.hidden_size
    layer = arithmetic.layer_copy_parameters(config)
    assert middle.total == 2 * 6 * layer.total
    assert first.total - middle.total == padded_vocab_size(config.vocab_size, 8) * h + h * (
        config.text_position_table_size + config.vision_position_table_size + 3 * 16 * 16 + 2)
    assert last.total == 2 * 3 * layer.total + 3 * layer.total + 3 * 2 * h + 2 * h * config.out_dim + 1


def _tiny_rank_parameters(tp: int, pp: int) -> tuple[int, int]:
    from megatron.core import parallel_state

    from megatron_m2 import parallel
    from megatron_m2.models import build_model

    parallel.initialize_model_parallel(tp, pp)
    model = build_model(load_config("tiny"), spec="local")
    return parallel_state.get_pipeline_model_parallel_rank(), sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # starts a 4-process pool (shared with other tests in a full run)
def test_per_gpu_count_equals_the_built_model_on_every_rank():
    from megatron_m2.testing import run_distributed

    config = load_config("tiny")
    stages = planner.stage_parameters(config, 2, 2)
    for stage, count in run_distributed(4, _tiny_rank_parameters, 2, 2):
        assert count == stages[stage].per_gpu(2), stage


def test_layouts_violating_divisibility_never_appear():
    config = load_config("10b")  # 32 heads, FFN 16384, 21 + 3 layers
    for num_gpus in (24, 32, 48):
        plans, _ = planner.plan_all(config, num_gpus, planner.Training(global_batch_size=num_gpus * 8 * 4))
        assert plans
        for p in plans:
            tp, pp, dp, g = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size,
                             p.itc_group_size)
            assert tp * pp * dp == num_gpus and tp in (1, 2, 4, 8) and dp % g == 0
            assert 24 % pp == 0 and 24 // pp >= 3 and layers_per_stage(config, pp)
            assert p.num_microbatches * 8 * dp == num_gpus * 8 * 4


def test_grouped_itc_memory_and_communication_grow_with_the_group():
    config = load_config("1b")
    training = planner.Training(micro_batch_size=64, global_batch_size=64 * 64, recompute=True)
    by_group = {g: planner.plan_layout(config, 64, 1, 1, g, training) for g in (1, 8, 64)}
    assert by_group[1].communication["itc"] == 0
    b, d = 64, config.out_dim
    m = by_group[8].num_microbatches
    assert by_group[8].communication["itc"] == m * 2 * 2 * 7 * b * d * 4  # all-gather + reduce-scatter, fp32
    assert by_group[8].memory["itc"] < by_group[64].memory["itc"]
    chunked = planner.plan_layout(config, 64, 1, 1, 64, planner.Training(
        micro_batch_size=64, global_batch_size=64 * 64, recompute=True, itc_chunk_size=256))
    assert chunked.memory["itc"] < by_group[64].memory["itc"]


def test_sequence_parallel_splits_the_replicated_activations_over_tp():
    config = load_config("10b")
    h, dt, t = config.hidden_size, 2, 8
    plain = planner.layer_activation_bytes(config, 100, 200, t, True, "te")
    split = planner.layer_activation_bytes(config, 100, 200, t, True, "te", sequence_parallel=True)
    assert plain - split == pytest.approx(100 * dt * 4 * h * (1 - 1 / t))  # the pre-LN inputs and outputs
    for recompute in (False, True):
        def activations(tp: int, sequence_parallel: bool) -> float:
            return planner.plan_layout(config, 32, tp, 4, training=planner.Training(
                micro_batch_size=8, global_batch_size=512, recompute=recompute,
                sequence_parallel=sequence_parallel)).memory["activations"]

        assert activations(8, True) < activations(8, False)
        assert activations(1, True) == activations(1, False)  # no TP, nothing to split


def test_recompute_is_chosen_only_when_needed():
    config = load_config("1b")
    roomy = planner.plan_layout(config, 8, 1, 1, training=planner.Training(micro_batch_size=8, global_batch_size=64))
    assert not roomy.recompute and roomy.fits
    tight = planner.plan_layout(config, 8, 1, 1, training=planner.Training(micro_batch_size=64, global_batch_size=512),
                                hardware=planner.Hardware(gpu_memory_gb=28))
    assert tight.recompute and tight.fits
    no_recompute = planner.plan_layout(config, 8, 1, 1, training=planner.Training(
        micro_batch_size=64, global_batch_size=512, recompute=False), hardware=planner.Hardware(gpu_memory_gb=28))
    assert no_recompute.memory["activations"] > 3 * tight.memory["activations"] and not no_recompute.fits


def test_impossible_layouts_are_config_errors():
    config = load_config("10b")
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 5"):
        planner.plan_layout(config, 40, 1, 5)
    with pytest.raises(ConfigError, match="--itc-group-size 3"):
        planner.plan_layout(config, 32, 8, 1, itc_group_size=3)
    with pytest.raises(ConfigError, match="--global-batch-size"):
        planner.plan_layout(config, 32, 8, 1, training=planner.Training(global_batch_size=100))


def _cli(*args: str) -> CommandRun:
    """`python tools/plan.py ARGS`, run as its main(argv) on the one-rank worker pool (--measure trains: the pool has
    torch and megatron-core imported); test_cli_help_and_clear_errors runs the script itself."""
    return run_command(1, "tools.plan", args)


def test_cli_lists_fitting_layouts():
    result = _cli("--model", "10b", "--num-gpus", "32", "--tensor-model-parallel-size", "8", "--top", "0")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s+\d+\s", line)]
    assert [row[:4] for row in rows if row[1] == "4"] == [["8", "4", "1", "1"]]
    # PP=1 fits too at TP=8 (9.55B / 8 x 18 B = 20 GiB); PP=8 would need 64 GPUs
    assert {row[1] for row in rows} == {"1", "2", "4"} and {row[0] for row in rows} == {"8"}


def test_cli_help_and_clear_errors():
    script = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert script.returncode == 0 and "--num-gpus" in script.stdout, script.stderr
    bad = _cli("--model", "10b", "--num-gpus", "0")
    assert bad.returncode == 2 and "--num-gpus must be >= 1" in bad.stderr
    bad = _cli("--model", "20b", "--num-gpus", "8")
    assert bad.returncode == 2 and "--model '20b' is neither a preset" in bad.stderr
    bad = _cli("--num-gpus", "8", "--recompute", "sometimes")
    assert bad.returncode == 2 and "--recompute: invalid choice" in bad.stderr
    nothing = _cli("--model", "10b", "--num-gpus", "8", "--gpu-memory-gb", "16")
    assert nothing.returncode == 1 and "nothing fits" in nothing.stderr


@pytest.mark.slow  # two real training steps of the tiny preset
@pytest.mark.parametrize("recompute,objectives", [("none", ()), ("full", ()),
                                                  ("none", ("--cmlm-weight", "1", "--cmim-weight", "1"))],
                         ids=["none", "full", "none-cmlm-cmim"])
def test_predicted_activations_match_what_autograd_keeps(recompute, objectives):
    result = _cli("--model", "tiny", "--no-bf16", "--spec", "local", "--micro-batch-size", "64",
                  "--global-batch-size", "64", "--recompute", recompute, "--measure", *objectives)
    assert result.returncode == 0, result.stderr[-3000:]
    ratio = float(re.search(r"/ predicted activations = ([\d.]+)", result.stdout).group(1))
    assert 0.95 <= ratio <= 1.05, result.stdout


def test_batch_accumulation_contrastive_batch_and_extra_forward():
    config = load_config("1b")
    on = planner.plan_layout(config, 32, 1, 4, 2, planner.Training(micro_batch_size=8, global_batch_size=4096,
                                                                   recompute=False))
    off = planner.plan_layout(config, 32, 1, 4, 2, planner.Training(micro_batch_size=8, global_batch_size=4096,
                                                                    recompute=False, itc_batch_accumulation="off"))
    full = planner.plan_layout(config, 32, 1, 4, 2, planner.Training(micro_batch_size=8, global_batch_size=4096,
                                                                     recompute=True))
    single = planner.plan_layout(config, 32, 1, 4, 2, planner.Training(micro_batch_size=8, global_batch_size=64))
    assert (on.contrastive_batch, off.contrastive_batch) == (2 * 4096 // 8, 2 * 8)  # g x global / DP vs g x micro
    assert on.extra_forward == pytest.approx(1 / 3) and full.extra_forward == pytest.approx(1 / 4)
    assert off.extra_forward == 0 and single.extra_forward == 0  # one micro-batch: no second pass
    # the forward-only pass adds a third (its slowest stage may differ from the 1F1B pass's: the first one also runs
    # the patch embedding, the last one the ITC gather per micro-batch without accumulation)
    assert on.time["compute"] == pytest.approx(off.time["compute"] * 4 / 3, rel=1e-2)
    stage = on.stages[on.critical_stage]
    assert stage.forward_slot > 0 and off.stages[0].forward_slot == 0
    # the loss over a rank's whole step: 64 x 8 rows against 2 x 64 x 8 columns, plus the cached embeddings/gradients
    rows, d = 64 * 8, config.out_dim
    assert planner.itc_bytes(config, 8, 2, 0, 64) == 4 * (2 * 2 * rows * d + 4 * rows * 2 * rows + 4 * rows * d)
    assert on.communication["pp"] == pytest.approx(off.communication["pp"] * 3 / 2)  # the extra forward's sends


def test_10b_example_dry_run_reports_the_global_contrastive_batch():
    env = dict(os.environ, DATA_PATH="/nonexistent/{0..9}.tar", TOKENIZER_MODEL="/nonexistent.model",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "examples/pretrain_m2_10b.sh", "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("contrastive batch: 4096 pairs per ITC group, 4095 negatives per row (batch accumulation over 64 "
            "micro-batches") in result.stdout


def test_cpu_cores_per_gpu_keep_decoding_up_with_the_step():
    config = load_config("1b")
    hardware = planner.Hardware(decode_samples_per_core_s=250.0)
    plan = planner.plan_layout(config, 32, 1, 4, 0, planner.Training(micro_batch_size=8, global_batch_size=4096),
                               hardware)
    # one decode per sample and model replica: the global batch within one step, over all GPUs
    assert plan.cpu_cores_per_gpu == pytest.approx(4096 / (plan.time["step"] * 250.0) / 32)
    assert "cores/GPU" in planner.format_table([plan])


def _calls(plan: planner.Plan, stage: int, text: str) -> int:
    return sum(c.calls for c, _ in plan.stages[stage].collectives if text in c.what)


def test_sub_ln_all_reduces_and_per_call_latency_are_counted():
    config = load_config("10b")
    training = planner.Training(use_distributed_optimizer=True, recompute=True)
    plan = planner.plan_layout(config, 32, 8, 4, 0, training)
    m = plan.num_microbatches
    assert m == 512
    # 6 layers x 2 towers per stage; per copy and micro-batch 2 Sub-LNs x (forward + recompute + backward), and the
    # forward-only pass's forward: the ~49k all-reduces per GPU and step the planner used to miss
    assert _calls(plan, 1, "Sub-LN") == 12 * 2 * (3 + 1) * m == 49152
    assert _calls(plan, 1, "out_proj/fc2 outputs") == 12 * 2 * 3 * m
    assert _calls(plan, 0, "text embedding") == 2 * m and _calls(plan, 1, "text embedding") == 0
    # every call pays the latency: without it a stage's TP time drops by its calls x 10 us (NVLink)
    free = planner.plan_layout(config, 32, 8, 4, 0, training, planner.Hardware(nvlink_latency_us=0.0))
    for phase in ("main", "forward"):
        tp_calls = sum(c.calls for c, _ in plan.stages[1].collectives if c.kind == "tp" and c.phase == phase)
        assert plan.stages[1].comm(phase, "tp") - free.stages[1].comm(phase, "tp") == pytest.approx(tp_calls * 10e-6)
    assert plan.time["tp"] > free.time["tp"] + 0.5
    # the DP all-gather/reduce-scatter of the distributed optimizer at DP 8 inside a node: latency + bytes / 300 GB/s
    dp_plan = planner.plan_layout(config, 32, 1, 4, 8, planner.Training(use_distributed_optimizer=True,
                                                                        overlap_grad_reduce=True))
    dp = [(c, t) for c, t in dp_plan.stages[0].collectives if c.kind == "dp"]
    assert {c.op for c, _ in dp} == {"reduce_scatter", "all_gather"}
    n = dp_plan.parameters_per_gpu if dp_plan.peak_stage == 0 else planner.stage_parameters(config, 1, 4)[0].per_gpu(1)
    buckets = -(-n // 40_000_000)
    for c, seconds in dp:
        assert c.calls == buckets and c.span == 8
        assert seconds == pytest.approx(buckets * 10e-6 + c.calls * c.bytes * 7 / 8 / 300e9)


def test_sequence_parallelism_splits_collectives_and_activations():
    config = load_config("10b")
    training = planner.Training(recompute=False, itc_batch_accumulation="off")
    plain = planner.plan_layout(config, 32, 8, 4, 0, training)
    sp = planner.plan_layout(config, 32, 8, 4, 0, dataclasses.replace(training, sequence_parallel=True))
    ops = lambda plan: {c.op for c, _ in plan.stages[1].collectives if c.kind == "tp"}  # noqa: E731
    assert ops(plain) == {"all_reduce"}
    assert ops(sp) == {"all_gather", "reduce_scatter", "all_reduce"}  # the Sub-LN statistics stay all-reduces
    m, copies = plain.num_microbatches, 12
    # forward 2 all-gathers + 2 reduce-scatters, backward 4 all-gathers (incl. the saved inputs) + 2 reduce-scatters
    assert _calls(sp, 1, "all-gather before qkv/fc1") + _calls(sp, 1, "backward all-gathers") == copies * 6 * m
    # the PP messages and the activations outside the TP regions shrink by TP
    assert sp.communication["pp"] == pytest.approx(plain.communication["pp"] / 8)
    h, f, t, tokens, seq = config.hidden_size, config.ffn_hidden_size, 8, 8 * 197, 197
    saved = planner.layer_activation_bytes(config, tokens, seq, t, True, "te")
    split = planner.layer_activation_bytes(config, tokens, seq, t, True, "te", sequence_parallel=True)
    assert saved - split == pytest.approx(tokens * 2 * 4 * h * (1 - 1 / t))
    assert sp.memory["activations"] < plain.memory["activations"]


def test_gemm_mfu_depends_on_the_shape():
    hardware = planner.Hardware()
    large = planner.gemm_mfu(arithmetic.Gemm("large", 8192, 8192, 8192), hardware)
    text = planner.gemm_mfu(arithmetic.Gemm("text fc2 at TP8", 416, 4096, 2048), hardware)
    assert 0.38 < large < 0.40 and text == pytest.approx(0.4 * 416 / 544 * 4096 / 4224 * 2048 / 2176)
    assert text < 0.3
    # the stage's GEMMs are the model's FLOPs: 3 x forward = model_flops_per_sample, split over TP and PP
    config = load_config("10b")
    flops = sum(g.flops for stage in range(4) for g in arithmetic.stage_gemms(config, 1, 8, 4, stage))
    patch = 2 * config.num_patches * config.num_channels * config.patch_size**2 * config.hidden_size
    assert 3 * ((flops - patch) * 8 + patch) == pytest.approx(arithmetic.model_flops_per_sample(config))


def test_cli_filters_by_the_contrastive_batch_and_explains():
    result = _cli("--model", "10b", "--num-gpus", "32", "--use-distributed-optimizer", "--explain")
    assert result.returncode == 0, result.stderr
    assert "contrastive batch >= 4096 pairs (--itc-batch, default: the global batch)" in result.stdout
    assert "with a smaller contrastive batch left out" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d+\s+\d+\s", line)]
    assert rows and all(row[-4] == "4096" for row in rows)  # the ITC batch column
    assert rows[0][:4] == ["1", "4", "8", "8"]
    assert "TP 1 PP 4 DP 8 ITC group 8" in result.stdout and "paces the pipeline" in result.stdout
    any_batch = _cli("--model", "10b", "--num-gpus", "32", "--use-distributed-optimizer", "--itc-batch", "0")
    assert "any contrastive batch (--itc-batch 0)" in any_batch.stdout
    small = _cli("--model", "10b", "--num-gpus", "32", "--tensor-model-parallel-size", "1",
                 "--pipeline-model-parallel-size", "4", "--itc-group-size", "1")  # 512 pairs
    assert small.returncode == 1 and "no layout gives a contrastive batch of 4096 pairs" in small.stderr
    named = _cli("--model", "10b", "--num-gpus", "32", "--tensor-model-parallel-size", "8",
                 "--pipeline-model-parallel-size", "4", "--recompute", "full", "--explain")
    assert named.returncode == 0, named.stderr
    assert "TP 8 PP 4 DP 1 ITC group 1: 512 micro-batches" in named.stdout
    assert "Sub-LN statistics" in named.stdout and "GEMMs of stage" in named.stdout


def test_the_step_s_micro_batches_are_counted_as_held_uint8_images_in_every_mode():
    # a step holds its m micro-batches on the device as uint8 images (first stage) and token ids, with or without
    # batch accumulation; only the micro-batch in its forward is normalised (counted in the stage's input term)
    config = load_config("1b")
    per_sample = 3 * config.image_size ** 2 + 9 * config.max_text_length
    for accumulate in (True, False):
        few, many = (planner.plan_layout(config, 1, 1, 1, 0, planner.Training(
            micro_batch_size=8, global_batch_size=8 * m, recompute=False,
            itc_batch_accumulation="exact" if accumulate else "off"))
            for m in (2, 16))
        grown = many.memory["activations"] - few.memory["activations"]
        assert grown == pytest.approx(14 * 8 * per_sample), accumulate


def test_masked_modelling_adds_decoders_masked_streams_and_flops():
    config = load_config("1b")
    masked = arithmetic.MaskedPasses(cmlm=True, cmim=True)
    base = dict(micro_batch_size=8, global_batch_size=4096, recompute=False)
    off = planner.plan_layout(config, 32, 2, 4, 0, planner.Training(**base))
    on = planner.plan_layout(config, 32, 2, 4, 0, planner.Training(**base, masked=masked))
    # the decoders and heads sit on the last stage, the mask token on the first
    without, with_ = planner.stage_parameters(config, 2, 4), planner.stage_parameters(config, 2, 4, masked=masked)
    assert with_[1:-1] == without[1:-1] and with_[0].replicated - without[0].replicated == config.hidden_size
    decoders = arithmetic.decoder_parameters(config, 2, masked)
    assert with_[-1].total - without[-1].total == decoders.total
    assert decoders.sharded >= padded_vocab_size(config.vocab_size, 2) * config.hidden_size  # CMLM's vocab head
    # the masked copies go through the backbone towers (not the VL layers) and the decoders: FLOPs more than 1.5x
    flops = arithmetic.model_flops_per_sample
    assert 1.5 < flops(config, masked) / flops(config) < 2.5
    assert flops(config, arithmetic.MaskedPasses(cmlm=True)) < flops(config, masked)
    # the forward-backward pass sends the masked streams too; GBA-ITC's forward-only pass does not
    s = config.vision_seq_length + config.max_text_length
    assert on.communication["pp"] / off.communication["pp"] == pytest.approx((2 * 2 * s + s) / (3 * s))
    assert on.communication["tp"] > off.communication["tp"] and on.time["step"] > off.time["step"]
    assert on.extra_forward < off.extra_forward  # the extra forward is the ITC-only model's, a smaller share
    assert on.memory["activations"] > off.memory["activations"]


def test_dry_run_and_cli_count_the_decoders():
    dry = run_trainer(1, ["--model", "1b", "--dry-run", "--world-size", "16", "--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2", "--micro-batch-size", "8", "--global-batch-size",
                          "1024", "--cmlm-weight", "1"])
    assert dry.returncode == 0, dry.stderr[-2000:]
    decoders = arithmetic.decoder_parameters(load_config("1b"), 2, arithmetic.MaskedPasses(cmlm=True))
    assert f"masked modelling: CMLM: {decoders.total / 1e6:.1f}M decoder parameters on the last stage" in dry.stdout
    plain, masked = (_cli("--model", "1b", "--num-gpus", "16", *extra) for extra in (
        (), ("--cmlm-weight", "1", "--cmim-weight", "0.5")))
    total = lambda result: float(re.search(r"1b: ([\d.]+)B parameters", result.stdout).group(1))  # noqa: E731
    assert masked.returncode == 0 and total(masked) > total(plain)
    bad = _cli("--model", "1b", "--num-gpus", "16", "--cmim-weight", "1", "--image-mask-ratio", "0")
    assert bad.returncode == 2 and "--image-mask-ratio" in bad.stderr
