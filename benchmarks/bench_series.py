#!/usr/bin/env python
"""Benchmark ``ckptviz.diff_series()`` on a synthetic training run: N checkpoints of one LLaMA-shaped fp32 model.

    python benchmarks/bench_series.py [--checkpoints 10] [--mb 128] [--rss-mb 512] [--repeats 3]
                                       [--formats pt,safetensors]

Measures, in one run (page cache warm, every case opens its files afresh, medians of the repeats), per format:

  a. ``diff_series(folder)``  vs  the floor: one pass over all files reading every tensor once
     (``open_checkpoint(path).state_dict(copy=False)`` and one ``t.sum(dtype=torch.float32)`` per tensor)
  b. peak anonymous-memory growth of ``diff_series`` in a fresh subprocess (RssAnon sampled every 0.5 ms;
     the files' page-cache pages do not count), on a second run of 3 checkpoints of ``--rss-mb`` MiB each (so
     that one checkpoint is well above two groups): bounded by two key groups (``series.GROUP_BYTES`` of the
     reference checkpoint and of the current one) plus buffers, not by a whole checkpoint
  c. (info) the naive series: ``cv.diff(path[k-1], path[k])`` for every consecutive pair, which reads every
     file but the first and the last twice, vs the same floor and vs (a)

The run: checkpoint 1 is random; each later one adds a little noise to every tensor but the embedding (which
stays frozen); the last one also multiplies ``lm_head`` by 50 and puts a NaN into layer 0's ``q_proj``, and
the benchmark checks that exactly those three findings are flagged, at the right checkpoint. ``.pt`` files
are Lightning-style (``{"epoch", "global_step", "state_dict"}``, ordered by the saved step); ``.safetensors``
files carry only their names (``epoch=9`` before ``epoch=10``: natural order). The folders are written once
and cached in ``$CKPTVIZ_BENCH_DIR`` (default ``~/.cache/ckptviz-bench``); ``CKPTVIZ_BENCH_SERIES_MB`` sets
the default ``--mb`` (the size of one checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_core as core  # noqa: E402  (the cache folder, timers and memory sampler)

import ckptviz  # noqa: E402
from ckptviz import series as series_mod  # noqa: E402

MB = core.MB
HIDDEN, INTERMEDIATE, VOCAB = 768, 2048, 8000
DTYPE = torch.float32
# series <= the pairwise diffs it replaces (it reads each file once); peak RSS growth in GROUP_BYTES (two groups +
# buffers). The ratio to the floor is reported, not gated: diff_series does ~10 float64 operations per element pair
# (sums of a², b², a·b, (b-a)², max |b-a|, changed and NaN counts), the floor one fp32 sum, so it is bound by
# arithmetic, not by reading (see the README's figures).
TARGETS = {"vs_pairs": 1.0, "rss_groups": 3.0}
FORMATS = ("pt", "safetensors")


# ---- the run -------------------------------------------------------------------------------------
def shapes_for(mb: float) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a LLaMA-shaped model of about ``mb`` MiB in fp32 (at least one layer)."""
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * DTYPE.itemsize
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * DTYPE.itemsize
    layers = max(1, round((mb * MB - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


FROZEN, EXPLODES, NAN_KEY = "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"


def run_folder(fmt: str, n: int, mb: float) -> Path:
    return core.bench_dir() / f"series-{fmt}-n{n}-{mb:g}mb-h{HIDDEN}-fp32"


def file_name(fmt: str, epoch: int) -> str:
    return f"epoch={epoch}.ckpt" if fmt == "pt" else f"epoch={epoch}.safetensors"


def build_run(fmt: str, n: int, mb: float) -> Path:
    """Write (once) the run's ``n`` checkpoints into their folder; a ``.complete`` marker says it is whole."""
    folder = run_folder(fmt, n, mb)
    if (folder / ".complete").is_file():
        return folder
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = shapes_for(mb)
    print(f"building {folder} ({n} x {mb:g} MiB, {len(shapes)} tensors each) ...", flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(8 * MB + 7, generator=gen)  # odd length: rows do not repeat
    shift = 0

    def fill(t: torch.Tensor, scale: float) -> None:
        nonlocal shift
        flat, done = t.view(-1), 0
        while done < flat.numel():
            k = min(flat.numel() - done, pool.numel() - shift)
            flat[done:done + k].add_(pool[shift:shift + k], alpha=scale)
            done, shift = done + k, (shift + k) % pool.numel()
        shift = (shift + 7919) % pool.numel()  # the next tensor starts elsewhere in the pool

    sd = {}
    for key, shape in shapes.items():
        sd[key] = torch.ones(shape) if key.endswith("norm.weight") else torch.zeros(shape, dtype=DTYPE)
        if not key.endswith("norm.weight"):
            fill(sd[key], 0.02)
    for epoch in range(1, n + 1):
        if epoch > 1:
            for key, t in sd.items():
                if key != FROZEN:
                    fill(t, 1e-3)  # one "training step": a little noise on every trained tensor
        out = sd
        if epoch == n:  # the last checkpoint: an exploded head and one NaN
            out = dict(sd, **{EXPLODES: sd[EXPLODES] * 50, NAN_KEY: sd[NAN_KEY].clone()})
            out[NAN_KEY][0, 0] = float("nan")
        path = folder / file_name(fmt, epoch)
        tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
        if fmt == "pt":
            torch.save({"epoch": epoch, "global_step": 1000 * epoch, "state_dict": out}, tmp)
        else:
            save_file(out, str(tmp))
        os.replace(tmp, path)
    (folder / ".complete").write_text("ok\n")
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def paths_of(folder: Path) -> list[Path]:
    return series_mod.run_files(folder)


# ---- the cases -----------------------------------------------------------------------------------
def floor(paths: list[Path]) -> list:
    """Every tensor of every file read once: a zero-copy view of the file, summed."""
    return [t.sum(dtype=torch.float32) for p in paths
            for t in ckptviz.open_checkpoint(p).state_dict(copy=False).values()]


def run_series(folder: Path):
    return ckptviz.diff_series(folder, progress=False)


def naive_pairs(paths: list[Path]) -> list:
    return [ckptviz.diff(a, b, progress=False) for a, b in zip(paths, paths[1:])]


def check_series(fmt: str, folder: Path, n: int) -> str:
    """The run is in order and its three findings are flagged, and only those, at the right checkpoint."""
    rep = run_series(folder)
    assert rep.labels == [file_name(fmt, e) for e in range(1, n + 1)], rep.labels
    found = {(r.key, r.flag, None if r.flag == "frozen" else r.label) for r in rep.flags.itertuples()}
    last = rep.labels[-1]
    assert found == {(FROZEN, "frozen", None), (EXPLODES, "norm_exploding", last), (NAN_KEY, "nonfinite", last)}, \
        rep.flags
    return f"{rep}"


# ---- memory (runs in a fresh subprocess) ---------------------------------------------------------
def rss_child(mode: str, folder: Path) -> None:
    before = core.proc_status()
    sampler = core.AnonSampler()
    sampler.start()
    keep = run_series(folder) if mode == "series" else naive_pairs(paths_of(folder))
    peak = sampler.stop()
    print(json.dumps({"before": before["RssAnon"], "peak": peak, "kept": type(keep).__name__}))


def measure_rss(mode: str, folder: Path) -> float:
    """Peak RssAnon growth (MiB) of ``mode`` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--rss-child", mode, "--path", str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return (data["peak"] - data["before"]) / MB


# ---- report --------------------------------------------------------------------------------------
def bench_format(fmt: str, n: int, mb: float, rss_mb: float, repeats: int) -> dict:
    folder = build_run(fmt, n, mb)
    paths = paths_of(folder)
    total = sum(p.stat().st_size for p in paths)
    for p in paths:
        core.warm_page_cache(p)
    print(f"[{fmt}] {folder}: {n} checkpoints, {total / 1e9:.2f} GB; {check_series(fmt, folder, n)}", flush=True)
    times = core.interleaved({"floor": lambda: floor(paths), "series": lambda: run_series(folder),
                              "naive": lambda: naive_pairs(paths)}, repeats)
    big = build_run(fmt, 3, rss_mb)
    rss = {mode: measure_rss(mode, big) for mode in ("series", "naive")}
    one_big = paths_of(big)[0].stat().st_size
    return {"fmt": fmt, "total": total, "one": total / n, "one_big": one_big, "times": times, "rss": rss,
            "med": {k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=10, help="checkpoints in the run (default 10)")
    parser.add_argument("--mb", type=float, default=float(os.environ.get("CKPTVIZ_BENCH_SERIES_MB", 128)),
                        help="MiB per checkpoint (default 128, or $CKPTVIZ_BENCH_SERIES_MB)")
    parser.add_argument("--rss-mb", type=float, default=512, help="MiB per checkpoint of the memory run (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    parser.add_argument("--formats", default="pt,safetensors", help="comma-separated: pt, safetensors")
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", choices=("series", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.path)
        return
    formats = [f for f in args.formats.split(",") if f]
    assert set(formats) <= set(FORMATS) and args.checkpoints >= 2, (formats, args.checkpoints)
    group = series_mod.GROUP_BYTES / MB
    print(f"python {platform.python_version()}, torch {torch.__version__}, ckptviz {ckptviz.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, repeats={args.repeats}, "
          f"GROUP_BYTES={group:g} MiB")
    results = [bench_format(fmt, args.checkpoints, args.mb, args.rss_mb, args.repeats) for fmt in formats]

    rows = []  # (label, value s, floor s, ratio, target, verdict)
    for r in results:
        med, fmt = r["med"], r["fmt"]
        ratio = med["series"] / med["floor"]
        rows.append((f"{fmt}: (info) diff_series(folder) vs floor", med["series"], med["floor"], ratio, "-", "info"))
        rows.append((f"{fmt}: (info) diff of each consecutive pair vs floor", med["naive"], med["floor"],
                     med["naive"] / med["floor"], "-", "info"))
        vs_pairs = med["series"] / med["naive"]
        rows.append((f"{fmt}: diff_series vs the pairwise diffs", med["series"], med["naive"], vs_pairs,
                     f"<= {TARGETS['vs_pairs']:g}x", core.verdict(vs_pairs, TARGETS["vs_pairs"])))
    print()
    print(f"{'measurement':<52} {'ckptviz s':>10} {'base s':>10} {'ratio':>7} {'target':>8}  result")
    for label, value, base, ratio, target, result in rows:
        print(f"{label:<52} {value:>10.3f} {base:>10.3f} {ratio:>6.2f}x {target:>8}  {result}")
    rss_target = TARGETS["rss_groups"] * group
    for r in results:
        ok = core.verdict(r["rss"]["series"], rss_target)
        print(f"{r['fmt'] + ': peak RSS growth (anon) of diff_series':<52} {r['rss']['series']:>8.1f}MiB "
              f"{'':>10} {'':>7} {f'<= {rss_target:g}MiB':>8}  {ok}   (one checkpoint: {r['one_big'] / MB:.0f} MiB)")
        print(f"{r['fmt'] + ': (info) peak RSS growth of the pairwise diffs':<52} {r['rss']['naive']:>8.1f}MiB")
    print()
    print("floor: open_checkpoint(path).state_dict(copy=False) + t.sum(dtype=torch.float32) over every tensor of "
          "every file; naive: cv.diff(path[k-1], path[k]) for every k")
    for r in results:
        gbs = r["total"] / 1e9 / r["med"]["series"]
        print(f"[{r['fmt']}] diff_series reads {r['total'] / 1e9:.2f} GB in {r['med']['series']:.3f} s "
              f"({gbs:.2f} GB/s); raw times (s):")
        for name, ts in r["times"].items():
            print(f"  {name:<7} " + " ".join(f"{t:.3f}" for t in ts))

    print()
    print("---- README summary ----")
    print(f"Run: {args.checkpoints} checkpoints x {results[0]['one'] / MB:.0f} MiB fp32, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; median of {args.repeats}, page cache warm.")
    print()
    print("| measurement | ckptviz | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    for label, value, base, ratio, target, result in rows:
        verdict = f"{target} ({result})" if result != "info" else "-"
        print(f"| {label} | {value:.3f} s | {base:.3f} s | {ratio:.2f}x | {verdict} |")
    for r in results:
        ok = core.verdict(r["rss"]["series"], rss_target)
        print(f"| {r['fmt']}: peak RSS growth of diff_series, 3 x {r['one_big'] / MB:.0f} MiB | "
              f"{r['rss']['series']:.1f} MiB | - | - | <= {rss_target:g} MiB ({ok}) |")
        print(f"| {r['fmt']}: peak RSS growth of the pairwise diffs (info) | {r['rss']['naive']:.1f} MiB | - | - | - |")


if __name__ == "__main__":
    main()
