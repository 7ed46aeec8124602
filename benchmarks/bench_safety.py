#!/usr/bin/env python
"""What the safe-reading machinery costs: ``open_checkpoint`` with and without its file checks.

    python benchmarks/bench_safety.py [--size-gb 1.25] [--repeats 20] [--shards-tensors 20000]

Measures, in one run (page cache warm, medians, cases interleaved):

  a. ``open_checkpoint(path).tensors()`` on the LLaMA-shaped bf16 checkpoint of ``bench_core``: as
     shipped  vs  the same call with the identity checks of every read switched off
     (``MappedFile._check`` a no-op), the baseline.  Target: <= 1.10x.
  b. the same two cases for a torch zip of ``--shards-tensors`` small tensors (where the zip
     directory and local headers are read in many small ``pread`` calls), for information.
  c. ``ck.tensor(key)`` of every tensor (``pread`` into owned memory, checked before and after)  vs
     the same with the checks off, for information.

The "checks off" baseline is the same code reading the same bytes: the ratio is the price of the
checks (an ``fstat`` before and after each read, a ``stat`` of the path before) alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core as core  # noqa: E402  (checkpoint builder, timers)

import ckptviz  # noqa: E402
from ckptviz.readers.mapped import MappedFile  # noqa: E402

TARGET = 1.10


def _unchecked(fn):
    """``fn`` run with every file-identity check of MappedFile switched off."""
    def run():
        real = MappedFile._check
        MappedFile._check = lambda self, fd, path_too=False: None
        try:
            return fn()
        finally:
            MappedFile._check = real
    return run


def open_list(path: Path):
    ck = ckptviz.open_checkpoint(path)
    return ck, ck.tensors()


def read_all(path: Path):
    ck = ckptviz.open_checkpoint(path)
    return [ck.tensor(k).sum() for k in ck.tensors().index]


def many_tensors(n: int) -> Path:
    path = core.bench_dir() / f"many-{n}.pt"
    if not path.exists():
        torch.save({f"layer.{i}.weight": torch.full((4,), float(i)) for i in range(n)}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shards-tensors", type=int, default=20000)
    args = parser.parse_args()
    path = core.build_checkpoint(core.layers_for(args.size_gb))
    many = many_tensors(args.shards_tensors)
    core.warm_page_cache(path)
    core.warm_page_cache(many)
    print(f"checkpoints: {path.name} ({path.stat().st_size / 1e9:.2f} GB), {many.name}; repeats={args.repeats}")
    cases = {
        "open": lambda: open_list(path), "open_off": _unchecked(lambda: open_list(path)),
        "many": lambda: open_list(many), "many_off": _unchecked(lambda: open_list(many)),
    }
    times = core.interleaved(cases, args.repeats)
    reads = core.interleaved({"read": lambda: read_all(path), "read_off": _unchecked(lambda: read_all(path))},
                             max(3, args.repeats // 5))
    med = {k: statistics.median(v) for k, v in {**times, **reads}.items()}
    print(f"{'measurement':<48} {'checked s':>10} {'off s':>10} {'ratio':>7}  result")
    for label, case, target in (("a. open_checkpoint + tensors(), LLaMA bf16", "open", TARGET),
                                (f"b. open_checkpoint + tensors(), {args.shards_tensors} tensors", "many", None),
                                ("c. ck.tensor(k) of every tensor, LLaMA bf16", "read", None)):
        ratio = med[case] / med[f"{case}_off"]
        verdict = ("PASS" if ratio <= target else "MISS") if target else "info"
        print(f"{label:<48} {med[case]:>10.4f} {med[case + '_off']:>10.4f} {ratio:>6.2f}x  {verdict}")


if __name__ == "__main__":
    main()
