"""The command line: ``ckptviz inspect | compare | diff | series | stats | report | app``.

This module only builds the argument parser (argparse, nothing heavy), so ``ckptviz --help`` starts fast;
each verb lives in its own ``cmd_*`` module that imports torch and pandas when it runs.

Exit codes: 0 done; 1 a ``--fail-on`` condition held (for CI gates); 2 bad usage or a checkpoint/model
that could not be read or built (the message on stderr says which file and why)."""

from __future__ import annotations

import argparse
import importlib
import sys

EXAMPLES = """\
examples:
  ckptviz inspect model.safetensors                  sections, metadata, tensors, sizes by dtype and layer
  ckptviz inspect hub_folder/ --folded --stats       one row per layer pattern, with value statistics
  ckptviz compare ckpt.pth --model torchvision:resnet18 --kwargs "num_classes=10"
  ckptviz compare ckpt.pth --model mypkg.models:Net --fail-on missing,shape_mismatch   (a CI gate)
  ckptviz compare hub_folder/ --model config --json  the folder's config.json builds the model
  ckptviz diff base.pt finetuned.pt --top 20         the 20 tensors that moved most
  ckptviz series runs/exp1/ --fail-on nonfinite      a training run: frozen layers, exploding norms, NaN
  ckptviz stats ckpt.pt --fail-on nonfinite          exit 1 when a tensor holds NaN or Inf
  ckptviz report ckpt.pth --model mypkg:Net -o report.html
  ckptviz app runs/                                  the inspector as a page of its own, on 127.0.0.1
"""

