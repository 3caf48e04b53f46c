"""Print the ITC-only losses of tests/test_masked_modeling.py's `_golden_run` with the code at $M2_ROOT (default: this
checkout), to record TODAY_ITC_LOSSES from an older commit:
    git archive <commit> | tar -x -C /tmp/old && M2_ROOT=/tmp/old python tests/golden_itc_losses.py
"""
import importlib.util
import os
import sys
from pathlib import Path


def main() -> None:
    if os.environ.get("M2_ROOT"):
        sys.path.insert(0, os.environ["M2_ROOT"])  # the package under test: the older checkout
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29631"))
    import torch

    from megatron_m2 import parallel

    torch.set_num_threads(1)  # as the test's worker pool (megatron_m2.testing): the summation order depends on it
    parallel.initialize_distributed()
    # the run itself is this checkout's test function, loaded by path (the older checkout has no such test)
    spec = importlib.util.spec_from_file_location("golden", Path(__file__).with_name("test_masked_modeling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(repr(module._golden_run()))


if __name__ == "__main__":
    main()
