#!/usr/bin/env python
"""Benchmark opening sharded safetensors folders of many tensors, as mixture-of-experts checkpoints are.

    python benchmarks/bench_folders.py [--tensors 100000] [--shards 100] [--repeats 5] [--scale 500000]

Measures, in one run:

  a. ``open_checkpoint(folder).tensors()``  vs  parsing the same shards' JSON headers directly
     (8-byte length + ``json.loads`` per shard): target <= 2x
  b. at ``--scale`` tensors (default 500,000, 96 shards): open + tensors() + compare with a meta model
     works, and its peak RSS growth (VmHWM in a fresh subprocess) stays < 1 GB

Folders are written once with ``safetensors.torch.save_file`` plus a ``model.safetensors.index.json`` and
cached in ``$CKPTVIZ_BENCH_DIR`` (default ``~/.cache/ckptviz-bench``). Tensors are tiny (the point is
their number); names follow a MoE layout: ``model.layers.{l}.mlp.experts.{e}.{w1,w2,w3}.weight``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import bench_core as core  # the cache folder
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz

MB = 2**20
TARGET_OPEN = 2.0
TARGET_RSS_MB = 1024.0


def key_names(n: int) -> list[str]:
    """``n`` MoE-style keys: 128 experts x 3 projections per layer, as many layers as needed."""
    per_layer = 128 * 3
    return [f"model.layers.{i // per_layer}.mlp.experts.{i % per_layer // 3}.w{i % 3 + 1}.weight" for i in range(n)]


def build_folder(n: int, shards: int) -> Path:
    folder = core.bench_dir() / f"moe-{n}-tensors-{shards}-shards"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    keys = key_names(n)
    per = -(-n // shards)
    weight_map = {}
    value = torch.zeros(2, 2, dtype=torch.bfloat16)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[s * per:(s + 1) * per]
        save_file({k: value.clone() for k in chunk}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": n * value.numel() * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def baseline(folder: Path) -> int:
    """The floor: read every shard's header and parse its JSON, nothing else."""
    count = 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            count += len(header) - ("__metadata__" in header)
    return count


def ckptviz_open(folder: Path) -> int:
    return len(ckptviz.open_checkpoint(folder).tensors())


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class Experts(nn.Module):
    """A meta-device model with exactly the benchmark folder's keys."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self._keys = keys
        for k in keys:
            *path, leaf = k.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, nn.Parameter(torch.empty(2, 2, dtype=torch.bfloat16)))


def rss_child(folder: Path, n: int) -> None:
    """In a fresh process: open + tensors() + compare with a meta model; print VmHWM growth."""
    def hwm() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    with torch.device("meta"):
        model = Experts(key_names(n))
    ckptviz.open_checkpoint(build_folder(100, 2)).tensors()  # imports and first-use allocations
    before = hwm()
    start = time.perf_counter()
    ck = ckptviz.open_checkpoint(folder)
    frame = ck.tensors()
    opened = time.perf_counter() - start
    rep = ckptviz.compare(model, ck)
    total = time.perf_counter() - start
    assert len(frame) == n and rep.summary["match"] == n, rep.summary
    print(json.dumps({"growth": hwm() - before, "open": opened, "total": total}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=500_000, help="tensors of the scale run (0: skip it)")
    parser.add_argument("--scale-shards", type=int, default=96)
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.scale)
        return

    folder = build_folder(args.tensors, args.shards)
    assert baseline(folder) == ckptviz_open(folder) == args.tensors
    times: dict[str, list[float]] = {"baseline": [], "ckptviz": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        times["baseline"].append(timed(baseline, folder))
        times["ckptviz"].append(timed(ckptviz_open, folder))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ckptviz"] / med["baseline"]
    print(f"{args.tensors:,} tensors in {args.shards} shards, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"| open_checkpoint(folder) + tensors() | {med['ckptviz']:.3f} s | {med['baseline']:.3f} s | "
          f"{ratio:.2f}x | <= {TARGET_OPEN:g}x ({'PASS' if ratio <= TARGET_OPEN else 'MISS'}) |")
    print("raw: " + "; ".join(f"{k} " + " ".join(f"{t:.3f}" for t in v) for k, v in times.items()))

    if args.scale:
        big = build_folder(args.scale, args.scale_shards)
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(big), "--scale", str(args.scale)],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        mb = res["growth"] / MB
        print(f"| {args.scale:,} tensors, {args.scale_shards} shards: open + tensors() + compare(meta model) | "
              f"{res['total']:.2f} s (open + tensors {res['open']:.2f} s) | peak RSS growth {mb:.0f} MB | "
              f"< {TARGET_RSS_MB:g} MB ({'PASS' if mb < TARGET_RSS_MB else 'MISS'}) |")


if __name__ == "__main__":
    main()
