"""``load_optimizer()``: restore optimizer state from a checkpoint after checking that it fits."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import as_checkpoint
from .errors import OptimizerMismatchError


def load_optimizer(optimizer: torch.optim.Optimizer, source: Any, *, section: str | None = None) -> dict[str, int]:
    """Restore ``optimizer``'s state from a checkpoint, after checking its parameter groups fit.

    Optimizer state is matched by position, not by name: the optimizer must be built over the same
    parameters, in the same groups and order, as the one that was saved.
    """
    ck = as_checkpoint(source)
    saved = ck.materialize(ck.optimizer_state(section))
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise OptimizerMismatchError(f"{ck.path}: the optimizer state has no usable 'param_groups'")
    where = f"{ck.path} [{section if section is not None else ck.optimizer_sections[0]}]"
    saved_sizes = [len(g["params"]) for g in groups]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise OptimizerMismatchError(
            f"{where}: saved parameter groups have {saved_sizes} parameters, this optimizer's have {sizes}. "
            "Optimizer state is matched by position, not by name: build the optimizer over the same "
            "parameters, in the same groups and order, as when it was saved."
        )
    for i, (g, now) in enumerate(zip(groups, optimizer.param_groups)):
        lacking = sorted(set(g) - set(now) - {"params"})
        if lacking:
            raise OptimizerMismatchError(
                f"{where}: group {i} was saved with hyper-parameters {lacking} that this "
                f"{type(optimizer).__name__} lacks; was it saved by another optimizer class?"
            )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip((pid for g in groups for pid in g["params"]), params))
    bad = [
        f"param {pid} {name}: saved {tuple(v.shape)}, parameter {tuple(by_id[pid].shape)}"
        for pid, state in saved.get("state", {}).items() if pid in by_id and isinstance(state, dict)
        for name, v in state.items()
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != by_id[pid].shape
    ]
    if bad:
        raise OptimizerMismatchError(f"{where}: saved state does not fit the parameters: " + "; ".join(bad[:5]))
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise OptimizerMismatchError(f"{where}: torch refused the optimizer state ({e})") from None
    return {"groups": len(groups), "params": len(params), "params_with_state": len(saved.get("state", {}))}
