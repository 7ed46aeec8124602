#!/usr/bin/env python
"""Benchmark ckptviz's streaming statistics and checkpoint diff on the LLaMA-shaped bf16 checkpoint.

    python benchmarks/bench_stats.py [--size-gb 1.25] [--repeats 5]

Measures, in one run (page cache warm, every case opens its checkpoint afresh, medians of the repeats):

  a2. the public path: ``ck.stats()`` then ``ck.histogram(key)`` for every key, vs the same floor (<= 1.2x)
  a. statistics + a 64-bin histogram of every tensor (``ckptviz.stats.summarize`` over
     ``open_checkpoint(path).state_dict()``)  vs  the floor: ``open_checkpoint(path)`` and one
     ``t.sum(dtype=torch.float32)`` per tensor, which reads every byte once
  b. peak anonymous-memory growth of (a) in a fresh subprocess (RssAnon sampled every 0.5 ms; the
     checkpoint's file-backed pages are page cache, not counted)
  c. ``ckptviz.diff(path_a, path_b)`` of the checkpoint and a perturbed, ``module.``-prefixed copy of it
     vs  the floor pass over both files

and, for reference, (a2) against the barest read of every byte (``os.preadv`` of the file into one reused
8 MiB buffer, no arithmetic), ``Checkpoint.stats()`` (statistics only) and the naive per-tensor loop
(``t.float()``, then mean/std/min/max/histc). The checkpoint comes from ``bench_core.build_checkpoint``;
the perturbed copy is written once beside it, in ``$CKPTVIZ_BENCH_DIR`` (default ``~/.cache/ckptviz-bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core as core  # noqa: E402  (the checkpoint builder, timers and memory sampler)

import ckptviz  # noqa: E402
from ckptviz.diff import diff  # noqa: E402
from ckptviz.stats import CACHE, summarize  # noqa: E402

TARGETS = {"public": 1.2, "stats": 2.0, "rss_mb": 256.0, "diff": 3.0}
MB = core.MB
RSS_MODES = ("stats", "diff")


# ---- the second checkpoint: a "fine-tuned" copy ---------------------------------------------------
def tuned_path(base: Path) -> Path:
    return base.with_name(base.stem + "-tuned.pt")


def build_tuned(base: Path) -> Path:
    """Write (once) a copy of ``base`` as DataParallel would save it (``module.`` prefix), with every
    projection of the even layers and the lm_head nudged by ~1% noise; embeddings, norms and the odd
    layers are left bit-identical."""
    path = tuned_path(base)
    if path.is_file() and path.stat().st_mtime >= base.stat().st_mtime:
        return path
    print(f"building {path} ...", flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    pool = (torch.randn(4 * MB + 3, generator=gen) * 2e-4).to(core.DTYPE)
    sd, shift = {}, 0
    for key, t in torch.load(base, mmap=True, weights_only=True).items():
        parts = key.split(".")
        nudge = key.startswith("lm_head") or (parts[1:2] == ["layers"] and int(parts[2]) % 2 == 0
                                              and key.endswith("proj.weight"))
        if nudge:
            t = t.clone()
            flat, done = t.view(-1), 0
            while done < flat.numel():
                n = min(flat.numel() - done, pool.numel() - shift)
                flat[done:done + n] += pool[shift:shift + n]
                done, shift = done + n, (shift + n) % pool.numel()
        sd["module." + key] = t
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


# ---- the cases -----------------------------------------------------------------------------------
def tensors_of(path: Path) -> list[torch.Tensor]:
    """Every tensor as a view of the file's map (page cache, not anonymous memory)."""
    return list(ckptviz.open_checkpoint(path).state_dict(copy=False).values())


def floor(*paths: Path) -> list:
    return [t.sum(dtype=torch.float32) for p in paths for t in tensors_of(p)]


