"""``load_partial()``: copy a Report's loadable rows into the live model, in place and atomically,
with an undo; and ``load_optimizer()``: restore optimizer state after checking that it fits."""

from __future__ import annotations

import html
import weakref
from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import as_checkpoint
from .compare import Report, model_tensors
from .errors import LoadError, OptimizerMismatchError
from .provenance import remember_initial

PROGRESS_BYTES = 512 * 2**20  # show a progress bar when loading more than this


class LoadResult:
    """What :func:`load_partial` did: keys loaded, skipped (with reasons), missing, unexpected."""

    def __init__(self, model: nn.Module, report: Report, loaded: list[str], skipped: dict[str, str],
                 backup: dict[str, torch.Tensor] | None):
        self._model = weakref.ref(model)
        self._backup = backup
        self.report = report
        self.loaded = loaded
        self.skipped = skipped
        frame = report.frame
        self.missing_keys: list[str] = frame.loc[frame["status"] == "missing", "key"].tolist()
        self.unexpected_keys: list[str] = frame.loc[frame["status"] == "unexpected", "ckpt_key"].tolist()
        self.undone = False

    @property
    def frame(self) -> pd.DataFrame:
        """One row per key of the report: outcome (loaded, skipped, missing, unexpected, not_selected) and why."""
        loaded = set(self.loaded)
        rows = []
        for r in self.report.frame.itertuples(index=False):
            if r.key in loaded:
                rows.append((r.key, r.ckpt_key, "loaded", r.rule))
            elif r.key in self.skipped:
                rows.append((r.key, r.ckpt_key, "skipped", self.skipped[r.key]))
            elif r.status in ("missing", "unexpected"):
                rows.append((r.key, r.ckpt_key, r.status, None))
            else:
                rows.append((r.key, r.ckpt_key, "not_selected", None))
        return pd.DataFrame(rows, columns=["key", "ckpt_key", "outcome", "detail"])

    def undo(self) -> None:
        """Put back exactly the values that this load overwrote."""
        if self.undone:
            raise LoadError("this load was already undone")
        if self._backup is None:
            raise LoadError("this load kept no copy of what it overwrote (it ran with undo=False); "
                            "load with load_partial(model, report) to be able to undo")
        model = self._model()
        if model is None:
            raise LoadError("the model this load went into no longer exists")
        live = model_tensors(model)
        changed = [k for k, b in self._backup.items() if k not in live or live[k].shape != b.shape]
        if changed:
            raise LoadError(f"cannot undo: the model changed since the load (keys {changed[:5]}); nothing was restored")
        _restore(live, self._backup)
        self.undone = True
        self._backup = {}

    def __repr__(self) -> str:
        return (f"LoadResult(loaded={len(self.loaded)}, skipped={len(self.skipped)}, "
                f"missing={len(self.missing_keys)}, unexpected={len(self.unexpected_keys)}"
                f"{', undone' if self.undone else ''})")

    def _repr_html_(self) -> str:
        colours = {"loaded": "#e3f4e6", "skipped": "#fbd9d7", "missing": "#ffe3cc", "unexpected": "#e2e6f7",
                   "not_selected": "#f2f2f2"}
        frame = self.frame
        frame = frame[frame["outcome"] != "loaded"] if len(frame) > 200 else frame
        styled = (frame.style.apply(lambda r: [f"background-color: {colours[r['outcome']]}"] * len(r), axis=1)
                  .format(na_rep="—").hide(axis="index"))
        head = html.escape(repr(self))
        return f"<div class='ckptviz-loadresult'><p><b>{head}</b></p>{styled.to_html()}</div>"


def _restore(live: dict[str, torch.Tensor], backup: dict[str, torch.Tensor], keys: list[str] | None = None) -> None:
    """Copy backups back; with ``keys`` (a failed load), only into tensors that were written to."""
    if keys is None:
        keys = list(backup)
    by_tensor = {id(live[k]): b for k, b in backup.items()}
    with torch.no_grad():
        for i, k in enumerate(keys):
            try:
                live[k].copy_(by_tensor[id(live[k])])
            except RuntimeError:
                if i != len(keys) - 1:  # the tensor whose copy failed may refuse writes altogether
                    raise


