"""Many-to-one layouts: several checkpoint tensors stacked or concatenated into one model tensor
(per-expert MoE weights ``experts.{i}.w1.weight`` into a stacked ``experts.w1``), and one checkpoint
tensor split into several model tensors (a fused ``qkv`` into ``q``, ``k``, ``v``).

Each is a rule the user states (:func:`combine`, :func:`split`), checked exactly (shapes, counts)
before anything is read or written, and recorded as an adaptation of the model row, so ``load_partial``
loads it atomically with the rest and ``undo()`` restores it. :func:`stack_suggestions` lists the
missing model tensors that a group of unexpected checkpoint tensors would stack into exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .adapt import Adaptation
from .errors import AdaptError
from .fold import fold_keys
from .renames import similarity

if TYPE_CHECKING:
    from .compare import Report

# the columns of stack_suggestions(); inner/inner_dim are set (and ckpt_keys is a list of lists) for a fused layout
STACK_COLUMNS = ["key", "ckpt_keys", "how", "dim", "inner", "inner_dim", "reason"]
# per-expert names of Mixtral-style checkpoints, as the role a fused model tensor's name spells out
ROLE_ALIASES = {"w1": "gate", "w3": "up", "w2": "down", "wq": "q", "wk": "k", "wv": "v"}
MAX_FUSED = 3  # groups concatenated into one fused tensor (gate+up: 2, q+k+v: 3)
MAX_SUGGESTION_GROUPS = 5_000  # folded groups of unexpected keys examined for stack suggestions


def _rows(report: Report) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    frame = report.frame
    model_at = {k: i for i, k in enumerate(frame["key"].tolist()) if isinstance(k, str)}
    unexpected = frame["status"].to_numpy() == "unexpected"
    ckpt_at = {k: i for i, k in zip(np.flatnonzero(unexpected).tolist(), frame.loc[unexpected, "ckpt_key"].tolist())}
    return frame, model_at, ckpt_at


def _saved_shapes(report: Report, keys: Sequence[str]) -> list[tuple[int, ...]]:
    tensors = report.checkpoint.tensors(report.section)
    missing = [k for k in keys if k not in tensors.index]
    if missing:
        raise AdaptError(f"{report.checkpoint.path}: no tensor {missing[:3]} in section "
                         f"{report.section or '(top level)'}")
    return [tuple(tensors.at[k, "shape"]) for k in keys]


def _free_ckpt(report: Report, keys: Sequence[str], ckpt_at: dict[str, int]) -> None:
    """Every key must be an unexpected row (not paired with anything yet)."""
    taken = [k for k in keys if k not in ckpt_at]
    if taken:
        frame = report.frame
        where = frame.loc[frame["ckpt_key"].isin(taken), ["ckpt_key", "key"]].head(3).values.tolist()
        raise AdaptError(f"checkpoint key(s) {taken[:3]} are already paired ({where}) or not in the report; only "
                         "unexpected checkpoint tensors can be combined or split")


def _apply(report: Report, changes: dict[str, tuple[Adaptation, str, tuple]], consumed: Sequence[str]) -> Report:
    """A new report: each model row in ``changes`` (key -> (adaptation, ckpt key shown, ckpt shape))
    adapted, and the unexpected rows of ``consumed`` removed."""
    frame, model_at, ckpt_at = _rows(report)
    frame = frame.copy()
    cols = {c: frame.columns.get_loc(c) for c in ("ckpt_key", "ckpt_shape", "ckpt_dtype", "ckpt_device", "status",
                                                  "rule")}
    done = dict(report.adaptations)
    for key, (a, shown, shape) in changes.items():
        i, src = model_at[key], ckpt_at[shown]
        for c in ("ckpt_dtype", "ckpt_device"):
            frame.iat[i, cols[c]] = frame.iat[src, cols[c]]
        frame.iat[i, cols["ckpt_key"]] = shown
        frame.iat[i, cols["ckpt_shape"]] = shape
        frame.iat[i, cols["status"]] = "adapted"
        frame.iat[i, cols["rule"]] = "adapted: " + a.text
        done[key] = a
    frame = frame.drop(index=frame.index[[ckpt_at[c] for c in dict.fromkeys(consumed)]]).reset_index(drop=True)
    return report._with(frame, adaptations=done)


def _joined(how: str, one: tuple[int, ...], n: int, dim: int) -> tuple[int, ...]:
    """The shape of ``n`` tensors of shape ``one`` stacked or concatenated along ``dim``."""
    if how not in ("stack", "concat"):
        raise AdaptError(f"how={how!r}: use 'stack' (a new dimension) or 'concat' (along an existing one)")
    if how == "stack":
        if not 0 <= dim <= len(one):
            raise AdaptError(f"dim={dim} is out of range for stacking {one} tensors")
        return (*one[:dim], n, *one[dim:])
    if not 0 <= dim < len(one):
        raise AdaptError(f"dim={dim} is out of range for concatenating {one} tensors")
    return (*one[:dim], one[dim] * n, *one[dim + 1:])


def combine(report: Report, key: str, ckpt_keys: Sequence[str] | Sequence[Sequence[str]], how: str = "stack",
            dim: int = 0, *, inner: str = "concat", inner_dim: int = 0) -> Report:
    """Load the model tensor ``key`` from ``ckpt_keys`` stacked (a new dimension ``dim``) or
    concatenated (along ``dim``), in the order given. ``ckpt_keys`` may be a list of equal-length
    lists: each list is joined first (``inner`` along ``inner_dim``), then the results (``how`` along
    ``dim``): transformers' fused ``experts.gate_up_proj`` is
    ``[[f"experts.{i}.w1.weight", f"experts.{i}.w3.weight"] for i in ...]`` with the defaults.
    Checked exactly before anything is read."""
    nested = bool(ckpt_keys) and not isinstance(ckpt_keys[0], str)
    groups = [list(g) for g in ckpt_keys] if nested else [[k] for k in ckpt_keys]
    flat = [k for g in groups for k in g]
    frame, model_at, ckpt_at = _rows(report)
    if key not in model_at:
        raise AdaptError(f"{key!r} is not a model key of this report")
    if len(groups) < 2 or len(set(flat)) < len(flat) or len({len(g) for g in groups}) > 1:
        raise AdaptError(f"give two or more distinct checkpoint keys (or equal-length lists of them) to {how}")
    _free_ckpt(report, flat, ckpt_at)
    shapes = _saved_shapes(report, flat)
    if len(set(shapes)) > 1:
        raise AdaptError(f"the checkpoint tensors to {how} have different shapes: {sorted(set(shapes))[:4]}")
    one = shapes[0]
    part = _joined(inner, one, len(groups[0]), inner_dim) if nested else one
    result = _joined(how, part, len(groups), dim)
    model_shape = tuple(frame.at[model_at[key], "model_shape"])
    first = f"{inner} {len(groups[0])} along dim {inner_dim}, then " if nested else ""
    what = f"{first}{how} {len(groups)} × {part} along dim {dim}"
    if result != model_shape:
        raise AdaptError(f"{what} gives {result}, but {key!r} is {model_shape}")
    text = f"{what}: {_pattern(flat)}"
    options = {"keys": tuple(flat), "dim": dim}
    if nested:
        options.update(groups=tuple(map(tuple, groups)), inner=inner, inner_dim=inner_dim)
    a = Adaptation(how, one, model_shape, text, options)
    return _apply(report, {key: (a, flat[0], result)}, flat)


def split(report: Report, ckpt_key: str, keys: Sequence[str], dim: int = 0) -> Report:
    """Load the model tensors ``keys`` from consecutive pieces of the one checkpoint tensor
    ``ckpt_key`` along ``dim`` (a fused ``qkv`` into ``q``, ``k``, ``v``), sized by the model's shapes."""
    keys = list(keys)
    frame, model_at, ckpt_at = _rows(report)
    unknown = [k for k in keys if k not in model_at]
    if unknown:
        raise AdaptError(f"not model keys of this report: {unknown[:3]}")
    _free_ckpt(report, [ckpt_key], ckpt_at)
    (fused,) = _saved_shapes(report, [ckpt_key])
    shapes = [tuple(frame.at[model_at[k], "model_shape"]) for k in keys]
    if not 0 <= dim < len(fused) or any(len(s) != len(fused) for s in shapes):
        raise AdaptError(f"split along dim {dim} needs model tensors with as many dimensions as {fused}: {shapes}")
    if any(s[:dim] + s[dim + 1:] != fused[:dim] + fused[dim + 1:] for s in shapes):
        raise AdaptError(f"the pieces {shapes} differ from {fused} in a dimension other than {dim}")
    if sum(s[dim] for s in shapes) != fused[dim]:
        raise AdaptError(f"the pieces' sizes along dim {dim} sum to {sum(s[dim] for s in shapes)}, but "
                         f"{ckpt_key!r} has {fused[dim]}")
    changes, offset = {}, 0
    for k, s in zip(keys, shapes):
        text = f"split {ckpt_key} {fused}: [{offset}:{offset + s[dim]}] along dim {dim}"
        a = Adaptation("split", fused, s, text, {"dim": dim, "offset": offset, "source": ckpt_key})
        changes[k] = (a, ckpt_key, fused)
        offset += s[dim]
    return _apply(report, changes, [ckpt_key])


