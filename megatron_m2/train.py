"""Entry point: `python -m megatron_m2.train --help` (torchrun launches one process per GPU)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_m2.errors import ConfigError


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_m2.training.arguments import parse_args

    try:
        args = parse_args(argv)
        if args.dry_run:
            from megatron_m2.training.dry_run import dry_run

            dry_run(args)
            return 0
        from megatron_m2.parallel import command_process_groups
        from megatron_m2.training.loop import pretrain

        with command_process_groups():
            pretrain(args, eval_fn=_eval_fn(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _eval_fn(args):
    if not args.eval_interval:
        return None
    from megatron_m2.eval.runner import make_eval_fn

    return make_eval_fn(args)


if __name__ == "__main__":
    sys.exit(main())
