#!/usr/bin/env python
"""Zero-shot classification and retrieval of a checkpoint at any TP/PP layout: see `python -m megatron_m2.eval`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron_m2.eval.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
