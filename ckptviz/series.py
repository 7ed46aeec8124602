"""``diff_series()``: a whole training run (``epoch=1.ckpt`` ... ``epoch=90.ckpt``, or a list of paths)
compared checkpoint by checkpoint: for every (key, checkpoint) the norm, the change against the previous
(or the first) checkpoint, and flags for layers that never moved, norms that exploded and NaN/Inf that
appeared. Each file is read once: keys are taken in groups of bounded size and, within a group, the files
in order, so memory holds one group of the reference and one of the current checkpoint, never a whole
checkpoint (a tensor larger than a group is read alone). The arithmetic is :func:`ckptviz.diff`'s.
This module never imports ipywidgets."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .align import align
from .checkpoint import Checkpoint, as_checkpoint, dtype_name
from .errors import CheckpointNotFoundError, SectionError
from .readers.layout import WEIGHT_SUFFIXES, summarize_folder

GROUP_BYTES = 64 * 2**20  # bytes of one checkpoint read together; the reference group is held beside it
PROGRESS_BYTES = 256 * 2**20  # a progress bar above this many bytes to read, unless told
EXPLODE = 10.0  # a norm this many times its first value is flagged
METRICS = ("norm", "rel_change", "max_abs_change", "changed_frac", "cosine", "nonfinite")
STATUSES = ("present", "absent", "shape_differs", "dtype_differs")
FLAGS = ("frozen", "norm_exploding", "nonfinite")
FLAG_COLOURS = {"frozen": "#d9d9d9", "norm_exploding": "#f4a582", "nonfinite": "#fbd9d7"}  # tables, badges, HTML
STEP_KEYS = ("global_step", "step", "iteration", "epoch")  # metadata that orders a run, best first
_STEP_IN_NAME = re.compile(r"(?:global_step|step|epoch|iter(?:ation)?|checkpoint|ckpt)[=_\-]?(\d+)", re.IGNORECASE)
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``epoch=9`` before ``epoch=10``."""
    return tuple(int(p) if p.isdigit() else p.lower() for p in _DIGITS.split(name))


def step_of(name: str) -> int | None:
    """The step or epoch a file name carries (``epoch=9.ckpt`` -> 9, ``checkpoint-500`` -> 500, else its
    last number), or None."""
    m = _STEP_IN_NAME.findall(name)
    if m:
        return int(m[-1])
    numbers = _DIGITS.findall(Path(name).name)
    return int(numbers[-1]) if numbers else None


