#!/usr/bin/env python
"""Benchmark ``ckptviz.compare()`` at 100,000 keys: a meta-device MoE-shaped model against a safetensors file.

    python benchmarks/bench_compare.py [--keys 100000] [--repeats 5]

Three cases, each ``compare(meta_model, open_checkpoint(path))`` with the file opened beforehand:

  a. exact     the checkpoint's keys are the model's keys
  b. prefix    every checkpoint key carries a ``module.`` prefix (the rename is inferred)
  c. partial   10% of the experts are renamed (missing + unexpected), 1% of tensors have another
               shape and 1% another dtype

and, for information, d. a ``torch.save`` file with two weights sections (``model`` prefixed, ``ema``
exact): ``compare(section=None)`` aligns both and frames the better one.

Baseline: what a hand-written check does with plain torch: the model's ``state_dict()``, the key set
differences and a shape/dtype comparison of the common keys, with the same file's tensors listed by
``ckptviz`` (no renames, no frame). The target is absolute: compare() under 0.5 s. Info rows show where
the time goes: ``model_tensors(model)`` (the model's state dict) and ``Checkpoint.tensors()``, and the
Report accessors at this size. The files are written once and cached outside the repository, in
``$CKPTVIZ_BENCH_DIR`` (default ``~/.cache/ckptviz-bench``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz.compare import model_tensors

TARGET_S = 0.5
HIDDEN = 8
DTYPE = torch.bfloat16
CASES = ("exact", "prefix", "partial")


# ---- the model -----------------------------------------------------------------------------------
class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False, dtype=DTYPE)
        self.w2 = nn.Linear(2 * HIDDEN, HIDDEN, bias=False, dtype=DTYPE)
        self.w3 = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False, dtype=DTYPE)


class MoE(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, experts, bias=False, dtype=DTYPE)
        self.experts = nn.ModuleList(Expert() for _ in range(experts))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=DTYPE))


class Layer(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = MoE(experts)
        self.input_layernorm = nn.RMSNorm(HIDDEN, dtype=DTYPE)
        self.post_attention_layernorm = nn.RMSNorm(HIDDEN, dtype=DTYPE)


class Backbone(nn.Module):
    def __init__(self, layers: int, experts: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(64, HIDDEN, dtype=DTYPE)
        self.layers = nn.ModuleList(Layer(experts) for _ in range(layers))
        self.norm = nn.RMSNorm(HIDDEN, dtype=DTYPE)


class MoEShaped(nn.Module):
    """Key names of a mixture-of-experts causal LM (``model.layers.{i}.mlp.experts.{j}.w1.weight``)."""

    def __init__(self, layers: int, experts: int):
        super().__init__()
        self.model = Backbone(layers, experts)
        self.lm_head = nn.Linear(HIDDEN, 64, bias=False, dtype=DTYPE)


def shape_for(keys: int) -> tuple[int, int]:
    """(layers, experts per layer) giving about ``keys`` state-dict keys (64 layers when large enough)."""
    layers = 64 if keys >= 64 * 40 else 4
    per_layer = (keys - 3) // layers
    return layers, max(1, (per_layer - 7) // 3)


def meta_model(layers: int, experts: int) -> MoEShaped:
    with torch.device("meta"):
        return MoEShaped(layers, experts)


# ---- the checkpoints -----------------------------------------------------------------------------
def bench_dir() -> Path:
    return Path(os.environ.get("CKPTVIZ_BENCH_DIR") or Path.home() / ".cache" / "ckptviz-bench").expanduser()


def case_state(case: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The checkpoint of one case: small CPU tensors (zeros) under the case's key names."""
    out = {}
    for n, (key, shape) in enumerate(shapes.items()):
        dtype = DTYPE
        if case == "prefix":
            key = "module." + key
        elif case == "partial":
            if ".experts." in key and n % 10 == 0:
                key = key.replace(".experts.", ".experts_old.")
            elif n % 100 == 1:
                shape = (*shape[:-1], shape[-1] + 1)
            elif n % 100 == 2:
                dtype = torch.float16
        out[key] = torch.zeros(shape, dtype=dtype)
    return out


def build_two_sections(layers: int, experts: int, shapes: dict[str, tuple[int, ...]]) -> Path:
    path = bench_dir() / f"compare-moe-l{layers}-e{experts}-h{HIDDEN}-two-sections.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": case_state("prefix", shapes), "ema": case_state("exact", shapes), "step": 1}, tmp)
        os.replace(tmp, path)
    return path


def build_checkpoint(case: str, layers: int, experts: int, shapes: dict[str, tuple[int, ...]]) -> Path:
    path = bench_dir() / f"compare-moe-l{layers}-e{experts}-h{HIDDEN}-{case}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(case_state(case, shapes), str(tmp))
        os.replace(tmp, path)
    return path


# ---- timing --------------------------------------------------------------------------------------
def timed(fn: Callable[[Any], Any], repeats: int, setup: Callable[[], Any] = lambda: None) -> tuple[float, float]:
    """Median (wall, CPU) seconds per call of ``fn(setup())``, after one untimed warm-up call. CPU time is
    this process's own: on a shared machine, wall time also counts waiting for a core."""
    fn(setup())
    wall, cpu = [], []
    for _ in range(repeats):
        arg = setup()
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(arg)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del out
    return statistics.median(wall), statistics.median(cpu)


