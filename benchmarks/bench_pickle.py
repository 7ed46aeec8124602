#!/usr/bin/env python
"""Benchmark ckptviz's safe unpickler on checkpoints with many tensors against the C unpickler.

    python benchmarks/bench_pickle.py [--tensors 100000] [--repeats 5]

Measures, in one run (interleaved, medians, page cache warm):

  a. torch zip: ``open_checkpoint(path).tensors()``  vs  the baseline below; target <= 2x
  b. legacy torch format: the same                   vs  the legacy baseline; target <= 2x
  c. for reference: ``torch.load(path, mmap=True, weights_only=True)`` + listing shapes (zip), and
     ``torch.load(path, weights_only=True)`` (legacy, which cannot be mapped)
  d. where ckptviz's time goes on the zip file (each component's share)

Baseline (zip): ``zipfile.ZipFile(path)``, ``zf.read("<archive>/data.pkl")`` (as ckptviz reads it), then
the C ``pickle.Unpickler`` on those bytes through the same peek-able in-memory file ckptviz uses,
with ``find_class`` returning minimal record constructors (one ``__slots__`` class) and
``persistent_load`` returning the persistent id tuple, the garbage collector in its default state.
Baseline (legacy): ``open(path)`` and the same unpickler, one ``load()`` per pickle of the file.
ckptviz pauses the garbage collector while it builds its records; the rows marked "GC paused" run
the baselines that way too (info only).

The checkpoints are written once with ``torch.save`` and cached outside the repository, in
``$CKPTVIZ_BENCH_DIR`` (default ``~/.cache/ckptviz-bench``).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import pickle
import platform
import statistics
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptviz

TARGET = 2.0


# ---- the checkpoints -----------------------------------------------------------------------------
def bench_dir() -> Path:
    return Path(os.environ.get("CKPTVIZ_BENCH_DIR") or Path.home() / ".cache" / "ckptviz-bench").expanduser()


def state_dict(n: int) -> dict[str, torch.Tensor]:
    """``n`` small tensors named like a transformer's: weights, biases (bf16 and float32), int64 counters."""
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i in range(n):
        block, kind = divmod(i, 4)
        prefix = f"model.layers.{block // 8}.experts.{block % 8}"
        if kind == 0:
            sd[f"{prefix}.w1.weight"] = torch.randn(8, 8, generator=gen)
        elif kind == 1:
            sd[f"{prefix}.w1.bias"] = torch.randn(8, generator=gen)
        elif kind == 2:
            sd[f"{prefix}.w2.weight"] = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
        else:
            sd[f"{prefix}.steps"] = torch.tensor(i)
    return sd


def build(n: int) -> tuple[Path, Path]:
    """Write (once) the zip and the legacy checkpoint of ``state_dict(n)``."""
    paths = (bench_dir() / f"many-{n}-zip.pt", bench_dir() / f"many-{n}-legacy.pt")
    if all(p.is_file() for p in paths):
        return paths
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    sd = state_dict(n)
    for path, zipped in zip(paths, (True, False)):
        print(f"building {path} ({n} tensors) ...", flush=True)
        t0 = time.perf_counter()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(sd, tmp, _use_new_zipfile_serialization=zipped)
        os.replace(tmp, path)
        print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# ---- the baselines -------------------------------------------------------------------------------
class Record:
    """What the baseline builds for every call in the pickle: the global's name and the arguments."""

    __slots__ = ("name", "args")

    def __init__(self, name: str, args: tuple):
        self.name, self.args = name, args


class RecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Callable[..., Record]:
        full = f"{module}.{name}"
        return lambda *args: Record(full, args)

    def persistent_load(self, pid: Any) -> Any:
        return pid


def in_memory(data: bytes) -> io.BufferedReader:
    """A file over ``data`` that hands the unpickler all of it at the first peek (as ckptviz does)."""
    return io.BufferedReader(io.BytesIO(data), buffer_size=len(data) + 1)


def baseline_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))
        data = zf.read(name)
    return RecordUnpickler(in_memory(data)).load()


def baseline_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        return [RecordUnpickler(f).load() for _ in range(5)]  # magic, protocol, sys info, the object, keys


