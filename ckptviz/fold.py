"""Folding keys that differ only in numeric indices into layer patterns:
``model.layers.{0-60}.mlp.experts.{0-255}.down_proj.weight``.

A key's numeric path components (``.3.``) are its indices; keys with the same text around them form a
group. Each index position shows the exact set of values it takes (``{0-12,14-60}``); a group whose
index tuples are not every combination of those sets is marked ``grid=False`` with the count, so a
pattern never claims keys that do not exist. Column work on whole key columns (pandas string methods,
factorize), then one small step per group of two or more keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

FOLD_THRESHOLD = 2000  # views fold by default above this many rows


def ranges(values: Sequence[int] | np.ndarray) -> str:
    """Sorted distinct integers as runs: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    v = np.unique(np.asarray(values, dtype=np.int64))
    if not len(v):
        return ""
    breaks = np.flatnonzero(np.diff(v) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(v) - 1]])
    return ",".join(str(v[s]) if s == e else f"{v[s]}-{v[e]}" for s, e in zip(starts.tolist(), ends.tolist()))


@dataclass
class Folding:
    """How a key column folds. ``codes[i]`` is the group of key ``i``; per group: its ``pattern``, its
    number of keys (``sizes``), whether it is a full grid of its index sets (``grid``) and a note
    saying otherwise. Groups are numbered in order of their first key."""

    codes: np.ndarray
    patterns: list[str]
    sizes: np.ndarray
    grid: np.ndarray
    notes: list[str]

    def __len__(self) -> int:
        return len(self.patterns)

    def members(self, group: int) -> np.ndarray:
        """Positions of the keys in ``group``, in key order."""
        return np.flatnonzero(self.codes == group)

    def frame(self) -> pd.DataFrame:
        """One row per group: pattern, keys, grid, note."""
        return pd.DataFrame({"pattern": self.patterns, "keys": self.sizes, "grid": self.grid, "note": self.notes})


_SEP, _HOLE = "\x00", "\x01"
_WRAPPED = re.compile(r"\.([0-9]+)(?=\.)")  # an index, in a key wrapped in dots


def _templates(keys: list[str]) -> tuple[list[str], np.ndarray]:
    """Each key with its indices replaced by a hole, and every index as one flat int array (key order).
    Two regex passes over all keys joined into one string: C speed at 500,000 keys."""
    text = "." + (f".{_SEP}.").join(keys) + "."
    templates = _WRAPPED.sub("." + _HOLE, text)[1:-1].split(f".{_SEP}.")
    if len(templates) != len(keys) or _HOLE in text:  # a key holding the separator: key by key
        templates = [_WRAPPED.sub("." + _HOLE, "." + k + ".")[1:-1] for k in keys]
        digits = [d for k in keys for d in _WRAPPED.findall("." + k + ".")]
    else:
        digits = _WRAPPED.findall(text)
    return templates, np.array(digits, dtype=np.int64) if digits else np.zeros(0, dtype=np.int64)


def _distinct_rows(idx: np.ndarray, sets: list[np.ndarray], combos: int) -> int:
    """How many distinct index tuples the rows of ``idx`` hold."""
    if idx.shape[1] == 1:
        return len(sets[0])
    if combos >= 2**62:
        return len(np.unique(idx, axis=0))
    code = np.zeros(len(idx), dtype=np.int64)
    for p, values in enumerate(sets):
        code = code * len(values) + np.searchsorted(values, idx[:, p])
    return len(np.unique(code))