def baseline(model: nn.Module, ck: ckptviz.Checkpoint) -> tuple:
    """Plain torch: the model's state dict, key set differences, shape/dtype check of the common keys."""
    sd = model.state_dict()
    listed = ck.tensors()
    saved = dict(zip(listed.index, zip(listed["shape"], listed["dtype"])))
    missing, unexpected = sd.keys() - saved.keys(), saved.keys() - sd.keys()
    differ = [k for k in sd.keys() & saved.keys()
              if (tuple(sd[k].shape), str(sd[k].dtype).removeprefix("torch.")) != saved[k]]
    return missing, unexpected, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="approximate state-dict keys (default 100000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    args = parser.parse_args()

    layers, experts = shape_for(args.keys)
    t0 = time.perf_counter()
    model = meta_model(layers, experts)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    print(f"meta model: {len(shapes)} keys ({layers} layers x {experts} experts), built in "
          f"{time.perf_counter() - t0:.1f} s")
    paths = {case: build_checkpoint(case, layers, experts, shapes) for case in CASES}
    paths["two sections"] = build_two_sections(layers, experts, shapes)
    print(f"python {platform.python_version()}, torch {torch.__version__}, ckptviz {ckptviz.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, repeats={args.repeats}")

    med: dict[str, tuple[float, float]] = {}
    reports = {}
    for case in CASES:
        opened = lambda path=paths[case]: ckptviz.open_checkpoint(path)  # noqa: E731
        med[case] = timed(lambda ck: ckptviz.compare(model, ck), args.repeats, opened)
        med[f"base_{case}"] = timed(lambda ck: baseline(model, ck), args.repeats, opened)
        reports[case] = ckptviz.compare(model, opened())
        print(f"  {case}: {reports[case].summary}, rules {reports[case].rules}", flush=True)
    two = lambda: ckptviz.open_checkpoint(paths["two sections"])  # noqa: E731
    med["two sections"] = timed(lambda ck: ckptviz.compare(model, ck), args.repeats, two)
    reports["two sections"] = ckptviz.compare(model, two())
    print(f"  two sections: section {reports['two sections'].section!r}, {reports['two sections'].summary}")
    med["model_tensors"] = timed(lambda _: model_tensors(model), args.repeats)
    med["state_dict"] = timed(lambda _: model.state_dict(keep_vars=True), args.repeats)
    med["tensors"] = timed(lambda ck: ck.tensors(), args.repeats, lambda: ckptviz.open_checkpoint(paths["exact"]))
    rep = reports["partial"]
    med["accessors"] = timed(lambda _: (rep.loadable, rep.device_moves(), rep.problems(), rep.summary), args.repeats)

    print()
    print(f"{'measurement':<46} {'ckptviz s':>10} {'baseline s':>10} {'ratio':>7} {'target':>8}  result"
          f"   (CPU s: ckptviz / baseline)")
    rows = [(label, case, f"base_{case}", True) for case, label in zip(CASES, (
        "a. compare, keys match exactly", "b. compare, 'module.' prefix (inferred)",
        "c. compare, 10% renamed, shapes/dtypes differ"))]
    rows += [("d. compare, two sections (torch.save) [info]", "two sections", None, False),
             ("   model_tensors(model) [info]", "model_tensors", "state_dict", False),
             ("   Checkpoint.tensors() [info]", "tensors", None, False),
             ("   loadable, device_moves, problems (c) [info]", "accessors", None, False)]
    table = []
    for label, key, base, target in rows:
        (wall, cpu), (bwall, bcpu) = med[key], med[base] if base else (float("nan"),) * 2
        ratio = f"{wall / bwall:.2f}x" if base else "-"
        verdict = ("PASS" if wall < TARGET_S else "MISS") if target else "info"
        table.append((label, wall, bwall, ratio, "< 0.5 s" if target else "-", verdict, cpu, bcpu))
        print(f"{label:<46} {wall:>10.4f} {bwall:>10.4f} {ratio:>7} {table[-1][4]:>8}  {verdict:<6}"
              f"   ({cpu:.4f} / {bcpu:.4f})")
    print()
    print("baseline: a-c = model.state_dict() + key set differences + shape/dtype check of the common keys "
          "(ck.tensors() listing); model_tensors = model.state_dict(keep_vars=True)")
    print(f"medians of {args.repeats}; each compare gets a freshly opened Checkpoint (opening is not timed); "
          f"load average now {os.getloadavg()[0]:.1f}")
    print()
    print("---- README summary ----")
    print(f"Model: {len(shapes)} keys on the meta device ({layers} layers x {experts} experts); checkpoints: "
          f"safetensors files; {os.cpu_count()} CPUs, torch {torch.__version__}; median of {args.repeats}.")
    print()
    print("| measurement | ckptviz | baseline | ratio | target | CPU time |")
    print("|---|---|---|---|---|---|")
    for label, wall, bwall, ratio, target, verdict, cpu, _ in table:
        base = f"{bwall:.3f} s" if bwall == bwall else "-"
        print(f"| {label.strip().removesuffix(' [info]')} | {wall:.3f} s | {base} | {ratio} | "
              f"{target + f' ({verdict})' if target != '-' else '-'} | {cpu:.3f} s |")


if __name__ == "__main__":
    main()
