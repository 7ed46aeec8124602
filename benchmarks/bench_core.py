#!/usr/bin/env python
"""Benchmark ckptviz's core against plain ``torch.load(mmap=True)`` on a LLaMA-shaped bf16 checkpoint.

    python benchmarks/bench_core.py [--size-gb 1.25] [--repeats 5]

Measures, in one run:

  a. ``open_checkpoint(path).tensors()``   vs  ``torch.load(mmap=True, weights_only=True)`` + listing shapes
  b. ``compare(meta_model, path)``        vs  the same baseline
  c. peak memory growth of open + tensors() + compare, in a fresh subprocess: peak RssAnon (sampled every
     0.5 ms) over the RSS just before; VmHWM and the touched pages of the checkpoint's maps are shown too
  d. ``load_partial(cpu_model, report)``   vs  ``cpu_model.load_state_dict(mmap'ed state dict)``

The checkpoint is written once with ``torch.save`` and cached outside the repository, in
``$CKPTVIZ_BENCH_DIR`` (default ``~/.cache/ckptviz-bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptviz

HIDDEN = 2048
INTERMEDIATE = 5632
VOCAB = 32000
DTYPE = torch.bfloat16
MB = 2**20

TARGETS = {"open": 2.0, "compare": 3.0, "rss_mb": 100.0, "load": 1.5}
RSS_MODES = ("ckptviz", "torch", "ckptviz-load", "torch-load")  # c (target), and the load step (info)


# ---- the model -----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPE))


class Attention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(hidden, hidden, bias=False, dtype=DTYPE))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=DTYPE)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=DTYPE)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=DTYPE)


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.self_attn = Attention(hidden)
        self.mlp = MLP(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden)
        self.post_attention_layernorm = RMSNorm(hidden)


class Backbone(nn.Module):
    def __init__(self, layers: int, hidden: int, intermediate: int, vocab: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden, dtype=DTYPE)
        self.layers = nn.ModuleList(DecoderLayer(hidden, intermediate) for _ in range(layers))
        self.norm = RMSNorm(hidden)


class LlamaShaped(nn.Module):
    """Parameter names and shapes of a LLaMA causal LM (no forward: only loading is benchmarked)."""

    def __init__(self, layers: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, vocab: int = VOCAB):
        super().__init__()
        self.model = Backbone(layers, hidden, intermediate, vocab)
        self.lm_head = nn.Linear(hidden, vocab, bias=False, dtype=DTYPE)


def meta_model(layers: int) -> LlamaShaped:
    with torch.device("meta"):
        return LlamaShaped(layers)


def cpu_model(layers: int) -> LlamaShaped:
    """A CPU bf16 model with uninitialised (but allocated and touched) weights; cheap to build."""
    model = meta_model(layers).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # fault the pages in now, so the first timed load does not pay for it
    return model


def layers_for(size_gb: float) -> int:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * DTYPE.itemsize
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * DTYPE.itemsize
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


# ---- the checkpoint ------------------------------------------------------------------------------
def bench_dir() -> Path:
    return Path(os.environ.get("CKPTVIZ_BENCH_DIR") or Path.home() / ".cache" / "ckptviz-bench").expanduser()


def checkpoint_path(layers: int) -> Path:
    return bench_dir() / f"llama-h{HIDDEN}-i{INTERMEDIATE}-v{VOCAB}-l{layers}-bf16.pt"


def build_checkpoint(layers: int) -> Path:
    """Write (once) a torch.save zip checkpoint with the model's keys, filled with cheap random values."""
    path = checkpoint_path(layers)
    shapes = {k: tuple(v.shape) for k, v in meta_model(layers).state_dict().items()}
    nbytes = sum(torch.Size(s).numel() for s in shapes.values()) * DTYPE.itemsize
    if path.is_file() and path.stat().st_size >= nbytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {path} ({nbytes / 1e9:.2f} GB, {len(shapes)} tensors) ...", flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(8 * MB + 7, generator=gen) * 0.02).to(DTYPE)  # odd length: rows do not repeat
    sd, shift = {}, 0
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=DTYPE)
        if key.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            flat, done = t.view(-1), 0
            while done < flat.numel():
                n = min(flat.numel() - done, pool.numel() - shift)
                flat[done : done + n] = pool[shift : shift + n]
                done, shift = done + n, (shift + n) % pool.numel()
        sd[key] = t
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MB):
            pass