def fold_keys(keys: Sequence[str] | pd.Series) -> Folding:
    """Group ``keys`` by their text around numeric indices (see the module docstring)."""
    keys = ["" if not isinstance(k, str) else k for k in keys]
    n = len(keys)
    if not n:
        return Folding(np.zeros(0, dtype=np.int64), [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), [])
    templates, digits = _templates(keys)
    codes, uniques = pd.factorize(pd.Series(templates, dtype=object), sort=False)
    codes = codes.astype(np.int64)
    g_count = len(uniques)
    sizes = np.bincount(codes, minlength=g_count).astype(np.int64)
    holes = np.fromiter((u.count(_HOLE) for u in uniques), dtype=np.int64, count=g_count)
    per_key = holes[codes]
    offsets = np.concatenate([[0], np.cumsum(per_key)[:-1]]) if n else per_key
    first = np.unique(codes, return_index=True)[1]  # codes number groups by first appearance
    patterns = np.asarray(keys, dtype=object)[first]  # a singleton, or a group without indices: its key
    grid = np.ones(g_count, dtype=bool)
    notes = [""] * g_count
    multi = np.flatnonzero((sizes > 1) & (holes > 0))
    if len(multi):
        rows = np.flatnonzero(np.isin(codes, multi))
        order = rows[np.argsort(codes[rows], kind="stable")]
        bounds = np.concatenate([[0], np.cumsum(sizes[multi])])
        for j, g in enumerate(multi.tolist()):
            members = order[bounds[j]:bounds[j + 1]]
            idx = digits[offsets[members][:, None] + np.arange(holes[g])]  # keys x positions
            sets = [np.unique(idx[:, p]) for p in range(idx.shape[1])]
            parts = [str(v[0]) if len(v) == 1 else "{" + ranges(v) + "}" for v in sets]
            pieces = uniques[g].split(_HOLE)
            patterns[g] = pieces[0] + "".join(part + piece for part, piece in zip(parts, pieces[1:]))
            combos = math.prod(len(v) for v in sets)
            distinct = _distinct_rows(idx, sets, combos)
            if distinct != combos:
                grid[g] = False
                notes[g] = f"not a full grid: {distinct} of {combos} index combinations"
            elif distinct < sizes[g]:
                notes[g] = f"{sizes[g]} keys share {distinct} index tuples (indices written differently, e.g. 01 and 1)"
    return Folding(codes, patterns.tolist(), sizes, grid, notes)


def _distinct(values: pd.Series, codes: np.ndarray, groups: int, fmt) -> list[str]:
    """Per group, every distinct non-empty value of ``values`` (formatted by ``fmt``, first seen first),
    joined by `` | ``."""
    valid = values.notna().to_numpy() & (values.astype(str) != "").to_numpy()
    out = [""] * groups
    if not valid.any():
        return out
    pairs = pd.DataFrame({"g": codes[valid], "v": values[valid].to_numpy()})
    pairs = pairs.drop_duplicates()
    names = {v: fmt(v) for v in set(pairs["v"].tolist())}
    for g, v in zip(pairs["g"].tolist(), pairs["v"].tolist()):
        out[g] = names[v] if not out[g] else out[g] + " | " + names[v]
    return out


def shape_text(v) -> str:
    return "(" + ", ".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)


def group_frame(frame: pd.DataFrame, folding: Folding, *, counts: dict[str, pd.Series] | None = None,
                distinct: Sequence[str] = (), sums: Sequence[str] = ()) -> pd.DataFrame:
    """One row per group of ``folding`` (over ``frame``'s rows, in order): pattern, keys, the
    ``counts`` (name -> boolean column: how many rows of the group are true), every distinct value of
    each ``distinct`` column, the total of each ``sums`` column, grid and note."""
    g = len(folding)
    codes = folding.codes
    out = {"pattern": folding.patterns, "keys": folding.sizes}
    for name, flags in (counts or {}).items():
        out[name] = np.bincount(codes, weights=np.asarray(flags, dtype=np.float64), minlength=g).astype(np.int64)
    for col in distinct:
        out[col] = _distinct(frame[col].reset_index(drop=True), codes, g, shape_text)
    for col in sums:
        out[col] = np.bincount(codes, weights=frame[col].to_numpy(dtype=np.float64), minlength=g).astype(np.int64)
    out["grid"] = folding.grid
    out["note"] = folding.notes
    return pd.DataFrame(out)


def layer_of(keys: pd.Series) -> pd.Series:
    """The layer each key belongs to: its path up to its first numeric index (``model.layers.3``), or
    its module (the key without its last component) when it has none."""
    keys = keys.astype(str)
    first = keys.str.extract(r"^(.*?(?:^|\.)\d+)(?=\.|$)", expand=False)
    module = keys.str.rsplit(".", n=1).str[0]
    return first.fillna(module)
