#!/usr/bin/env python
"""Megatron-LM style alias of `python -m megatron_m2.train`."""
import sys

from megatron_m2.train import main

if __name__ == "__main__":
    sys.exit(main())
