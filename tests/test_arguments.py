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
        (["--cmlm-weight", "-1"], 1, "--cmlm-weight must be >= 0"),
        (["--cmim-weight", "1", "--image-mask-ratio", "0.01"], 1, "--image-mask-ratio 0.01 masks 0 of the model's 16"),
        (["--cmlm-weight", "1", "--text-mask-prob", "1.5"], 1, "--text-mask-prob 1.5"),
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