def pread_copy(path: Path, block: int = 8 * 2**20) -> int:
    """The barest read of every byte: ``os.preadv`` of the whole file into one reused 8 MiB buffer
    (no arithmetic; one thread)."""
    buf = memoryview(bytearray(block))
    fd = os.open(path, os.O_RDONLY)
    try:
        at = 0
        while (n := os.preadv(fd, [buf], at)) > 0:
            at += n
        return at
    finally:
        os.close(fd)


def full_stats(path: Path) -> list:
    return [summarize(t, 64) for t in tensors_of(path)]


def checkpoint_stats(path: Path):
    CACHE.clear()  # every repeat computes afresh
    return ckptviz.open_checkpoint(path).stats(progress=False)


def public_path(path: Path) -> list:
    """What a user or the widget does: ``ck.stats()``, then ``ck.histogram(key)`` for every key."""
    CACHE.clear()
    ck = ckptviz.open_checkpoint(path)
    frame = ck.stats(progress=False)
    return [frame, *(ck.histogram(k) for k in frame.index)]


def naive_stats(path: Path) -> list:
    out = []
    for t in tensors_of(path):
        f = t.float()
        lo, hi = f.min(), f.max()
        out.append((f.mean(), f.std(), lo, hi, torch.histc(f, 64, float(lo), float(hi))))
    return out


def run_diff(a: Path, b: Path):
    with contextlib.redirect_stderr(io.StringIO()):  # the tqdm bar (more than 256 MiB to read)
        return diff(a, b)


# ---- memory (runs in a fresh subprocess) ---------------------------------------------------------
def rss_child(mode: str, a: Path, b: Path) -> None:
    before = core.proc_status()
    sampler = core.AnonSampler()
    sampler.start()
    keep: Any = full_stats(a) if mode == "stats" else run_diff(a, b)
    peak = sampler.stop()
    print(json.dumps({"before": before["RssAnon"], "peak": peak, "kept": type(keep).__name__}))


