"""Kernel side of the widgets' table at 100,000 and 500,000 keys: first page, a search keystroke,
a sort, folding and expanding a group, through the real Pager and sources (no browser).

Baseline, measured in the same run: building the Report's DataFrame itself (``compare``), which any
table must at least have. Targets (ratios, so they hold on any machine): the first page of a folded
or flat view and a search each cost at most 0.5x of that compare; printed with absolute seconds.

    python benchmarks/bench_table.py [--keys 100000 500000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc

import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv
from ckptviz.widgets.pager import GROUP, Pager
from ckptviz.widgets.table import CheckpointSource, ReportSource


def moe_state(keys: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A meta-device MoE-shaped model with about ``keys`` tensors and a state dict of tiny tensors
    with one shape mismatch per 1,000 keys (values are never read by the table)."""
    experts = max(1, keys // (3 * 60))
    model = nn.Module()
    model.layers = nn.ModuleList()
    with torch.device("meta"):
        for _ in range(60):
            layer = nn.Module()
            layer.experts = nn.ModuleList()
            for _ in range(experts):
                e = nn.Module()
                for w in ("gate", "up", "down"):
                    e.register_parameter(w, nn.Parameter(torch.empty(2, 2)))
                layer.experts.append(e)
            model.layers.append(layer)
    sd = {k: torch.zeros(2, 2) for k, _ in model.named_parameters()}
    for i, k in enumerate(list(sd)):
        if i % 1000 == 7:
            sd[k] = torch.zeros(3, 2)
    return model, sd


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(keys: int) -> tuple[list[tuple[str, float]], dict[str, torch.Tensor]]:
    model, sd = moe_state(keys)
    rows: list[tuple[str, float]] = []
    box: dict = {}
    rows.append(("compare (baseline)", timed(lambda: box.setdefault("rep", cv.compare(model, sd)))))
    rep = box["rep"]
    n = len(rep.frame)
    pager = Pager()
    source = ReportSource(rep, set(), {})
    pager.set_source(source)
    rows.append((f"first page, folded ({n:,} rows)", timed(pager.view)))
    pager.folded = False
    rows.append(("first page, flat", timed(pager.view)))
    pager.search = "layers.3.experts.1"
    rows.append(("search keystroke (text)", timed(pager.view)))
    pager.search = r"experts\.1\d\.down$"
    rows.append(("search keystroke (regex)", timed(pager.view)))
    pager.search = ""
    pager.sort = ("ckpt_shape", False)
    rows.append(("sort by ckpt_shape", timed(pager.view)))
    pager.sort = ("key", True)
    rows.append(("sort by key", timed(pager.view)))
    pager.folded, pager.sort = True, (None, True)
    pager.view()
    group = int(pager.items()[1][0])
    pager.toggle_group(group)
    rows.append(("expand a group", timed(pager.view)))
    rows.append(("select a group", timed(lambda: (pager.click(GROUP, group), pager.view()))))
    pager.page = 3
    rows.append(("next page", timed(pager.view)))
    return rows, sd


def checkpoint_only(path: str) -> list[tuple[str, float]]:
    rows = []
    box: dict = {}
    rows.append(("open_checkpoint (baseline)", timed(lambda: box.setdefault("ck", cv.open_checkpoint(path)))))
    pager = Pager()
    rows.append(("checkpoint source + first page (folded)", timed(
        lambda: (pager.set_source(CheckpointSource(box["ck"], None, {})), pager.view()))))
    pager.search = "experts.7."
    rows.append(("search keystroke", timed(pager.view)))
    pager.sort = ("size", False)
    rows.append(("sort by size", timed(pager.view)))
    return rows


def kernel_memory(rep) -> tuple[int, int]:
    """(the report frame's own size, what the table keeps beyond it): bytes the Pager and its source
    still hold after every view has been drawn once (folded, flat, searched, sorted both ways,
    a group expanded and selected), counted by ``tracemalloc`` (numpy and pandas report to it)."""
    frame_bytes = int(rep.frame.memory_usage(deep=True).sum())
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    pager = Pager()
    pager.set_source(ReportSource(rep, set(), {}))
    pager.view()
    pager.folded = False
    pager.view()
    for sort in (("ckpt_shape", False), ("key", True), ("status", False)):
        pager.sort = sort
        pager.view()
    pager.search = "experts.1"
    pager.view()
    pager.folded, pager.sort, pager.search = True, (None, True), ""
    pager.view()
    group = int(pager.items()[1][0])
    pager.toggle_group(group)
    pager.click(GROUP, group)
    pager.view()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del pager
    return frame_bytes, held


def report(title: str, rows: list[tuple[str, float]]) -> bool:
    """Print ``rows`` as ratios to the first (the baseline); True when a target failed. Targets: the
    folded first page (which folds every key once) <= 1x the baseline, any other first page and a
    search keystroke <= 0.5x."""
    base = rows[0][1]
    print(f"\n== {title} (baseline {rows[0][0]}: {base:.3f} s)")
    failed = False
    for label, s in rows[1:]:
        ratio = s / base
        limit = 1.0 if "folded" in label else 0.5 if label.startswith(("first page", "search", "checkpoint")) else None
        verdict = "" if limit is None else f"<= {limit}x " + ("PASS" if ratio <= limit else "FAIL")
        failed |= verdict.endswith("FAIL")
        print(f"  {label:<34} {s:8.3f} s  {ratio:6.3f}x  {verdict}")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, nargs="+", default=[100_000, 500_000])
    args = ap.parse_args()
    failed = False
    for keys in args.keys:
        rows, sd = run(keys)
        failed |= report(f"{keys:,} keys: report table", rows)
        frame_bytes, held = kernel_memory(cv.compare(*moe_state(keys)))
        ratio = held / frame_bytes
        failed |= ratio > 2
        print(f"  {'kernel memory held by the table':<34} {held / 2**20:8.1f} MiB  {ratio:6.3f}x of the "
              f"report frame ({frame_bytes / 2**20:.1f} MiB)  <= 2x {'PASS' if ratio <= 2 else 'FAIL'}")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "moe.safetensors")
            save_file(sd, path)
            failed |= report(f"{keys:,} keys: checkpoint-only table", checkpoint_only(path))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
