"""``fused-resnet``: the command line. Every module of fused_resnet.tools that defines ``add_command(subparsers)``
is a command (info, verify, bench, train, experiment, ...): a new command is one new file there."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from . import __path__ as _tools_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in pkgutil.iter_modules(_tools_path):
        tool = importlib.import_module(f"{__package__}.{module.name}")
        if hasattr(tool, "add_command"):
            tool.add_command(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