def measure_rss(mode: str, a: Path, b: Path) -> float:
    """Peak RssAnon growth (MB) of ``mode`` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--rss-child", mode, "--path", str(a), "--path-b", str(b)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return (data["peak"] - data["before"]) / MB


def check_diff(a: Path, b: Path) -> str:
    """A sanity check that the diff paired every key and saw exactly the nudged tensors change."""
    rep = run_diff(a, b)
    changed = int((rep.frame["changed_frac"] > 0).sum())
    assert rep.summary["both"] == len(rep.frame), rep.summary
    assert rep.rules == [("^module\\.", "")], rep.rules
    return f"diff: {rep.summary['both']} keys paired, values changed in {changed}, rules {rep.rules}"


# ---- report --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.25, help="approximate checkpoint size (default 1.25)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--path-b", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", choices=RSS_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.path, args.path_b)
        return

    layers = core.layers_for(args.size_gb)
    a = core.build_checkpoint(layers)
    b = build_tuned(a)
    size = a.stat().st_size
    n_tensors = len(tensors_of(a))
    print(f"checkpoints: {a} ({size / 1e9:.2f} GB) and {b.name} ({b.stat().st_size / 1e9:.2f} GB); "
          f"{layers} layers, {n_tensors} tensors, bf16")
    print(f"python {platform.python_version()}, torch {torch.__version__}, ckptviz {ckptviz.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, repeats={args.repeats}")
    core.warm_page_cache(a)
    core.warm_page_cache(b)
    print(check_diff(a, b), flush=True)

    print("a/c: timing ...", flush=True)
    times = core.interleaved(
        {
            "floor": lambda: floor(a),
            "pread": lambda: pread_copy(a),
            "stats": lambda: full_stats(a),
            "ck.stats": lambda: checkpoint_stats(a),
            "public": lambda: public_path(a),
            "naive": lambda: naive_stats(a),
            "floor2": lambda: floor(a, b),
            "diff": lambda: run_diff(a, b),
        },
        args.repeats,
    )
    print("b: peak RSS (fresh subprocesses) ...", flush=True)
    rss = {mode: measure_rss(mode, a, b) for mode in RSS_MODES}

    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    rows = [  # table label, README label, case, floor case, target
        ("a. summarize (stats + 64-bin hist), all", "statistics + 64-bin histogram of every tensor (`summarize`)",
         "stats", "floor", TARGETS["stats"]),
        ("a2. ck.stats() + ck.histogram(k), every k", "`ck.stats()` then `ck.histogram(key)` for every key",
         "public", "floor", TARGETS["public"]),
        ("   (info) a2. vs a bare pread copy", "`ck.stats()` + every `ck.histogram(key)` vs a bare `pread` "
         "copy of every byte (info)", "public", "pread", None),
        ("   (info) Checkpoint.stats(), stats only", "`Checkpoint.stats()`, statistics only (info)",
         "ck.stats", "floor", None),
        ("   (info) naive t.float() + mean/std/...", "naive `t.float()` + mean/std/min/max/histc loop (info)",
         "naive", "floor", None),
        ("c. diff(path_a, path_b)", "`diff(path_a, path_b)`, floor over both files", "diff", "floor2",
         TARGETS["diff"]),
    ]

    def ratio_cells(case: str, base: str, target: float | None) -> tuple[float, str, str]:
        ratio = med[case] / med[base]
        if target is None:
            return ratio, "-", "info"
        return ratio, f"<= {target:g}x", "PASS" if ratio <= target else "MISS"

    rss_ok = "PASS" if rss["stats"] <= TARGETS["rss_mb"] else "MISS"
    print()
    print(f"{'measurement':<42} {'ckptviz s':>10} {'floor s':>10} {'ratio':>7} {'target':>8}  result"
          f"   (min: ckptviz / floor)")
    for label, _, case, base, target in rows:
        ratio, tgt, res = ratio_cells(case, base, target)
        print(f"{label:<42} {med[case]:>10.4f} {med[base]:>10.4f} {ratio:>6.2f}x {tgt:>8}  {res:<6}"
              f"   ({best[case]:.4f} / {best[base]:.4f})")
    print(f"{'b. peak RSS growth (anon) of a.':<42} {rss['stats']:>8.1f}MB {'':>10} {'':>7} "
          f"{'<= 256MB':>8}  {rss_ok}")
    print(f"{'   (info) peak RSS growth (anon) of c.':<42} {rss['diff']:>8.1f}MB {'':>10} {'':>7} {'-':>8}  info")
    print()
    print("floors: a = open_checkpoint(path) + t.sum(dtype=torch.float32) over every tensor; "
          "c = the same over both files; pread = os.preadv of the file into one 8 MiB buffer")
    gbs = 2 * size / 1e9 / med["diff"]
    print(f"diff reads {2 * size / 1e9:.2f} GB in {med['diff']:.3f} s ({gbs:.2f} GB/s); "
          f"summarize reads {size / 1e9:.2f} GB in {med['stats']:.3f} s ({size / 1e9 / med['stats']:.2f} GB/s)")
    print("raw times (s):")
    for name, ts in times.items():
        print(f"  {name:<9} " + " ".join(f"{t:.4f}" for t in ts))

    print()
    print("---- README summary ----")
    print(f"Checkpoints: {size / 1e9:.2f} GB bf16 each, {n_tensors} tensors ({layers}-layer LLaMA shape), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; median of {args.repeats}, page cache warm.")
    print()
    print("| measurement | ckptviz | floor | ratio | target |")
    print("|---|---|---|---|---|")
    for _, label, case, base, target in rows:
        ratio, tgt, res = ratio_cells(case, base, target)
        verdict = f"{tgt} ({res})" if target else "-"
        print(f"| {label} | {med[case]:.3f} s | {med[base]:.3f} s | {ratio:.2f}x | {verdict} |")
    print(f"| peak RSS growth of `summarize`, every tensor | {rss['stats']:.1f} MB | - | - | <= 256 MB ({rss_ok}) |")
    print(f"| peak RSS growth of `diff` (info) | {rss['diff']:.1f} MB | - | - | - |")


if __name__ == "__main__":
    main()