def _index_order(key: str) -> tuple[int, ...]:
    return tuple(int(p) for p in key.split(".") if p.isdigit())


def _pattern(keys: Sequence[str]) -> str:
    f = fold_keys(list(keys))
    return f.patterns[0] if len(f) == 1 else f"{keys[0]} … {keys[-1]}"


def stack_suggestions(report: Report) -> pd.DataFrame:
    """Missing model tensors that a group of unexpected checkpoint tensors (keys that differ in one
    index, all of one shape) would stack into exactly along dim 0, the closest group by name first;
    or, two-level, that two or three such groups fill when each index's tensors are concatenated first
    (a fused ``experts.gate_up_proj`` from ``experts.{i}.gate_proj`` and ``up_proj``, in the order the
    name spells): ``key``, ``ckpt_keys`` (a list of lists when two-level), ``how``, ``dim``, ``inner``,
    ``inner_dim``, ``reason``. Nothing is applied: pass a row to ``report.combine(key, ckpt_keys, how, dim,
    inner=..., inner_dim=...)``."""
    frame, model_at, ckpt_at = _rows(report)
    missing = frame.loc[frame["status"] == "missing", ["key", "model_shape"]]
    columns = STACK_COLUMNS
    if missing.empty or not ckpt_at:
        return pd.DataFrame(columns=columns)
    ckpt_keys = list(ckpt_at)
    folding = fold_keys(ckpt_keys)
    shapes = frame["ckpt_shape"].to_numpy()
    groups = []
    for g in np.flatnonzero(folding.sizes >= 2)[:MAX_SUGGESTION_GROUPS].tolist():
        members = sorted((ckpt_keys[i] for i in folding.members(g).tolist()), key=_index_order)
        member_shapes = {tuple(shapes[ckpt_at[k]]) for k in members}
        if len(member_shapes) == 1 and folding.grid[g] and folding.patterns[g].count("{") == 1:
            groups.append((folding.patterns[g], members, member_shapes.pop()))
    out = []
    for key, shape in missing.itertuples(index=False):
        fits = [(similarity(key, p.replace(".{", "{")), p, m) for p, m, one in groups
                if shape is not None and tuple(shape) == (len(m), *one)]
        if not fits:
            fused = _fused(key, tuple(shape), groups) if shape is not None else None
            if fused is not None:
                out.append(fused)
            continue
        fits.sort(key=lambda f: -f[0])
        if len(fits) > 1 and fits[1][0] == fits[0][0]:
            continue  # two groups fit equally: say nothing rather than guess
        score, pattern, members = fits[0]
        out.append((key, members, "stack", 0, None, None,
                    f"{len(members)} tensors {pattern} stack into {tuple(shape)}"))
    frame = pd.DataFrame(out, columns=columns, dtype=object)  # None stays None (not NaN) in inner, inner_dim
    frame["dim"] = frame["dim"].astype(np.int64)
    return frame


