"""Flag validation: bad configs fail fast, naming the flag, before any process group or model exists."""
import pytest

from megatron_m2.errors import ConfigError
from megatron_m2.training.arguments import build_parser, parse_args

BASE = ["--data-path", "shards/", "--tokenizer-model", "tok.model"]


def _parse(*extra, world=1, monkeypatch=None):
    return parse_args([*BASE, *extra, "--world-size", str(world)])


@pytest.mark.parametrize(
    "flags,world,message",
    [
        (["--global-batch-size", "10", "--micro-batch-size", "4"], 1, "--global-batch-size 10 is not divisible"),
        (["--global-batch-size", "8", "--micro-batch-size", "4"], 4, "data-parallel size 4"),
        (["--tensor-model-parallel-size", "3"], 6, "--tensor-model-parallel-size 3 must divide"),
        (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size 3 must divide"),
        (["--tensor-model-parallel-size", "2"], 3, "not divisible by --tensor-model-parallel-size"),
        (["--itc-group-size", "3", "--global-batch-size", "16", "--micro-batch-size", "4"], 4, "--itc-group-size"),
        (["--save-interval", "10"], 1, "--save-interval needs --save"),
        (["--async-save"], 1, "--async-save needs --save"),
        (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr"),
        (["--bf16"], 1, "--bf16 needs a GPU"),
        (["--use-distributed-optimizer"], 1, "--use-distributed-optimizer needs nccl"),
        (["--eval-interval", "5"], 1, "--eval-interval needs"),
        (["--zeroshot-data", "x"], 1, "--zeroshot-classnames"),
        (["--freeze-vision"], 1, "--freeze-vision"),
        (["--model", "nope"], 1, "--model 'nope'"),
        (["--exit-interval", "-1"], 1, "--exit-interval must be >= 0"),
        (["--num-workers", "-1"], 1, "--num-workers must be >= 0"),
        (["--prefetch-factor", "0"], 1, "--prefetch-factor must be >= 1"),
        (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], 1, "exclude each other"),
        (["--sequence-parallel"], 1, "--sequence-parallel splits sequences .* needs --tensor-model-parallel-size > 1"),
        (["--overlap-param-gather", "--overlap-grad-reduce"], 1, "needs --use-distributed-optimizer"),
        (["--overlap-param-gather", "--use-distributed-optimizer"], 1, "needs --overlap-grad-reduce"),
        (["--use-persistent-ckpt-worker"], 1, "--use-persistent-ckpt-worker needs CUDA"),
        (["--straggler-minmax-count", "0"], 1, "--straggler-minmax-count must be >= 1"),
        (["--rampup-batch-size", "4", "4", "64"], 1, "--rampup-batch-size needs sample-based training"),
        (["--train-samples", "64", "--train-iters", "5"], 1, "--train-iters and --train-samples exclude each other"),
        (["--train-samples", "64", "--lr-warmup-iters", "5"], 1, "use --lr-warmup-samples"),
        (["--lr-warmup-samples", "8"], 1, "go with --train-samples"),
        (["--train-samples", "8"], 1, "--train-samples 8 is less than one global batch"),
        (["--train-samples", "64", "--rampup-batch-size", "16", "4", "32"], 1, "smaller than --global-batch-size 16"),
        (["--train-samples", "64", "--rampup-batch-size", "4", "5", "32"], 1, "not a multiple of the increment 5"),
        (["--train-samples", "64", "--micro-batch-size", "4", "--rampup-batch-size", "4", "4", "32"], 2,
         r"global batch sizes \[4, 12\] of the ramp are not multiples of --micro-batch-size 4 x data-parallel size 2"),
        (["--cmlm-weight", "-1"], 1, "--cmlm-weight must be >= 0"),
        (["--cmim-weight", "1", "--image-mask-ratio", "0.01"], 1, "--image-mask-ratio 0.01 masks 0 of the model's 16"),
        (["--cmlm-weight", "1", "--text-mask-prob", "1.5"], 1, "--text-mask-prob 1.5"),
        (["--cmlm-weight", "1", "--sequence-parallel", "--tensor-model-parallel-size", "2"], 2,
         "--sequence-parallel does not run the masked streams"),
    ],
)
def test_bad_flags_raise_config_error_naming_the_flag(flags, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _parse(*flags, world=world)


def test_required_inputs():
    with pytest.raises(ConfigError, match="--data-path is required"):
        parse_args(["--tokenizer-model", "t"])
    with pytest.raises(ConfigError, match="--tokenizer-model is required"):
        parse_args(["--data-path", "d"])


def test_valid_layout_and_derived_values():
    args = _parse("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--micro-batch-size", "4", "--global-batch-size", "32", "--train-iters", "7", world=8)
    assert args.layout.data_parallel_size == 2
    assert args.layout.itc_group_size == 2
    assert args.lr_decay_iters == 7


def test_sample_based_training_and_the_ramp_set_the_iterations():
    # as Megatron-LM's update_train_iters: the ramp 4 -> 16 by 4 over 24 samples (8 samples per increment) takes the
    # steps 4, 4, 8, 12 (28 samples, the batch at 0, 4, 8 and 16 consumed samples); the remaining 72 samples give 4
    # more steps of 16
    args = _parse("--train-samples", "100", "--rampup-batch-size", "4", "4", "24", "--micro-batch-size", "4")
    assert args.train_iters == 4 + 4
    assert _parse("--train-samples", "100").train_iters == 100 // 16
    iteration_based = _parse()
    assert (iteration_based.train_iters, iteration_based.lr_warmup_iters) == (100, 10)  # the defaults


def test_the_persistent_checkpoint_writer_is_the_default_with_cuda_only(monkeypatch):
    import torch

    assert _parse("--save", "ckpt", "--async-save").use_persistent_ckpt_worker is False  # this CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _parse("--save", "ckpt", "--async-save").use_persistent_ckpt_worker is True
    assert _parse("--no-use-persistent-ckpt-worker").use_persistent_ckpt_worker is False


def test_dry_run_skips_runtime_checks():
    # --dry-run plans a GPU job on any machine: no data, tokenizer or GPU needed
    args = parse_args(["--model", "10b", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
                       "--bf16", "--use-distributed-optimizer", "--micro-batch-size", "8",
                       "--global-batch-size", "64", "--world-size", "64", "--dry-run"])
    assert args.layout.data_parallel_size == 2


def test_help_explains_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings


def test_timeout_flags_are_checked():
    from megatron_m2.config import load_config
    from megatron_m2.errors import ConfigError
    from megatron_m2.training.arguments import build_parser, validate_args

    for flags, message in ((["--dataloader-timeout", "-1"], "--dataloader-timeout must be >= 0"),
                           (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be >= 1")):
        args = build_parser().parse_args([*flags, "--dry-run"])
        args.model_config = load_config("tiny")
        with pytest.raises(ConfigError, match=message):
            validate_args(args, world_size=1)
    args = build_parser().parse_args([])
    assert (args.dataloader_timeout, args.distributed_timeout_minutes) == (300.0, 10)
