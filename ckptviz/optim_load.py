"""``load_optimizer()``: restore optimizer state from a checkpoint after checking that it fits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import walk as walk_limits
from .checkpoint import as_checkpoint
from .errors import OptimizerMismatchError

# The values torch's optimizers keep per parameter: tensors and numbers, or flat lists of them (LBFGS).
_SCALARS = (int, float, bool, complex, str, type(None), torch.Tensor)


def load_optimizer(optimizer: torch.optim.Optimizer, source: Any, *, section: str | None = None) -> dict[str, int]:
    """Restore ``optimizer``'s state from a checkpoint, after checking its parameter groups fit.

    Optimizer state is matched by position, not by name: the optimizer must be built over the same
    parameters, in the same groups and order, as the one that was saved. A malformed state (wrong
    types, parameter ids that are not ints, a state that expands to more than
    ``ckptviz.walk.MAX_EXPANDED_NODES`` values) raises :class:`OptimizerMismatchError`; the optimizer
    is left as it was.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"load_optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    ck = as_checkpoint(source)
    name = section if section is not None else ck.optimizer_sections[0] if ck.optimizer_sections else ""
    where = f"{ck.path} [{name}]"
    saved = ck.materialize(ck.optimizer_state(section))
    groups, state = _checked(saved, where, type(optimizer).__module__.startswith("torch.optim"))
    saved_sizes = [len(g["params"]) for g in groups]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise OptimizerMismatchError(
            f"{where}: saved parameter groups have {saved_sizes} parameters, this optimizer's have {sizes}. "
            "Optimizer state is matched by position, not by name: build the optimizer over the same "
            "parameters, in the same groups and order, as when it was saved."
        )
    for i, (g, now) in enumerate(zip(groups, optimizer.param_groups)):
        lacking = sorted(map(str, set(g) - set(now) - {"params", "param_names"}))
        if lacking:
            raise OptimizerMismatchError(
                f"{where}: group {i} was saved with hyper-parameters {lacking} that this "
                f"{type(optimizer).__name__} lacks; was it saved by another optimizer class?"
            )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip((pid for g in groups for pid in g["params"]), params))
    bad = [  # (LBFGS keeps its state flat over all parameters, under the first one)
        f"param {pid} {name}: saved {tuple(v.shape)}, parameter {tuple(by_id[pid].shape)}"
        for pid, entry in state.items() if pid in by_id and not isinstance(optimizer, torch.optim.LBFGS)
        for name, v in entry.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != by_id[pid].shape
    ]
    if bad:
        raise OptimizerMismatchError(f"{where}: saved state does not fit the parameters: " + "; ".join(bad[:5]))
    old_state, old_groups = optimizer.state, optimizer.param_groups
    old_group_items = [dict(g) for g in old_groups]
    try:
        optimizer.load_state_dict({**saved, "state": state, "param_groups": groups})
    except BaseException as e:
        # torch installs the new state before its optimizer-specific fix-ups run: put the old one back
        for g, items in zip(old_groups, old_group_items):
            g.clear()
            g.update(items)
        optimizer.__dict__.update(state=old_state, param_groups=old_groups)
        if not isinstance(e, Exception):  # KeyboardInterrupt & co: restored, then re-raised
            raise
        raise OptimizerMismatchError(
            f"{where}: torch refused the optimizer state ({type(e).__name__}: {_cut(e)}); the optimizer was left "
            "as it was. Check that the checkpoint was saved by this optimizer class.") from None
    return {"groups": len(groups), "params": len(params), "params_with_state": len(state)}


def _checked(saved: Any, where: str, builtin: bool) -> tuple[list[dict], dict]:
    """(param_groups, state) of a saved optimizer state dict, each checked to be what torch writes
    (``builtin``: per-parameter values as torch's own optimizers keep them)."""
    if not isinstance(saved, Mapping):
        raise OptimizerMismatchError(f"{where}: the optimizer state is a {type(saved).__name__}, not a dict")
    groups = saved.get("param_groups")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise OptimizerMismatchError(
            f"{where}: the optimizer state has no usable 'param_groups' (a list of dicts, each with 'params'); "
            f"found {_kind(groups)}. Save it with torch.save({{'optimizer': optimizer.state_dict()}}, path).")
    groups = [dict(g) for g in groups]
    seen: set[int] = set()
    for i, g in enumerate(groups):
        ids = g["params"]
        if not isinstance(ids, (list, tuple)) or not (all(type(p) is int for p in ids)
                                                      or all(type(p) is str for p in ids)):
            raise OptimizerMismatchError(
                f"{where}: param group {i}'s 'params' must be a list of int parameter ids (what "
                "optimizer.state_dict() writes) or of parameter names (what torch.distributed.checkpoint "
                f"writes); found {_kind(ids)}. The file is damaged or not an optimizer state.")
        if seen.intersection(ids) or len(set(ids)) != len(ids):
            raise OptimizerMismatchError(f"{where}: param group {i} repeats a parameter id; the state is damaged.")
        seen.update(ids)
        g["params"] = list(ids)
    state = saved.get("state", {})
    if not isinstance(state, Mapping):
        raise OptimizerMismatchError(
            f"{where}: the optimizer's 'state' must be a dict of per-parameter dicts; found {_kind(state)}.")
    for pid, entry in state.items():
        if not isinstance(entry, Mapping):
            raise OptimizerMismatchError(
                f"{where}: the state of parameter {_cut(pid)} must be a dict (e.g. step, exp_avg); found "
                f"{_kind(entry)}. The file is damaged or not an optimizer state.")
        for name, v in entry.items() if builtin else ():
            flat = v if isinstance(v, (list, tuple)) else (v,)
            if not all(isinstance(x, _SCALARS) for x in flat):
                raise OptimizerMismatchError(
                    f"{where}: state {_cut(name)} of parameter {_cut(pid)} holds {_kind(v)}; torch's optimizers keep "
                    "tensors and numbers (or flat lists of them) per parameter. The file is damaged or not an "
                    "optimizer state.")
    # torch's load_state_dict walks every value as a tree (shared parts again at each place): bound it first
    walk_limits.expanded_size(groups, where, "the optimizer's param_groups")
    walk_limits.expanded_size(state, where, "the optimizer's state")
    return groups, {pid: dict(entry) for pid, entry in state.items()}


def _kind(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        inner = sorted({type(x).__name__ for x in v[:50]})
        return f"{_a(type(v).__name__)} of {', '.join(inner) or 'nothing'}"
    return _a(type(v).__name__)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _cut(v: Any, limit: int = 120) -> str:
    from .sections import key_text

    text = key_text(v) if not isinstance(v, BaseException) else str(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