# ---- timing --------------------------------------------------------------------------------------
def run_timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes; its result is dropped after the clock stops."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    del out
    gc.collect()
    return elapsed


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Time every case ``repeats`` times, round robin (after one untimed warm-up round)."""
    for fn in cases.values():
        run_timed(fn)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(run_timed(fn))
    return times


def baseline_open(path: Path):
    sd = torch.load(path, mmap=True, weights_only=True)
    return sd, [(k, tuple(v.shape)) for k, v in sd.items()]


def ckptviz_open(path: Path):
    ck = ckptviz.open_checkpoint(path)
    return ck, ck.tensors()


def bench_load(path: Path, layers: int, repeats: int) -> dict[str, list[float]]:
    model = cpu_model(layers)
    keys = list(model.state_dict())
    times: dict[str, list[float]] = {"base_load": [], "ckv_load": [], "ckv_fast": [], "base_total": [],
                                     "ckv_total": []}

    def base_step():
        sd = torch.load(path, mmap=True, weights_only=True)
        gc.collect()
        t0 = time.perf_counter()
        model.load_state_dict(sd)
        return time.perf_counter() - t0

    def ckv_step(undo=True):
        ck = ckptviz.open_checkpoint(path)
        report = ckptviz.compare(model, ck)
        gc.collect()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            result = ckptviz.load_partial(model, report, undo=undo)
        elapsed = time.perf_counter() - t0
        assert len(result.loaded) == len(keys) and not result.skipped, result
        return elapsed

    def base_total():
        model.load_state_dict(torch.load(path, mmap=True, weights_only=True))

    def ckv_total():
        with contextlib.redirect_stderr(io.StringIO()):
            return ckptviz.load_partial(model, ckptviz.compare(model, path))

    # warm-up round, and a check that both really load the checkpoint's values
    base_step()
    ckv_step()
    sd = torch.load(path, mmap=True, weights_only=True)
    live = model.state_dict()
    for k in (keys[0], keys[len(keys) // 2], keys[-1]):
        assert torch.equal(live[k], sd[k]), k
    del sd, live
    run_timed(base_total)
    run_timed(ckv_total)
    for _ in range(repeats):
        times["base_load"].append(base_step())
        gc.collect()
        times["ckv_load"].append(ckv_step())
        gc.collect()
        times["ckv_fast"].append(ckv_step(undo=False))
        gc.collect()
        times["base_total"].append(run_timed(base_total))
        times["ckv_total"].append(run_timed(ckv_total))
    return times


# ---- memory (runs in a fresh subprocess) ---------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (touched checkpoint pages)."""
    target, total, current = str(path.resolve()), 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = line.split(None, 5)[5].strip() if len(head) >= 6 else ""
            elif head and head[0] == "Rss:" and current == target:
                total += int(head[1]) * 1024
    return total


