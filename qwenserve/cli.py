"""The `qwenserve` console script: dispatches to the `launch`, `generate` and `make-checkpoint` subcommands.

Each subcommand's flags live beside the code they drive (`qwenserve/server/commands.py`,
`qwenserve/model/checkpoint.py`); this file only wires them together, and turns an unexpected
exception into one line on stderr and exit 1 (`QWENSERVE_DEBUG=1` shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    from qwenserve import __version__
    from qwenserve.model import checkpoint
    from qwenserve.server import commands

    parser = argparse.ArgumentParser(prog="qwenserve", description="Serve Qwen (v1) models.")
    parser.add_argument("--version", action="version", version=f"qwenserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.add_launch_parser(sub)
    commands.add_generate_parser(sub)
    checkpoint.add_make_checkpoint_parser(sub)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the subcommands report expected failures themselves
        if os.environ.get("QWENSERVE_DEBUG"):
            raise
        print(f"qwenserve {args.command}: error: {type(e).__name__}: {e} "
              "(set QWENSERVE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