def _role(pattern: str) -> str:
    """The name part of a per-index pattern after its index, without ``weight``/``proj`` (``experts.{0-7}.
    gate_proj.weight`` -> ``gate``; ``w1`` -> its alias ``gate``)."""
    tail = pattern.split("}", 1)[1].strip(".").split(".")
    words = [w for part in tail for w in part.split("_") if w and w not in ("weight", "proj", "bias")]
    return "_".join(ROLE_ALIASES.get(w, w) for w in words)


def _fused(key: str, shape: tuple, groups: list) -> tuple | None:
    """A two-level suggestion for the missing ``key``: two or three per-index groups under ``key``'s parent,
    of one shape and index set, whose roles ``key``'s own name spells in order (``gate_up_proj`` from
    ``gate_proj`` and ``up_proj``, or Mixtral's ``w1`` and ``w3``), each index's tensors concatenated and the
    results stacked into ``shape`` exactly. None when no such reading is unique: a wrong load is worse."""
    parent, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    words = [w for w in leaf.split("_") if w not in ("proj", "weight")]
    found = []
    for inner_dim in range(len(shape) - 1):
        candidates = {}
        for pattern, members, one in groups:
            if pattern.split(".{", 1)[0] != parent or len(members) != shape[0] or len(one) != len(shape) - 1:
                continue
            role = _role(pattern)
            if role in words:
                candidates.setdefault(role, []).append((pattern, members, one))
        if any(len(v) > 1 for v in candidates.values()):
            return None  # two groups claim one role
        chosen = [candidates[w][0] for w in words if w in candidates]
        if not 2 <= len(chosen) <= MAX_FUSED or len(chosen) != len(words):
            continue
        one = chosen[0][2]
        if any(c[2] != one for c in chosen) or any(_index_order(a) != _index_order(b) for a, b in
                                                   zip(chosen[0][1], chosen[1][1])):
            continue
        part = _joined("concat", one, len(chosen), inner_dim)
        if (shape[0], *part) == shape:
            found.append((inner_dim, chosen))
    if len(found) != 1:
        return None
    inner_dim, chosen = found[0]
    keys = [list(ks) for ks in zip(*(c[1] for c in chosen))]
    names = ", ".join(c[0] for c in chosen)
    return (key, keys, "stack", 0, "concat", inner_dim,
            f"{len(keys)} × ({names}) concatenated along dim {inner_dim}, stacked into {shape}")