class AnonSampler(threading.Thread):
    """Samples RssAnon every ~0.5 ms: the peak of what the process itself allocated, whether or not the
    file maps that were touched meanwhile are still open when the measurement ends."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = proc_status()["RssAnon"]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.0005):
            self.peak = max(self.peak, proc_status()["RssAnon"])

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, proc_status()["RssAnon"])


def rss_child(path: Path, layers: int, mode: str) -> None:
    model = cpu_model(layers) if mode.endswith("-load") else meta_model(layers)
    gc.collect()
    before = proc_status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    sampler = AnonSampler()
    sampler.start()
    if mode == "ckptviz":
        ck = ckptviz.open_checkpoint(path)
        frame = ck.tensors()
        report = ckptviz.compare(model, ck)
        keep: Any = (ck, frame, report)
    elif mode == "ckptviz-load":
        with contextlib.redirect_stderr(io.StringIO()):
            keep = ckptviz.load_partial(model, ckptviz.compare(model, path))  # kept, as a user would
    elif mode == "torch-load":
        keep = torch.load(path, mmap=True, weights_only=True)
        model.load_state_dict(keep)
    else:
        sd = torch.load(path, mmap=True, weights_only=True)
        keep = (sd, [(k, tuple(v.shape)) for k, v in sd.items()])
    peak_anon = sampler.stop()
    after = proc_status()
    file_pages = mapped_rss(path)
    print(json.dumps({"before": before, "after": after, "file_pages": file_pages, "peak_anon": peak_anon,
                      "kept": type(keep).__name__}))


def measure_rss(path: Path, layers: int, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rss-child", mode, "--layers", str(layers), "--path", str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    peak = data["after"]["VmHWM"] - data["before"]["VmRSS"]
    data["peak_growth"] = peak
    data["peak_growth_excl_file"] = peak - data["file_pages"]
    data["anon_growth"] = data["after"]["RssAnon"] - data["before"]["RssAnon"]
    data["peak_anon_growth"] = data["peak_anon"] - data["before"]["RssAnon"]
    # the target figure: peak anonymous memory, i.e. what the code itself materialised; touched pages of
    # the checkpoint's file maps (page cache, shared with the OS) are file-backed and never count in RssAnon
    data["growth"] = data["peak_anon_growth"]
    return data


# ---- report --------------------------------------------------------------------------------------
def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def only_load(args: argparse.Namespace) -> None:
    """The load rows alone: compare + load_partial (default undo) vs load_state_dict, and peak RSS."""
    layers = layers_for(args.size_gb)
    path = build_checkpoint(layers)
    print(f"checkpoint: {path} ({path.stat().st_size / 1e9:.2f} GB, {layers} layers), repeats={args.repeats}")
    warm_page_cache(path)
    ld = bench_load(path, layers, args.repeats)
    med = {name: statistics.median(ts) for name, ts in ld.items()}
    for label, ck, base, target in (("d. load_partial, with undo (default)", "ckv_load", "base_load", None),
                                    ("d. load_partial(undo=False)", "ckv_fast", "base_load", None),
                                    ("d. open + compare + load_partial (total)", "ckv_total", "base_total", 2.0)):
        ratio = med[ck] / med[base]
        res = verdict(ratio, target) if target else "info"
        print(f"{label:<42} {med[ck]:>10.4f} {med[base]:>10.4f} {ratio:>6.2f}x  {res}")
    for mode in ("ckptviz-load", "torch-load"):
        print(f"peak RSS growth, {mode}: {measure_rss(path, layers, mode)['growth'] / MB:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.25, help="approximate checkpoint size (default 1.25)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", choices=RSS_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--only-load", action="store_true",
                        help="run only the load rows (d) and their RSS (for a busy machine)")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.path, args.layers, args.rss_child)
        return
    if args.only_load:
        only_load(args)
        return

    layers = layers_for(args.size_gb)
    path = build_checkpoint(layers)
    size = path.stat().st_size
    n_tensors = len(meta_model(layers).state_dict())
    print(f"checkpoint: {path} ({size / 1e9:.2f} GB, {layers} layers, {n_tensors} tensors, bf16)")
    print(f"python {platform.python_version()}, torch {torch.__version__}, ckptviz {ckptviz.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, repeats={args.repeats}")
    warm_page_cache(path)
    meta = meta_model(layers)

    print("a/b: open + list, compare ...", flush=True)
    ab = interleaved(
        {
            "baseline": lambda: baseline_open(path),
            "open": lambda: ckptviz_open(path),
            "compare": lambda: ckptviz.compare(meta, path),
        },
        args.repeats,
    )
    print("c: peak RSS (fresh subprocesses) ...", flush=True)
    rss = {mode: measure_rss(path, layers, mode) for mode in RSS_MODES}
    print("d: load ...", flush=True)
    ld = bench_load(path, layers, args.repeats)

    med = {name: statistics.median(ts) for name, ts in {**ab, **ld}.items()}
    best = {name: min(ts) for name, ts in {**ab, **ld}.items()}
    rows = [  # measurement, ckptviz key, baseline key, target
        ("a. open_checkpoint + tensors()", "open", "baseline", TARGETS["open"]),
        ("b. compare(meta model, path)", "compare", "baseline", TARGETS["compare"]),
        ("d. load_partial, with undo (default)", "ckv_load", "base_load", TARGETS["load"]),
        ("d. load_partial(undo=False)", "ckv_fast", "base_load", TARGETS["load"]),
        ("d. open + compare + load_partial (total)", "ckv_total", "base_total", None),
    ]
    ck_rss, th_rss = rss["ckptviz"], rss["torch"]
    rss_mb = ck_rss["growth"] / MB
    load_mb = rss["ckptviz-load"]["growth"] / MB

    print()
    print(f"{'measurement':<42} {'ckptviz s':>10} {'baseline s':>10} {'ratio':>7} {'target':>8}  result"
          f"   (min: ckptviz / baseline)")
    for label, ck, base, target in rows:
        ratio = med[ck] / med[base]
        tgt = f"<= {target:g}x" if target else "-"
        res = verdict(ratio, target) if target else "info"
        print(f"{label:<42} {med[ck]:>10.4f} {med[base]:>10.4f} {ratio:>6.2f}x {tgt:>8}  {res:<6}"
              f"   ({best[ck]:.4f} / {best[base]:.4f})")
    print(f"{'c. peak RSS growth, open+tensors+compare':<42} {rss_mb:>8.1f}MB "
          f"{th_rss['growth'] / MB:>8.1f}MB {'':>7} {'<= 100MB':>8}  "
          f"{'PASS' if rss_mb <= TARGETS['rss_mb'] else 'MISS'}")
    print(f"{'   (info) peak RSS growth, load step':<42} {load_mb:>8.1f}MB "
          f"{rss['torch-load']['growth'] / MB:>8.1f}MB {'':>7} {'-':>8}  info")
    print()
    print("baselines: a/b = torch.load(path, mmap=True, weights_only=True) + [(k, tuple(v.shape)) ...];")
    print("           d   = model.load_state_dict(sd) with sd already mmap-opened; "
          "total = torch.load + load_state_dict")
    for mode, data in rss.items():
        print(f"RSS {mode:>12}: before {data['before']['VmRSS'] / MB:.1f} MB, peak {data['after']['VmHWM'] / MB:.1f} MB"
              f" -> growth {data['peak_growth'] / MB:.1f} MB, of which touched checkpoint pages "
              f"{data['file_pages'] / MB:.1f} MB; peak anon growth (sampled) {data['peak_anon_growth'] / MB:.1f} MB, "
              f"kept {data['anon_growth'] / MB:.1f} MB")
    print("raw times (s):")
    for name, ts in {**ab, **ld}.items():
        print(f"  {name:<10} " + " ".join(f"{t:.4f}" for t in ts))

    print()
    print("---- README summary ----")
    print(f"Checkpoint: {size / 1e9:.2f} GB bf16, {n_tensors} tensors ({layers}-layer LLaMA shape), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; median of {args.repeats}, page cache warm.")
    print()
    print("| measurement | ckptviz | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    for label, ck, base, target in rows:
        ratio = med[ck] / med[base]
        tgt = f"<= {target:g}x ({verdict(ratio, target)})" if target else "-"
        print(f"| {label[3:]} | {med[ck]:.4f} s | {med[base]:.4f} s | {ratio:.2f}x | {tgt} |")
    print(f"| peak RSS growth, open + tensors() + compare | {rss_mb:.1f} MB | "
          f"{th_rss['growth'] / MB:.1f} MB | - | <= 100 MB "
          f"({'PASS' if rss_mb <= TARGETS['rss_mb'] else 'MISS'}) |")
    print(f"| peak RSS growth, compare + load (info) | {load_mb:.1f} MB | "
          f"{rss['torch-load']['growth'] / MB:.1f} MB | - | - |")


if __name__ == "__main__":
    main()