FAIL_CODE = 1
ERROR_CODE = 2


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit code 2)."""


def _output_options(p: argparse.ArgumentParser) -> None:
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="print JSON (for scripts)")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv", help="print the table as CSV")
    p.set_defaults(format="table")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="rows shown in the terminal table (default: 40 on a terminal, 1000 when piped)")
    p.add_argument("--all", action="store_true", help="show every row in the terminal table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars on stderr")


def _open_options(p: argparse.ArgumentParser, *, section: bool = True) -> None:
    if section:
        p.add_argument("--section", default=None, help="the state dict inside the file (default: the best one)")
    p.add_argument("--trust", action="store_true",
                   help="also read files whose pickle names classes beyond torch's allowlist (never runs them)")


def _rules(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=REPL",
                   help="rename checkpoint keys first (repeatable), e.g. --rule '^backbone\\.=' ")
    p.add_argument("--no-auto-align", dest="auto_align", action="store_false",
                   help="do not infer prefix, wrapper and structural renames")


def parser() -> argparse.ArgumentParser:
    """The ``ckptviz`` argument parser (one sub-command per verb)."""
    top = argparse.ArgumentParser(
        prog="ckptviz", description="Look inside PyTorch checkpoints and check them against models.",
        epilog=EXAMPLES + "\nexit codes: 0 done, 1 a --fail-on condition held, 2 usage or read error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="store_true", help="print the version and exit")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    def verb(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = verb("inspect", "list a checkpoint's sections, metadata, tensors and sizes (reads no tensor data)",
             "ckptviz inspect model.safetensors --folded")
    p.add_argument("path", help="a checkpoint file or a folder (hub shards, torch.distributed.checkpoint, DeepSpeed)")
    _open_options(p)
    fold = p.add_mutually_exclusive_group()
    fold.add_argument("--folded", dest="fold", action="store_const", const=True,
                      help="one row per layer pattern (layers.{i}.attn...)")
    fold.add_argument("--flat", dest="fold", action="store_const", const=False, help="one row per tensor")
    p.set_defaults(fold=None)
    p.add_argument("--stats", action="store_true", help="add value statistics (reads every tensor, with progress)")
    _output_options(p)

    p = verb("compare", "compare a checkpoint with a model class: one row per parameter or buffer",
             "ckptviz compare ckpt.pth --model torchvision:resnet18 --kwargs num_classes=10 --fail-on missing")
    p.add_argument("path", help="a checkpoint file or folder")
    p.add_argument("--model", "-m", required=True, metavar="SPEC",
                   help="torchvision:NAME, timm:NAME, package.module:Class, a config.json, or 'config' for the "
                        "checkpoint folder's own config.json")
    p.add_argument("--kwargs", default="", help='constructor arguments, e.g. "num_classes=10, in_chans=1"')
    _open_options(p)
    _rules(p)
    p.add_argument("--fail-on", default="", metavar="STATUSES",
                   help="exit 1 if any row has one of these statuses (comma separated; 'any' = anything but match)")
    _output_options(p)

    p = verb("diff", "compare two checkpoints key by key and value by value", "ckptviz diff base.pt tuned.pt --top 20")
    p.add_argument("a", help="the first checkpoint (the reference)")
    p.add_argument("b", help="the second checkpoint")
    p.add_argument("--section-a", default=None)
    p.add_argument("--section-b", default=None)
    _open_options(p, section=False)
    _rules(p)
    p.add_argument("--top", type=int, default=None, metavar="N", help="only the N tensors that changed most")
    p.add_argument("--fail-on", default="", metavar="WHAT",
                   help="exit 1 if: changed, only_a, only_b, shape_differs, dtype_differs (comma separated)")
    _output_options(p)

    p = verb("series", "a training run checkpoint by checkpoint: frozen layers, exploding norms, NaN appearing",
             "ckptviz series lightning_logs/version_0/checkpoints/ --fail-on nonfinite,norm_exploding")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a folder of checkpoints (ordered by step: epoch=9 before epoch=10), or two or more files")
    p.add_argument("--reference", choices=["previous", "first"], default="previous",
                   help="compare each checkpoint with the previous one (default) or with the first")
    p.add_argument("--order", choices=["natural", "metadata", "given"], default=None,
                   help="folder: by saved global_step/epoch when distinct, else by the numbers in the names; "
                        "files: as given")
    p.add_argument("--explode", type=float, default=10.0, metavar="X",
                   help="flag a norm growing more than X times between checkpoints (X² since the first)")
    _open_options(p)
    p.add_argument("--fail-on", default="", metavar="FLAGS",
                   help="exit 1 if any key is flagged: frozen, norm_exploding, nonfinite (comma separated)")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="also write the run (flags, heatmap, norms) as one self-contained HTML report")
    _output_options(p)

    p = verb("stats", "value statistics of every tensor (one streaming pass, with progress)",
             "ckptviz stats ckpt.pt --fail-on nonfinite")
    p.add_argument("path")
    _open_options(p)
    p.add_argument("--fail-on", default="", choices=["", "nonfinite"], help="exit 1 if a tensor holds NaN or Inf")
    _output_options(p)

    p = verb("report", "write one self-contained HTML file (tables, counts, plots) to attach to an issue",
             "ckptviz report ckpt.pth --model torchvision:resnet18 -o report.html")
    p.add_argument("path", help="a checkpoint file or folder")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--model", "-m", metavar="SPEC", help="compare with this model (as in `compare`)")
    target.add_argument("--against", metavar="PATH", help="diff with this second checkpoint (as in `diff`)")
    p.add_argument("--kwargs", default="", help="constructor arguments for --model")
    _open_options(p)
    _rules(p)
    p.add_argument("--output", "-o", required=True, help="the HTML file to write")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars on stderr")

    p = verb("app", "serve the inspector as a page of its own on 127.0.0.1 (no notebook needed)",
             "ckptviz app runs/ --port 8866")
    p.add_argument("path", nargs="?", default=None, help="a checkpoint file or folder to open first")
    p.add_argument("--port", type=int, default=8866)
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run ``ckptviz`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    top = parser()
    args = top.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"ckptviz {__version__}")
        return 0
    if args.command is None:
        top.print_help()
        return ERROR_CODE
    module = importlib.import_module(f".cmd_{args.command}", __name__)
    from ..errors import CheckpointError, ModelError

    try:
        return module.run(args)
    except (CheckpointError, ModelError, UsageError) as e:
        print(f"ckptviz {args.command}: {e}", file=sys.stderr)
        return ERROR_CODE
    except KeyboardInterrupt:
        print(f"ckptviz {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ckptviz ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
