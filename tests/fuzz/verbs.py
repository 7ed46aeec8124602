# ruff: noqa: B023  (every lambda below is called at once, inside its loop iteration)
"""What a fuzz child does with one file: every ckptviz verb, then the format's reference reader. Events go
to ``emit`` as dicts, so the parent knows the last verb started if the child dies."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

import ckptviz
from ckptviz.errors import CheckpointError

from . import seeds

MAX_COMPARE_NUMEL = 10_000_000


class _Case:
    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit
        self.outcomes: list[dict] = []

    def run(self, verb: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run one verb; True with its value, or False after recording why it failed."""
        self.emit({"ev": "verb", "verb": verb})
        try:
            return True, fn()
        except CheckpointError as e:
            self.outcomes.append({"verb": verb, "cls": "checkpoint_error", "type": type(e).__name__,
                                  "msg": str(e)[:300]})
        except MemoryError as e:
            self.outcomes.append({"verb": verb, "cls": "memory", "type": type(e).__name__, "msg": str(e)[:300]})
        except BaseException as e:  # noqa: BLE001 - anything else is the defect being looked for
            msg = str(e)
            cls = "memory" if ("can't allocate memory" in msg or "bad_alloc" in msg) else "raw_exception"
            self.outcomes.append({"verb": verb, "cls": cls, "type": type(e).__name__, "msg": msg[:300],
                                  "tb": "".join(traceback.format_exception(e)[-4:])[-1500:]})
        return False, None

    def defect(self, verb: str, cls: str, msg: str) -> None:
        self.outcomes.append({"verb": verb, "cls": cls, "type": "", "msg": msg[:500]})


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() > MAX_COMPARE_NUMEL:
        return True
    try:
        return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                b.contiguous().reshape(-1).view(torch.uint8)))
    except RuntimeError:
        return bool(torch.equal(a, b))


def _flat(obj: Any, prefix: str = "", out: dict | None = None, depth: int = 0) -> dict[str, torch.Tensor]:
    out = {} if out is None else out
    if depth > 20:
        return out
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flat(v, f"{prefix}.{i}" if prefix else str(i), out, depth + 1)
    return out


def reference_read(path: str, ref: str) -> dict[str, torch.Tensor]:
    """Every tensor as the format's own reader gives it (raises where that reader rejects the file)."""
    if ref == "torch":
        return _flat(torch.load(path, weights_only=True, map_location="cpu"))
    if ref == "safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if ref == "jit":
        return dict(torch.jit.load(path, map_location="cpu").state_dict())
    if ref in ("hub_st", "hub_bin"):
        out: dict[str, torch.Tensor] = {}
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith(".safetensors"):
                out.update(reference_read(full, "safetensors"))
            elif name.endswith(".bin"):
                out.update(reference_read(full, "torch"))
        return out
    raise ValueError(ref)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(_bytes_equal(a[k], b[k]) for k in a)


def exercise(path: str, seed_path: str | None, ref: str | None, emit: Callable[[dict], None],
             full_trust: bool = True) -> list[dict]:
    """Every verb on ``path`` with trust False and True (without ``full_trust``, only open and state_dict
    with trust=True, to keep the CI run short); then, if ckptviz read every tensor, the reference
    reader (its refusal, or different values, is a defect). Returns the outcome records."""
    c = _Case(emit)
    accepted = None
    for trust in (False, True):
        t = "T" if trust else "F"
        ok, ck = c.run(f"open[{t}]", lambda trust=trust: ckptviz.open_checkpoint(path, trust=trust))
        if not ok:
            continue
        c.run(f"repr[{t}]", lambda: (repr(ck), ck._repr_html_()))
        sections = ck.sections
        values: dict[str, dict] = {}
        read_all = bool(sections)
        for s in sections:
            c.run(f"tensors[{t}]", lambda s=s: ck.tensors(s))
            ok, sd = c.run(f"state_dict[{t}]", lambda s=s: ck.state_dict(s, copy=True))
            if ok:
                values[s] = sd
            else:
                read_all = False
        if trust and not full_trust:
            continue
        c.run(f"stats[{t}]", lambda: ck.stats())
        if sections:
            _, keys = c.run(f"keys[{t}]", lambda: list(ck.tensors().index))
            for k in (keys or [])[:3]:
                c.run(f"histogram[{t}]", lambda k=k: ck.histogram(k))
        c.run(f"materialize_meta[{t}]", lambda: ck.materialize(ck.metadata))
        for s in ck.optimizer_sections:
            c.run(f"materialize_optim[{t}]", lambda s=s: ck.materialize(ck.optimizer_state(s)))
        if not trust:
            accepted = values if read_all else None
            if seed_path is not None:
                c.run("diff", lambda: ckptviz.diff(path, seed_path).frame)
            model = seeds.model(5)
            before = _state(model)
            ok, report = c.run("compare", lambda: ckptviz.compare(model, ck))
            c.run("compare_stats", lambda: ckptviz.compare(model, ck, stats=True))
            if ok:
                ok2, res = c.run("load_partial", lambda: ckptviz.load_partial(model, report))
                if not ok2 and not _same_state(before, _state(model)):
                    c.defect("load_partial", "model_changed", "a failed load_partial changed the model")
                if ok2:
                    c.run("undo", res.undo)
                    if not _same_state(before, _state(model)):
                        c.defect("undo", "model_changed", "undo did not restore the model")
            if ck.optimizer_sections:
                m = seeds.model(6)
                opt = torch.optim.Adam(m.parameters(), lr=1e-3)
                c.run("load_optimizer", lambda: ckptviz.load_optimizer(opt, ck))
    if accepted is not None and ref is not None:
        ok, theirs = c.run("reference", lambda: reference_read(path, ref))
        if not ok:
            why = c.outcomes.pop()
            c.defect("reference", "accepted_but_reference_rejects",
                     f"ckptviz read every tensor; the reference ({ref}) says {why['type']}: {why['msg']}")
        else:
            for s, sd in accepted.items():
                for k, v in sd.items():
                    full = f"{s}.{k}" if s else k
                    if full in theirs and not _bytes_equal(v, theirs[full]):
                        c.defect("values", "value_mismatch",
                                 f"{full}: ckptviz {v.dtype}{tuple(v.shape)} differs from the reference "
                                 f"{theirs[full].dtype}{tuple(theirs[full].shape)}")
                        break
    return c.outcomes
