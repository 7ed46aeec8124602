#!/usr/bin/env python
"""Benchmark opening a distributed checkpoint (DCP) folder of 100,000 tensors.

    python benchmarks/bench_dcp.py [--tensors 100000] [--repeats 3]

Measures, in one run:

  a. ``open_checkpoint(folder).tensors()``   vs  torch's ``FileSystemReader(folder).read_metadata()``
     (target: at most 2x; torch unpickles ``.metadata`` with plain ``pickle``, which runs code, ckptviz
     with its no-execution unpickler)
  b. where ckptviz's time goes: the unpickler, checking the storage entries against the files, the
     tensor columns, the sections layout, and the tensors() frame; and plain ``pickle.loads`` of the
     same bytes with the GC paused, the floor a C-speed safe unpickler could approach

The folder is written once with ``torch.distributed.checkpoint.save`` (100,000 4x4 float32 tensors
under "model") and cached outside the repository, in ``$CKPTVIZ_BENCH_DIR`` (default
``~/.cache/ckptviz-bench``).
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import platform
import shutil
import statistics
import time
import warnings
from pathlib import Path

import bench_core as core  # the cache folder and the interleaved timer
import torch

import ckptviz
from ckptviz.readers import dcp as dcp_reader

TARGET = 2.0


def build_folder(n: int) -> Path:
    """Write (once) a DCP folder of ``n`` small tensors with torch's own writer."""
    import torch.distributed.checkpoint as dcp

    folder = core.bench_dir() / f"dcp-{n}-tensors"
    if (folder / ".metadata").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    print(f"building {folder} ({n} tensors) with torch.distributed.checkpoint.save ...", flush=True)
    t0 = time.perf_counter()
    sd = {f"layers.{i // 10}.p{i % 10}.weight": torch.full((4, 4), float(i)) for i in range(n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process"
        dcp.save({"model": sd}, checkpoint_id=str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def baseline(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(folder)).read_metadata()
    return md, [(k, tuple(v.size)) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")]


def ckptviz_open(folder: Path):
    ck = ckptviz.open_checkpoint(folder)
    return ck, ck.tensors()


def phases(folder: Path) -> dict[str, float]:
    """Seconds spent in each stage of opening, run one after the other (GC as in open_checkpoint)."""
    meta = str(folder / ".metadata")
    out: dict[str, float] = {}
    gc.collect()
    t0 = time.perf_counter()
    fields, _ = dcp_reader.load_metadata(meta)
    out["unpickle (ckptviz, GC paused)"] = time.perf_counter() - t0
    with dcp_reader.paused_gc():
        t0 = time.perf_counter()
        folder_ = dcp_reader.DcpFolder.__new__(dcp_reader.DcpFolder)
        folder_.folder, folder_.meta_path = str(folder), meta
        folder_._storage(fields.get("storage_data"))
        out["storage entries + extents (numpy)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        folder_._entries(fields.get("state_dict_metadata"))
        out["tensor columns"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        layout = dcp_reader.Layout(folder_.fqns, folder_.is_tensor, fields.get("planner_data"))
        sections = dcp_reader._sections(folder_, layout)
        out["sections from planner_data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    next(iter(sections.values())).frame()
    out["tensors() frame"] = time.perf_counter() - t0
    del fields, folder_, layout, sections
    data = Path(meta).read_bytes()
    gc.collect()
    with dcp_reader.paused_gc():
        t0 = time.perf_counter()
        obj = pickle.loads(data)
        out["plain pickle.loads, GC paused (reference)"] = time.perf_counter() - t0
    del obj
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=100_000, help="tensors in the folder (default 100000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    args = parser.parse_args()
    folder = build_folder(args.tensors)
    size = (folder / ".metadata").stat().st_size
    print(f"folder: {folder} (.metadata {size / 1e6:.1f} MB, {args.tensors} tensors)")
    print(f"python {platform.python_version()}, torch {torch.__version__}, ckptviz {ckptviz.__version__}, "
          f"{os.cpu_count()} CPUs, repeats={args.repeats}")
    ck, frame = ckptviz_open(folder)
    assert len(frame) == args.tensors and ck.format == "dcp", (len(frame), ck.format)
    del ck, frame
    print("a: open + list ...", flush=True)
    times = core.interleaved({"baseline": lambda: baseline(folder), "open": lambda: ckptviz_open(folder)}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    ratio = med["open"] / med["baseline"]
    print("b: phases ...", flush=True)
    parts = phases(folder)
    print()
    print(f"{'measurement':<52}{'ckptviz':>10}{'torch':>10}{'ratio':>8}{'target':>8}  verdict")
    print(f"{'a. open_checkpoint + tensors() (median s)':<52}{med['open']:>10.2f}{med['baseline']:>10.2f}"
          f"{ratio:>8.2f}{TARGET:>8.1f}  {'PASS' if ratio <= TARGET else 'MISS'}")
    print(f"{'   best of repeats (s)':<52}{best['open']:>10.2f}{best['baseline']:>10.2f}"
          f"{best['open'] / best['baseline']:>8.2f}")
    print("\nb. where the time of one open goes (s):")
    for name, seconds in parts.items():
        print(f"   {name:<49}{seconds:>10.2f}")


if __name__ == "__main__":
    main()