def run_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run folder, naturally ordered: weight files (``.pt``, ``.ckpt``, ...) and
    sub-folders that are one checkpoint each (hub shards, DCP, DeepSpeed; e.g. ``checkpoint-500/``)."""
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointNotFoundError(f"diff_series: {str(folder)!r} is one checkpoint file; a series needs a folder "
                                      "of checkpoints or two or more paths")
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"diff_series: {str(folder)!r} is not a folder; give a folder of "
                                      "checkpoints or a list of paths")
    own = summarize_folder(str(folder))
    if own is not None and own.format in ("dcp", "deepspeed") or (own is not None and own.format.startswith("hf-")):
        raise CheckpointNotFoundError(
            f"diff_series: {str(folder)!r} is one checkpoint ({own}), not a run; give the folder that holds "
            "one checkpoint per step, or a list of paths")
    found = []
    for e in os.scandir(folder):
        if e.name.startswith("."):
            continue
        if e.is_file() and e.name.lower().endswith(WEIGHT_SUFFIXES) and e.stat().st_size > 0:
            found.append(Path(e.path))
        elif e.is_dir() and summarize_folder(e.path) is not None:
            found.append(Path(e.path))
    return sorted(found, key=lambda p: natural_key(p.name))


# ---- the report ----------------------------------------------------------------------------------
class SeriesReport:
    """The result of :func:`diff_series`. ``keys`` in the first checkpoint's order (keys appearing later
    appended), ``labels`` and ``steps`` per checkpoint, and one (keys x checkpoints) array per metric:

    * ``norm``: L2 norm of the finite values; ``nonfinite``: how many elements are NaN or Inf;
    * ``rel_change``, ``max_abs_change``, ``changed_frac``, ``cosine``: against the reference (the previous
      checkpoint holding the key, or the first), as :func:`ckptviz.diff` defines them; NaN where there is
      no reference (a key's first checkpoint) or no comparable one (absent, shape or dtype changed).
    """

    def __init__(self, checkpoints: list[Checkpoint], sections: list[str], labels: list[str],
                 steps: list[int | None], keys: list[str], names: np.ndarray, arrays: dict[str, np.ndarray],
                 status: np.ndarray, reference: str, shapes: list[tuple], dtypes: list[str], explode: float,
                 floating: np.ndarray):
        self.checkpoints, self.sections = checkpoints, sections
        self.labels, self.steps, self.keys = labels, steps, keys
        self._names = names  # (keys x checkpoints) the key's name in each checkpoint, None where absent
        self.arrays, self.status, self.reference = arrays, status, reference
        self.shapes, self.dtypes, self.explode = shapes, dtypes, explode
        self.floating = floating  # per key: floating or complex (counters never "explode")
        self._frame: pd.DataFrame | None = None
        self._flags: pd.DataFrame | None = None  # found once: the report never changes

    # ---- tables ------------------------------------------------------------------------------
    @property
    def frame(self) -> pd.DataFrame:
        """One row per (key, checkpoint): key, checkpoint (position), label, step, status and the metrics."""
        if self._frame is None:
            k, n = len(self.keys), len(self.labels)
            cols: dict[str, Any] = {
                "key": pd.Categorical.from_codes(np.repeat(np.arange(k), n), categories=pd.Index(self.keys)),
                "checkpoint": np.tile(np.arange(n), k),
                "label": pd.Categorical.from_codes(np.tile(np.arange(n), k), categories=pd.Index(self.labels)),
                "step": pd.array(np.tile(np.array([np.nan if s is None else s for s in self.steps]), k),
                                 dtype="Int64"),
                "status": pd.Categorical.from_codes(self.status.ravel(), categories=list(STATUSES)),
            }
            cols.update({m: self.arrays[m].ravel() for m in METRICS})
            self._frame = pd.DataFrame(cols)
        return self._frame

    def matrix(self, metric: str = "rel_change") -> pd.DataFrame:
        """``metric`` as a keys x checkpoints DataFrame (index: keys in model order; columns: labels)."""
        if metric not in METRICS:
            raise SectionError(f"no metric {metric!r}; choose one of {', '.join(METRICS)}")
        return pd.DataFrame(self.arrays[metric], index=pd.Index(self.keys, name="key"),
                            columns=pd.Index(self.labels, name="checkpoint"))

    def folded(self, metric: str = "rel_change") -> pd.DataFrame:
        """``metric`` per layer pattern (keys differing only in numeric indices folded, as in the tables):
        a group's norm is the norm of its tensors together, its ``rel_change`` the norm of their changes
        over the norm of their references, its ``max_abs_change`` and ``nonfinite`` the max and the sum."""
        from .fold import fold_keys

        folding = fold_keys(self.keys)
        g = len(folding)
        codes = folding.codes
        a = self.arrays

        def by_group(values: np.ndarray, how: str) -> np.ndarray:
            out = np.full((g, values.shape[1]), np.nan)
            for j in range(values.shape[1]):
                col = values[:, j]
                ok = ~np.isnan(col)
                if how == "sum":
                    s = np.bincount(codes[ok], weights=col[ok], minlength=g)
                    has = np.bincount(codes[ok], minlength=g) > 0
                    out[has, j] = s[has]
                else:
                    df = pd.Series(col[ok]).groupby(codes[ok]).max()
                    out[df.index.to_numpy(), j] = df.to_numpy()
            return out

        if metric == "norm":
            values = np.sqrt(by_group(a["norm"] ** 2, "sum"))
        elif metric == "rel_change":
            ref = self._reference_norms()
            with np.errstate(invalid="ignore"):  # inf (a reference of norm 0) x 0
                delta = a["rel_change"] * ref
            both = ~np.isnan(delta) & np.isfinite(delta)
            num = by_group(np.where(both, delta ** 2, np.nan), "sum")
            den = by_group(np.where(both, ref ** 2, np.nan), "sum")
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(den > 0, np.sqrt(num) / np.sqrt(den), np.where(num > 0, np.inf, 0.0))
            values[np.isnan(num)] = np.nan
        elif metric in ("max_abs_change", "nonfinite"):
            values = by_group(a[metric], "max" if metric == "max_abs_change" else "sum")
        else:
            raise SectionError(f"folded() takes norm, rel_change, max_abs_change or nonfinite, not {metric!r}")
        return pd.DataFrame(values, index=pd.Index(folding.patterns, name="pattern"),
                            columns=pd.Index(self.labels, name="checkpoint"))

    def _reference_norms(self) -> np.ndarray:
        """The norm of each (key, checkpoint)'s reference tensor (NaN where none)."""
        norm = self.arrays["norm"]
        present = self.status == 0
        ref = np.full_like(norm, np.nan)
        if self.reference == "first":
            first = np.argmax(present, axis=1)
            ref[:] = norm[np.arange(len(self.keys)), first][:, None]
        else:
            last = np.full(len(self.keys), np.nan)
            for j in range(norm.shape[1]):
                ref[:, j] = last
                last = np.where(present[:, j], norm[:, j], last)
        ref[np.isnan(self.arrays["rel_change"])] = np.nan
        return ref

    @property
    def flags(self) -> pd.DataFrame:
        """One row per finding: key, flag (``frozen``: no element changed across the run;
        ``norm_exploding``: a floating tensor's norm grew more than ``explode`` times from one checkpoint
        to the next, or ``explode``² times since its first, or overflowed; ``nonfinite``: NaN or Inf
        appeared), the checkpoint where it first holds (None for ``frozen``), its label and a detail."""
        return self._found_flags().copy()

    def _found_flags(self) -> pd.DataFrame:
        if self._flags is None:
            self._flags = self._find_flags()
        return self._flags

    def _find_flags(self) -> pd.DataFrame:
        rows = []
        a, present = self.arrays, self.status != 1
        for i, key in enumerate(self.keys):
            cols = np.flatnonzero(present[i])
            if cols.size == 0:
                continue
            compared = a["changed_frac"][i, cols[1:]]
            if cols.size >= 2 and not np.isnan(compared).any() and np.all(compared == 0):
                rows.append((key, "frozen", None, None, f"unchanged in all {cols.size} checkpoints"))
            norms = a["norm"][i, cols]
            if self.floating[i] and norms[0] > 0 and math.isfinite(norms[0]):
                with np.errstate(divide="ignore", invalid="ignore"):
                    jump = norms[1:] / norms[:-1]
                over = np.flatnonzero((jump > self.explode) | (norms[1:] > self.explode ** 2 * norms[0])
                                      | np.isinf(norms[1:]))
                if over.size:
                    j, before = int(cols[over[0] + 1]), int(cols[over[0]])
                    rows.append((key, "norm_exploding", j, self.labels[j],
                                 f"norm {a['norm'][i, before]:.3g} at {self.labels[before]} -> {a['norm'][i, j]:.3g} "
                                 f"(x{a['norm'][i, j] / a['norm'][i, before]:.3g}; x{a['norm'][i, j] / norms[0]:.3g} "
                                 "since the first)"))
            bad = np.flatnonzero(a["nonfinite"][i, cols] > 0)
            if bad.size:
                j = int(cols[bad[0]])
                count = int(a["nonfinite"][i, j])
                since = ("from the first checkpoint" if bad[0] == 0
                         else f"(none at {self.labels[int(cols[bad[0] - 1])]})")
                rows.append((key, "nonfinite", j, self.labels[j], f"{count} NaN/Inf elements {since}"))
        frame = pd.DataFrame(rows, columns=["key", "flag", "checkpoint", "label", "detail"])
        frame["checkpoint"] = frame["checkpoint"].astype("Int64")
        return frame

    @property
    def summary(self) -> dict[str, int]:
        counts = self._found_flags()["flag"].value_counts()
        return {"checkpoints": len(self.labels), "keys": len(self.keys),
                **{f: int(counts.get(f, 0)) for f in FLAGS}}

    # ---- plots -------------------------------------------------------------------------------
    def heatmap(self, metric: str = "rel_change", *, fold: bool | None = None, **kw: Any):
        """A matplotlib Figure: layers x checkpoints coloured by ``metric`` (see
        :func:`ckptviz.plots_series.series_heatmap_figure`); ``fold`` (default: above 60 keys) folds
        keys into layer patterns first."""
        from .plots_series import MAX_ROWS, series_heatmap_figure

        fold = len(self.keys) > MAX_ROWS if fold is None else fold
        matrix = self.folded(metric) if fold else self.matrix(metric)
        return series_heatmap_figure(matrix, metric=metric, **kw)

    def norms_plot(self, *, fold: bool | None = None, **kw: Any):
        """A matplotlib Figure: each layer's norm over the run, coloured by depth."""
        from .plots_series import MAX_ROWS, series_norms_figure

        fold = len(self.keys) > MAX_ROWS if fold is None else fold
        return series_norms_figure(self.folded("norm") if fold else self.matrix("norm"), **kw)

    # ---- one pair ----------------------------------------------------------------------------
    def reference_of(self, checkpoint: int) -> int | None:
        """The position of the checkpoint that ``checkpoint`` is compared with (None for the first)."""
        if checkpoint <= 0 or checkpoint >= len(self.labels):
            return None
        return 0 if self.reference == "first" else checkpoint - 1

    def pair(self, checkpoint: int, other: int | None = None, **kw: Any):
        """The detailed :func:`ckptviz.diff` of ``checkpoint`` against its reference (or ``other``)."""
        from .diff import diff

        n = len(self.labels)
        if not 0 <= checkpoint < n:
            raise SectionError(f"no checkpoint {checkpoint} in this series of {n}")
        ref = self.reference_of(checkpoint) if other is None else other
        if ref is None:
            raise SectionError(f"checkpoint 0 ({self.labels[0]}) is the first of the series: it has no reference; "
                               "pass other= to compare it with another one")
        return diff(self.checkpoints[ref], self.checkpoints[checkpoint], section_a=self.sections[ref],
                    section_b=self.sections[checkpoint], **kw)

    # ---- display -----------------------------------------------------------------------------
    def to_html(self, path: str | os.PathLike, **kw: Any) -> Path:
        """Write this run (flags, heatmap, norms) to ``path`` as one self-contained HTML file and return
        its Path; ``kw`` as for :func:`ckptviz.html_report.write_report` (``title``, ``plots``)."""
        from .html_report import write_report

        return write_report(self, path, **kw)

    def __repr__(self) -> str:
        s = self.summary
        flags = ", ".join(f"{f}={s[f]}" for f in FLAGS if s[f])
        return (f"SeriesReport({s['checkpoints']} checkpoints {self.labels[0]!r} .. {self.labels[-1]!r}, "
                f"{s['keys']} keys, reference={self.reference!r}{', ' + flags if flags else ''})")

    def _repr_html_(self) -> str:
        import html

        flags = self.flags
        shown = flags.head(200)
        more = f"<p>showing 200 of {len(flags)} flags; see <code>.flags</code></p>" if len(flags) > 200 else ""
        table = shown.to_html(index=False, na_rep="—") if len(shown) else "<p>no flags</p>"
        return (f"<div class='ckptviz-series'><p><b>{html.escape(repr(self))}</b></p>{more}{table}</div>")


# ---- the verb ------------------------------------------------------------------------------------
def diff_series(
    paths: str | os.PathLike | Sequence[Any],
    *,
    reference: str = "previous",
    section: str | None = None,
    order: str | None = None,
    explode: float = EXPLODE,
    progress: bool | None = None,
    trust: bool = False,
) -> SeriesReport:
    """Compare the checkpoints of a run, each with the previous one (``reference="previous"``) or with
    the first (``"first"``).

    ``paths`` is a folder (its weight files and checkpoint sub-folders) or a sequence of paths or
    :class:`Checkpoint` s. ``order`` is ``"natural"`` (by the numbers in the names, ``epoch=9`` before
    ``epoch=10``), ``"metadata"`` (by ``global_step``/``step``/``iteration``/``epoch`` saved in each
    checkpoint) or ``"given"``; by default a folder is ordered by metadata when every checkpoint has
    distinct steps there, else naturally, and a sequence stays as given. Keys are matched to the first
    checkpoint's as :func:`ckptviz.diff` matches them (exact names first, then prefix renames).
    A ``tqdm.auto`` bar over bytes is shown when ``progress`` is True, or when None and over 256 MiB.
    """
    if reference not in ("previous", "first"):
        raise SectionError(f"reference must be 'previous' or 'first', not {reference!r}")
    if order not in (None, "natural", "metadata", "given"):
        raise SectionError(f"order must be 'natural', 'metadata' or 'given', not {order!r}")
    is_folder = isinstance(paths, (str, os.PathLike))
    items: list[Any] = list(run_files(paths)) if is_folder else list(paths)
    if len(items) < 2:
        where = f"in {str(paths)!r}" if is_folder else "given"
        raise CheckpointNotFoundError(f"diff_series: {len(items)} checkpoint(s) {where}; a series needs two or more "
                                      f"(files ending in {', '.join(WEIGHT_SUFFIXES)}, or checkpoint folders)")
    cks = [as_checkpoint(x, trust=trust) for x in items]
    labels = [_label(x, ck) for x, ck in zip(items, cks)]
    meta_steps = [_metadata_step(ck) for ck in cks]
    order = order or ("metadata" if is_folder and _distinct(meta_steps) else "natural" if is_folder else "given")
    if order == "metadata":
        if not _distinct(meta_steps):
            raise SectionError("order='metadata': not every checkpoint saves a distinct "
                               f"{'/'.join(STEP_KEYS)}; use order='natural'")
        perm = sorted(range(len(cks)), key=lambda i: meta_steps[i])
    elif order == "natural":
        perm = sorted(range(len(cks)), key=lambda i: natural_key(labels[i]))
    else:
        perm = list(range(len(cks)))
    cks, labels = [cks[i] for i in perm], [labels[i] for i in perm]
    steps = [meta_steps[i] if meta_steps[i] is not None else step_of(labels[j]) for j, i in enumerate(perm)]
    sections = [ck.resolve(section) if section is None or section in ck.sections else _missing(ck, section)
                for ck in cks]
    tables = [ck._section(s) for ck, s in zip(cks, sections)]
    keys, names = _match_keys(tables)
    return _measure(cks, sections, tables, labels, steps, keys, names, reference, explode, progress)


def _label(item: Any, ck: Checkpoint) -> str:
    path = item if isinstance(item, (str, os.PathLike)) else ck.path
    return Path(str(path)).name if path else f"<{type(item).__name__}>"


def _metadata_step(ck: Checkpoint) -> int | None:
    for k in STEP_KEYS:
        v = ck.metadata.get(k)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
    return None


def _distinct(steps: list) -> bool:
    return all(s is not None for s in steps) and len(set(steps)) == len(steps)


def _missing(ck: Checkpoint, section: str) -> str:
    raise SectionError(f"{ck.path!r} has no section {section!r}; it has {ck.sections}")


def _match_keys(tables: list) -> tuple[list[str], np.ndarray]:
    """The union of keys (first checkpoint's order, later arrivals appended) and, per checkpoint, each
    key's name there (object array keys x checkpoints, None where absent)."""
    keys = list(tables[0].keys_list)
    at = {k: i for i, k in enumerate(keys)}
    shape_of = dict(zip(keys, tables[0].shape))
    columns: list[dict[int, str]] = [{i: k for i, k in enumerate(keys)}]
    for t in tables[1:]:
        names = t.keys_list
        if all(k in at for k in names):  # the common case: the same names
            columns.append({at[k]: k for k in names})
            continue
        shapes = dict(zip(names, t.shape))

        def same_shape(c: str, m: str, shapes=shapes) -> bool:
            return shapes.get(c) == shape_of.get(m)

        al = align(keys, names, same_shape=same_shape)
        col = {}
        for c in names:
            m = al.pairs.get(c)
            if m is None:  # a key this checkpoint adds
                at[c], shape_of[c] = len(keys), shapes[c]
                keys.append(c)
                m = c
            col[at[m]] = c
        columns.append(col)
    out = np.full((len(keys), len(tables)), None, dtype=object)
    for j, col in enumerate(columns):
        for i, c in col.items():
            out[i, j] = c
    return keys, out


def _measure(cks, sections, tables, labels, steps, keys, names, reference, explode, progress) -> SeriesReport:
    from .diff import _compare, _data_bytes, _groups

    k, n = len(keys), len(cks)
    arrays = {m: np.full((k, n), np.nan) for m in METRICS}
    status = np.full((k, n), 1, dtype=np.int8)  # absent until seen
    info = [dict(zip(t.keys_list, zip(t.shape, t.dtype, _data_bytes(t)))) for t in tables]
    shapes: list[tuple] = [()] * k
    dtypes: list[str] = [""] * k
    size = np.zeros(k, dtype=np.int64)
    floating = np.zeros(k, dtype=bool)
    for i in range(k):
        j = next(j for j in range(n) if names[i, j] is not None)
        shape, dt, nbytes = info[j][names[i, j]]
        shapes[i], dtypes[i], size[i] = tuple(shape), dtype_name(dt), nbytes
        floating[i] = dt.is_floating_point or dt.is_complex
    total = int(sum(info[j][names[i, j]][2] for i in range(k) for j in range(n) if names[i, j] is not None))
    bar = None
    if progress or (progress is None and total > PROGRESS_BYTES):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="series")
    try:
        for group in _groups(list(range(k)), size.tolist(), GROUP_BYTES):
            ref: dict[int, torch.Tensor] = {}  # key -> its reference tensor (previous or first present)
            ref_meta: dict[int, tuple] = {}
            pending: dict[int, int] = {}  # key -> column of its reference whose norm the next pair gives (norm_a)
            for j in range(n):
                here = [i for i in group if names[i, j] is not None]
                if not here:
                    continue
                values = cks[j].values([names[i, j] for i in here], sections[j])
                pairs, slots = [], []
                for i in here:
                    t = values[names[i, j]]
                    old = ref_meta.get(i)
                    if old is not None and old == (tuple(t.shape), t.dtype):
                        status[i, j] = 0
                        pairs.append((ref[i], t))
                        slots.append(i)
                    else:  # a first appearance, or a new shape or dtype: no pair, its norm comes later
                        status[i, j] = 0 if old is None else 2 if old[0] != tuple(t.shape) else 3
                        if i in pending:
                            _fill_norm(arrays, i, pending.pop(i), ref[i])
                for i, got in zip(slots, _compare(pairs, 1 << 18, None) if pairs else []):
                    if i in pending:  # the reference's own norm, from the same pass
                        jp = pending.pop(i)
                        arrays["norm"][i, jp] = got.get("norm_a", math.nan)
                        arrays["nonfinite"][i, jp] = got.get("nonfinite_a", math.nan)
                    arrays["norm"][i, j] = got.get("norm_b", math.nan)
                    arrays["nonfinite"][i, j] = got.get("nonfinite_b", math.nan)
                    arrays["rel_change"][i, j] = got["rel_l2"]
                    arrays["max_abs_change"][i, j] = got["max_abs_diff"]
                    arrays["changed_frac"][i, j] = got["changed_frac"]
                    arrays["cosine"][i, j] = got["cosine"]
                paired = set(slots)
                for i in here:
                    t = values[names[i, j]]
                    if i not in paired:
                        pending[i] = j
                    if reference == "previous" or i not in paired:
                        ref[i], ref_meta[i] = t, (tuple(t.shape), t.dtype)
                if bar is not None:
                    bar.update(sum(info[j][names[i, j]][2] for i in here))
                del values, pairs
            for i, jp in pending.items():  # seen once (or last seen after a change): measured alone
                _fill_norm(arrays, i, jp, ref[i])
    finally:
        if bar is not None:
            bar.close()
    return SeriesReport(cks, sections, labels, steps, keys, names, arrays, status, reference, shapes, dtypes,
                        explode, floating)


def _fill_norm(arrays: dict, i: int, j: int, t: torch.Tensor) -> None:
    arrays["norm"][i, j], arrays["nonfinite"][i, j] = _norm(t)


def _norm(t: torch.Tensor) -> tuple[float, float]:
    """(L2 norm of the finite values, count of NaN/Inf elements) of one tensor, in float64 blocks."""
    from .diff import _has_values

    if not _has_values(t.dtype) or t.device.type == "meta":
        return math.nan, math.nan
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1, 2)
    ss, bad = 0.0, 0
    for lo in range(0, flat.shape[0], 1 << 18):
        x = flat[lo:lo + (1 << 18)].to(torch.float64)
        finite = torch.isfinite(x)
        if x.dim() == 2:
            finite = finite.all(1)
            x = x[finite].reshape(-1)
        else:
            x = x[finite]
        bad += int((~finite).sum())
        ss += float(torch.dot(x, x))
    return math.sqrt(ss), float(bad)


