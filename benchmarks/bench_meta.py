#!/usr/bin/env python
"""Benchmark ``load_partial(assign=True)``: materializing a meta-device model from a LLaMA-shaped bf16
checkpoint (the one ``bench_core.py`` builds and caches), against ``load_state_dict(assign=True)``.

    python benchmarks/bench_meta.py [--size-gb 1.25] [--repeats 5]

Memory is measured in fresh subprocesses: anonymous memory (RssAnon, sampled every 0.5 ms) is what the
process itself allocated; pages of the checkpoint's private file map that a tensor's reader touched are
file-backed (RssFile, page cache) and are shown apart. Modes:

  assign       meta model, ckptviz.load_partial(model, compare(model, path), assign=True); then every
               parameter is read once (a forward pass would do the same)
  torch        meta model, model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
  assign-cast  a float32 meta model from the same bf16 file: every tensor is cast, i.e. copied
  copy         a CPU model, the default copying load_partial (with its undo copy), for reference
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_core as core  # noqa: E402  (the checkpoint builder, the model and the memory sampler)

import ckptviz  # noqa: E402
from ckptviz.load import meta_tensors  # noqa: E402

MB = core.MB
MODES = ("assign", "torch", "assign-cast", "copy")


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def child(path: Path, layers: int, mode: str) -> None:
    model = core.cpu_model(layers) if mode == "copy" else core.meta_model(layers)
    if mode == "assign-cast":
        model = model.float()  # still on meta: free
    report = ckptviz.compare(model, path)
    objects = dict(model.state_dict(keep_vars=True))
    gc.collect()
    before = core.proc_status()
    sampler = core.AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    if mode == "torch":
        keep = model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    else:
        keep = _quiet(ckptviz.load_partial, model, report, assign=mode != "copy")
    elapsed = time.perf_counter() - t0
    peak = sampler.stop()
    after, file_pages = core.proc_status(), core.mapped_rss(path)
    live = model.state_dict(keep_vars=True)
    same = sum(live[k] is t for k, t in objects.items())
    with torch.no_grad():
        total = sum(float(p.detach().float().sum()) for p in model.parameters())  # read every parameter once
    touched = core.proc_status()
    print(json.dumps({
        "seconds": elapsed, "peak_anon": peak - before["RssAnon"], "kept_anon": after["RssAnon"] - before["RssAnon"],
        "file_rss_after_load": file_pages, "anon_after_read": touched["RssAnon"] - before["RssAnon"],
        "file_rss_after_read": touched["RssFile"] - before["RssFile"], "same_objects": same, "tensors": len(objects),
        "still_meta": len(meta_tensors(model)), "checksum": total, "kept": type(keep).__name__,
    }))


def measure(path: Path, layers: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--layers", str(layers), "--path", str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timings(path: Path, layers: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of the load step alone (the file already opened and compared), fresh meta model each time."""
    times: dict[str, list[float]] = {"assign": [], "torch": []}
    for _ in range(repeats + 1):  # the first round warms up
        model = core.meta_model(layers)
        report = ckptviz.compare(model, path)
        t0 = time.perf_counter()
        _quiet(ckptviz.load_partial, model, report, assign=True)
        times["assign"].append(time.perf_counter() - t0)
        model = core.meta_model(layers)
        sd = torch.load(path, mmap=True, weights_only=True)
        t0 = time.perf_counter()
        model.load_state_dict(sd, assign=True)
        times["torch"].append(time.perf_counter() - t0)
        del model, sd, report
        gc.collect()
    return {k: v[1:] for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.path, args.layers, args.child)
        return
    layers = core.layers_for(args.size_gb)
    path = core.build_checkpoint(layers)
    size = path.stat().st_size
    print(f"checkpoint: {path} ({size / 1e9:.2f} GB, {layers} layers, bf16), torch {torch.__version__}")
    core.warm_page_cache(path)
    rows = {mode: measure(path, layers, mode) for mode in MODES}
    times = timings(path, layers, args.repeats)
    print(f"\n{'mode':<12} {'load s':>8} {'peak anon':>10} {'kept anon':>10} {'file pages':>11} "
          f"{'anon, read':>11} {'file, read':>11}  same objects   still meta")
    for mode, r in rows.items():
        print(f"{mode:<12} {r['seconds']:>8.3f} {r['peak_anon'] / MB:>8.1f}MB {r['kept_anon'] / MB:>8.1f}MB "
              f"{r['file_rss_after_load'] / MB:>9.1f}MB {r['anon_after_read'] / MB:>9.1f}MB "
              f"{r['file_rss_after_read'] / MB:>9.1f}MB  {r['same_objects']:>5}/{r['tensors']:<6} {r['still_meta']:>6}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nload step, median of {args.repeats}: load_partial(assign=True) {med['assign']:.4f} s, "
          f"load_state_dict(assign=True) {med['torch']:.4f} s, ratio {med['assign'] / med['torch']:.2f}x")
    print("raw (s): " + "; ".join(f"{k} " + " ".join(f"{t:.4f}" for t in v) for k, v in times.items()))


if __name__ == "__main__":
    main()