def paused(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
    def run(path: Path) -> Any:
        gc.disable()
        try:
            return fn(path)
        finally:
            gc.enable()

    return run


def ckptviz_open(path: Path) -> Any:
    ck = ckptviz.open_checkpoint(path)
    return ck, ck.tensors()


def torch_load(path: Path, mmap: bool) -> Any:
    sd = torch.load(path, mmap=mmap, weights_only=True)
    return sd, [(k, tuple(v.shape)) for k, v in sd.items()]


# ---- timing --------------------------------------------------------------------------------------
def run_timed(fn: Callable[[], Any]) -> float:
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


def components(path: Path, repeats: int) -> dict[str, float]:
    """Median seconds per component of ``open_checkpoint(path).tensors()`` (wrapped function timers)."""
    from ckptviz import checkpoint
    from ckptviz.readers import pickle_reader, raw, records, torch_zip

    targets = [
        ("zip central directory", torch_zip.ZipDirectory, "__init__"),
        ("data.pkl read + CRC", torch_zip.ZipDirectory, "read"),
        ("opcode scan", pickle_reader, "scan"),
        ("C unpickler + record builders", pickle_reader, "load_checked"),
        ("local headers (_data_offsets)", torch_zip, "_data_offsets"),
        ("damaged_storages", raw.RawCheckpoint, "damaged_storages"),
        ("find_sections", checkpoint, "find_sections"),
        ("metadata", checkpoint, "metadata"),
        ("TensorTable.from_refs", records.TensorTable, "from_refs"),
        ("check_extents", checkpoint, "check_extents"),
        ("tensors() frame", records.TensorTable, "frame"),
    ]
    spent: dict[str, float] = {}
    originals = []

    def timer(label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

        return timed

    for label, owner, name in targets:
        original = owner.__dict__[name]
        originals.append((owner, name, original))
        fn = original.__func__ if isinstance(original, classmethod) else original
        wrapped = timer(label, fn)
        setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)
    runs = []
    try:
        for _ in range(repeats):
            spent.clear()
            spent["TOTAL"] = run_timed(lambda: ckptviz_open(path))
            runs.append(dict(spent))
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    labels = [label for label, _, _ in targets]
    out = {label: statistics.median(r.get(label, 0.0) for r in runs) for label in labels}
    out["TOTAL"] = statistics.median(r["TOTAL"] for r in runs)
    out["other (glue, Checkpoint, checks)"] = max(0.0, out["TOTAL"] - sum(out[label] for label in labels))
    return out


# ---- report --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=100_000, help="tensors in the checkpoints (default 100000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    args = parser.parse_args()

    zip_path, legacy_path = build(args.tensors)
    for path in (zip_path, legacy_path):
        path.read_bytes()  # warm the page cache
    print(f"checkpoints: {zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB), {legacy_path} "
          f"({legacy_path.stat().st_size / 1e6:.1f} MB), {args.tensors} tensors each")
    print(f"python {platform.python_version()}, torch {torch.__version__}, ckptviz {ckptviz.__version__}, "
          f"{os.cpu_count()} CPUs, repeats={args.repeats}")

    ck = ckptviz.open_checkpoint(zip_path)  # both really read every tensor
    assert len(ck.tensors()) == args.tensors and len(ckptviz.open_checkpoint(legacy_path).tensors()) == args.tensors
    assert len(baseline_zip(zip_path)) == args.tensors and len(baseline_legacy(legacy_path)[3]) == args.tensors
    del ck

    cases = {
        "ckv_zip": lambda: ckptviz_open(zip_path),
        "base_zip": lambda: baseline_zip(zip_path),
        "base_zip_paused": lambda: paused(baseline_zip)(zip_path),
        "torch_zip": lambda: torch_load(zip_path, mmap=True),
        "ckv_legacy": lambda: ckptviz_open(legacy_path),
        "base_legacy": lambda: baseline_legacy(legacy_path),
        "base_legacy_paused": lambda: paused(baseline_legacy)(legacy_path),
        "torch_legacy": lambda: torch_load(legacy_path, mmap=False),
    }
    print("a-c: timing ...", flush=True)
    times = interleaved(cases, args.repeats)
    print("d: components ...", flush=True)
    parts = components(zip_path, args.repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    rows = [  # label, ckptviz key, baseline key, target
        ("a. zip: open_checkpoint + tensors()", "ckv_zip", "base_zip", TARGET),
        ("   vs the baseline, GC paused (info)", "ckv_zip", "base_zip_paused", None),
        ("   torch.load(mmap=True) + shapes (info)", "ckv_zip", "torch_zip", None),
        ("b. legacy: open_checkpoint + tensors()", "ckv_legacy", "base_legacy", TARGET),
        ("   vs the baseline, GC paused (info)", "ckv_legacy", "base_legacy_paused", None),
        ("   torch.load + shapes (info)", "ckv_legacy", "torch_legacy", None),
    ]
    print()
    print(f"{'measurement':<42} {'ckptviz s':>10} {'baseline s':>10} {'ratio':>7} {'target':>8}  result")
    for label, ck_key, base_key, target in rows:
        ratio = med[ck_key] / med[base_key]
        verdict = ("PASS" if ratio <= target else "MISS") if target else "info"
        tgt = f"<= {target:g}x" if target else "-"
        print(f"{label:<42} {med[ck_key]:>10.3f} {med[base_key]:>10.3f} {ratio:>6.2f}x {tgt:>8}  {verdict}")
    print()
    print(f"d. where open_checkpoint(zip).tensors() spends its {parts['TOTAL']:.3f} s (median of {args.repeats}):")
    for label, seconds in parts.items():
        if label != "TOTAL":
            print(f"   {label:<36} {seconds:>8.3f} s  {100 * seconds / parts['TOTAL']:5.1f} %")
    print()
    print("raw times (s):")
    for name, ts in times.items():
        print(f"  {name:<20} " + " ".join(f"{t:.3f}" for t in ts))


if __name__ == "__main__":
    main()
