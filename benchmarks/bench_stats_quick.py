#!/usr/bin/env python
"""Quick benchmark of ``ckptviz.stats.summarize`` against the cheapest full read of the same tensors.

    python benchmarks/bench_stats_quick.py [--mb 200] [--repeats 5] [--dtype bfloat16]

Saves a LLaMA-shaped random state dict (~``--mb`` MB) with ``torch.save`` in a temporary folder,
opens it with ``ckptviz.open_checkpoint(path).state_dict()`` (memory-mapped tensors), warms the page
cache, then times, interleaved in the same run:

  floor      ``t.sum(dtype=torch.float32)`` over every tensor
  stats      ``tensor_stats(t)`` over every tensor
  summarize  ``summarize(t)`` (statistics and a 64-bin histogram) over every tensor

and prints best and median times and the ratio summarize / floor (target <= 2x, for bf16).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ckptviz
from ckptviz.stats import summarize, tensor_stats

TARGET = 2.0
HIDDEN, INTERMEDIATE = 2048, 5632


def build(path: Path, mb: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    layer_bytes = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * dtype.itemsize
    sd: dict[str, torch.Tensor] = {}
    for i in range(max(1, round(mb * 1e6 / layer_bytes))):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.randn(HIDDEN, HIDDEN, generator=gen).mul_(0.02).to(dtype)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, generator=gen).mul_(0.02).to(dtype)
        sd[p + "mlp.up_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, generator=gen).mul_(0.02).to(dtype)
        sd[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, INTERMEDIATE, generator=gen).mul_(0.02).to(dtype)
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    torch.save(sd, path)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        build(path, args.mb, dtype)
        tensors = list(ckptviz.open_checkpoint(path).state_dict().values())
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        print(f"{len(tensors)} {args.dtype} tensors, {nbytes / 1e6:.0f} MB, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")

        cases = {
            "floor": lambda: [t.sum(dtype=torch.float32) for t in tensors],
            "stats": lambda: [tensor_stats(t) for t in tensors],
            "summarize": lambda: [summarize(t) for t in tensors],
        }
        for fn in cases.values():  # warm the page cache and the code paths
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                times[name].append(timed(fn))

    floor = min(times["floor"])
    for name, ts in times.items():
        print(f"{name:>10}: best {min(ts) * 1e3:7.1f} ms  median {statistics.median(ts) * 1e3:7.1f} ms  "
              f"{nbytes / min(ts) / 1e9:5.2f} GB/s  x{min(ts) / floor:.2f} of floor")
    ratio = min(times["summarize"]) / floor
    median_ratio = statistics.median(times["summarize"]) / statistics.median(times["floor"])
    verdict = "OK" if ratio <= TARGET else "OVER TARGET"
    print(f"summarize / floor: {ratio:.2f}x best, {median_ratio:.2f}x median (target <= {TARGET}x): {verdict}")


if __name__ == "__main__":
    main()
