"""The command line: ``ckptviz inspect FILE`` prints a checkpoint's sections, metadata and tensors."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from .checkpoint import open_checkpoint
from .errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ckptviz", description="Look inside PyTorch checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="list a checkpoint's sections, metadata and tensors")
    inspect.add_argument("path")
    inspect.add_argument("--section", default=None, help="section to list (default: the best one)")
    inspect.add_argument("--trust", action="store_true", help="open files that name classes beyond the allowlist")
    args = parser.parse_args(argv)
    try:
        ck = open_checkpoint(args.path, trust=args.trust)
        frame = ck.tensors(args.section)
    except CheckpointError as e:
        print(f"ckptviz: {e}", file=sys.stderr)
        return 2
    print(ck)
    if ck.metadata:
        print(f"metadata: {ck.metadata}")
    if ck.optimizer_sections:
        print(f"optimizer state: {ck.optimizer_sections}")
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(frame.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