def _plan(report: Report, live: dict[str, torch.Tensor], keys: Iterable[str] | None):
    rows = {r.key: r for r in report.frame.itertuples(index=False) if isinstance(r.key, str)}
    if rows.keys() != live.keys():
        extra = sorted(live.keys() ^ rows.keys())[:5]
        raise LoadError(f"the report was made for a different model (keys differ, e.g. {extra}); "
                        "run ckptviz.compare(model, checkpoint) on this model first")
    if keys is None:
        selected = [k for k, r in rows.items() if r.status in ("match", "dtype_mismatch", "shape_mismatch")]
    else:
        selected = list(dict.fromkeys(keys))
        unknown = [k for k in selected if k not in rows]
        if unknown:
            raise LoadError(f"keys not in the model: {unknown[:10]}; pass model keys (the report's 'key' column)")
    plan, skipped = {}, {}
    for k in selected:
        r = rows[k]
        if r.status == "missing":
            skipped[k] = "not in the checkpoint"
        elif r.status == "shape_mismatch":
            skipped[k] = f"shape {tuple(r.ckpt_shape)} in the checkpoint, {tuple(r.model_shape)} in the model"
        else:
            plan[k] = r.ckpt_key
    return plan, skipped


def load_partial(model: nn.Module, report: Report, *, keys: Iterable[str] | None = None,
                 undo: bool = True) -> LoadResult:
    """Copy checkpoint tensors into ``model`` in place (``strict=False`` semantics, shape-safe).

    Loads every ``match`` and ``dtype_mismatch`` row of ``report`` (or exactly ``keys``), casting to
    each model tensor's dtype and device. Everything is checked before the first copy. Each tensor is
    copied aside just before it is overwritten, so a copy that still fails restores the model bit
    for bit and ``LoadResult.undo()`` works. ``undo=False`` keeps no such copy (for models too big to
    hold twice, and as fast as ``load_state_dict``): a failure then names the tensors already written.
    """
    live = model_tensors(model)
    plan, skipped = _plan(report, live, keys)
    sources: dict[str, torch.Tensor] = {}
    for k, c in plan.items():
        src, dst = report.checkpoint.tensor(c, report.section), live[k]
        reason = _cannot_copy(src, dst)
        if reason:
            skipped[k] = reason
        else:
            sources[k] = src
    remember_initial(model, live, (k for k in live if k not in sources))
    backup: dict[str, torch.Tensor] | None = {} if undo else None
    seen: set[int] = set()
    total = sum(t.numel() * t.element_size() for t in sources.values())
    written: list[str] = []
    try:
        with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="loading",
                                   disable=total < PROGRESS_BYTES) as bar:
            for key, src in sources.items():
                dst = live[key]
                if backup is not None and id(dst) not in seen:  # tied weights are backed up once
                    seen.add(id(dst))
                    backup[key] = dst.detach().clone()
                written.append(key)
                dst.copy_(src)
                bar.update(src.numel() * src.element_size())
    except Exception as e:
        what = f"copying {written[-1]!r} into the model failed ({type(e).__name__}: {e})" if written else (
            f"loading failed before the first copy ({type(e).__name__}: {e})")
        if backup is None:
            raise LoadError(
                f"{what}. {len(written) - 1} tensor(s) before it were loaded ({written[:-1][:5]}); "
                "load with undo=True (the default) for an all-or-nothing load."
            ) from e
        _restore(live, backup, written)
        raise LoadError(f"{what}. The model was restored to exactly its previous values; nothing was loaded.") from e
    return LoadResult(model, report, list(sources), skipped, backup)


def _cannot_copy(src: torch.Tensor, dst: torch.Tensor) -> str | None:
    """Why ``src`` cannot be copied into ``dst`` in place, or None."""
    if src.shape != dst.shape:
        return f"shape {tuple(src.shape)} in the checkpoint, {tuple(dst.shape)} in the model"
    if src.is_complex() and not dst.is_complex():
        return f"complex {src.dtype} into real {dst.dtype} would drop the imaginary part"
    if dst.numel() > 1 and torch._debug_has_internal_overlap(dst) == 1:
        return "the model tensor has overlapping memory (e.g. an expand()ed buffer) and cannot be written in place"
    return None


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
