"""``compare()``: line a checkpoint section up with a live model and classify every key, giving a
:class:`Report` whose DataFrame is what the table widget and ``load_partial`` work from."""

from __future__ import annotations

import html
import operator
from collections.abc import Iterable
from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapt import Adaptation
from .align import Alignment, KeyIndex, Rule, align
from .checkpoint import Checkpoint, as_checkpoint, dtype_name, tensor_info
from .errors import AdaptError, ModelError
from .fold import FOLD_THRESHOLD, Folding, fold_keys, group_frame
from .readers._gc import paused_gc
from .renames import Inferred, infer

STATUSES = ("match", "shape_mismatch", "dtype_mismatch", "adapted", "suggested", "missing", "unexpected")
COLUMNS = ["key", "ckpt_key", "status", "model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype",
           "model_device", "ckpt_device", "rule"]
STATUS_COLOURS = {
    "match": "#e3f4e6", "shape_mismatch": "#fbd9d7", "dtype_mismatch": "#fff1c2",
    "adapted": "#d8eefa", "suggested": "#efe0f7", "missing": "#ffe3cc", "unexpected": "#e2e6f7",
}
SUGGESTION_COLUMNS = ["key", "ckpt_key", "reason", "confidence"]
AMBIGUOUS_COLUMNS = ["side", "key", "candidates", "reason"]
HTML_ROW_LIMIT = 200


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors (parameters and persistent buffers), as live objects."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    out: dict[str, torch.Tensor] = {}
    try:
        _walk_state(model, "", out)
    except _CustomState:
        out = model.state_dict(keep_vars=True)
    if not all(map(isinstance, out.values(), repeat(torch.Tensor))):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return out if type(out) is dict else dict(out)


class _CustomState(Exception):
    """A module whose state dict is not the plain walk over its parameters, buffers and children."""


_PLAIN: dict[type, bool] = {}  # class -> whether its state dict is the plain walk (see _plain_class)


def _plain_class(cls: type) -> bool:
    base = nn.Module
    plain = (cls.state_dict is base.state_dict and cls._save_to_state_dict is base._save_to_state_dict
             and cls.get_extra_state is base.get_extra_state and not issubclass(cls, torch.jit.ScriptModule))
    if len(_PLAIN) < 4096:
        _PLAIN[cls] = plain
    return plain


def _walk_state(module: nn.Module, prefix: str, out: dict[str, torch.Tensor], plain=_PLAIN.get) -> None:
    """What ``module.state_dict(keep_vars=True)`` holds, for modules with no state-dict hooks, no
    overridden state-dict methods and no extra state (raises :class:`_CustomState` otherwise): the
    same keys in the same order, read straight from each module's parameters, buffers and children."""
    d = module.__dict__
    try:
        if (not (plain(type(module)) or _plain_class(type(module))) or d["_state_dict_hooks"]
                or d["_state_dict_pre_hooks"] or "state_dict" in d or "_save_to_state_dict" in d
                or "get_extra_state" in d):
            raise _CustomState
        params, buffers, children = d["_parameters"], d["_buffers"], d["_modules"]
        if params:
            for name, p in params.items():
                if p is not None:
                    out[prefix + name] = p
        if buffers:
            skip = d["_non_persistent_buffers_set"]
            for name, b in buffers.items():
                if b is not None and name not in skip:
                    out[prefix + name] = b
    except KeyError:
        raise _CustomState from None
    if children:
        for name, child in children.items():
            if child is not None:
                _walk_state(child, prefix + name + ".", out)


class Report:
    """The result of :func:`compare`: one row per model key and per unmatched checkpoint key.

    A report is never changed in place: :meth:`accept` returns a new one."""

    def __init__(self, frame: pd.DataFrame, checkpoint: Checkpoint, section: str, rules: list[Rule],
                 suggestions: pd.DataFrame | None = None, ambiguous: pd.DataFrame | None = None,
                 adaptations: dict[str, Adaptation] | None = None):
        self.frame = frame
        self.adaptations: dict[str, Adaptation] = dict(adaptations or {})  # model key -> what load writes
        self.checkpoint = checkpoint
        self.section = section
        self.rules = [r.as_tuple() for r in rules]
        self._suggestions = suggestions if suggestions is not None else pd.DataFrame(columns=SUGGESTION_COLUMNS)
        self._ambiguous = ambiguous if ambiguous is not None else pd.DataFrame(columns=AMBIGUOUS_COLUMNS)

    @property
    def suggestions(self) -> pd.DataFrame:
        """Pairings ckptviz proposes but does not load until accepted (status ``suggested``): model
        ``key``, ``ckpt_key``, ``reason`` and ``confidence`` (name similarity, 0 to 1)."""
        return self._suggestions.copy()

    @property
    def ambiguous(self) -> pd.DataFrame:
        """Keys with several equally plausible partners, left unpaired on purpose: ``side`` (model or
        checkpoint), ``key``, ``candidates`` and ``reason``. Pair one with ``rules=`` if you know which."""
        return self._ambiguous.copy()

    def accept(self, keys: Iterable[str] | None = None) -> Report:
        """A new report in which the suggestions for ``keys`` (model keys; default: all) are matches
        (rule ``accepted: <reason>``), so that ``load_partial`` loads them."""
        sugg = self._suggestions
        wanted = sugg["key"].tolist() if keys is None else list(dict.fromkeys(keys))
        unknown = sorted(set(wanted) - set(sugg["key"]))
        if unknown:
            raise ModelError(f"no suggestion for {unknown[:5]}; the suggested keys are in report.suggestions "
                             f"({len(sugg)}: {sugg['key'].tolist()[:5]})")
        reason = dict(zip(sugg["key"], sugg["reason"]))
        frame = self.frame.copy()
        rows = frame["key"].isin(wanted).to_numpy() & (frame["status"] == "suggested").to_numpy()
        same = (frame["model_dtype"] == frame["ckpt_dtype"]).to_numpy()
        frame.loc[rows, "status"] = np.where(same[rows], "match", "dtype_mismatch")
        frame.loc[rows, "rule"] = ["accepted: " + reason[k] for k in frame.loc[rows, "key"]]
        rest = sugg[~sugg["key"].isin(wanted)].reset_index(drop=True)
        return self._with(frame, suggestions=rest)

    def adapt(self, keys: str | Iterable[str], method: str, **options) -> Report:
        """A new report in which the rows ``keys`` (model keys whose shapes differ) load through an
        adaptation: ``"slice"``, ``"channels"``, ``"resample"`` or ``"reinit"`` (see :mod:`ckptviz.adapt`;
        options such as ``prefix_tokens=1``, ``grid=(16, 16)``). Status ``adapted``, and the ``rule``
        column says what will be written; ``load_partial`` loads them with the rest, atomically."""
        from .adapt import plan

        keys = [keys] if isinstance(keys, str) else list(dict.fromkeys(keys))
        frame = self.frame.copy()
        at = dict(zip(frame["key"], range(len(frame))))
        unknown = [k for k in keys if k not in at]
        if unknown:
            raise ModelError(f"not model keys of this report: {unknown[:5]}; pass the report's 'key' column")
        done = dict(self.adaptations)
        status_at, rule_at = frame.columns.get_loc("status"), frame.columns.get_loc("rule")
        for k in keys:
            row = frame.iloc[at[k]]
            if row["status"] not in ("shape_mismatch", "adapted"):
                raise AdaptError(f"{self.checkpoint.path}: {k!r} is {row['status']}, not a shape mismatch: only "
                                 "rows whose shapes differ are adapted")
            try:
                done[k] = plan(method, row["ckpt_shape"], row["model_shape"], **options)
            except AdaptError as e:
                raise AdaptError(f"{self.checkpoint.path}: {k!r} ({row['ckpt_key']} {tuple(row['ckpt_shape'])} -> "
                                 f"{tuple(row['model_shape'])}): {e}") from None
            frame.iat[at[k], status_at] = "adapted"
            frame.iat[at[k], rule_at] = "adapted: " + done[k].text
        return self._with(frame, adaptations=done)

    def combine(self, key: str, ckpt_keys, how: str = "stack", dim: int = 0, **inner) -> Report:
        """A new report in which model tensor ``key`` loads from the unexpected checkpoint tensors
        ``ckpt_keys`` stacked (``how="stack"``, a new dimension ``dim``) or concatenated (``"concat"``),
        in the order given: per-expert MoE weights into one stacked tensor; lists of lists join each
        list first (``inner=``, ``inner_dim=``; see :func:`ckptviz.layouts.combine`). Checked exactly first."""
        from .layouts import combine

        return combine(self, key, list(ckpt_keys), how, dim, **inner)

    def split(self, ckpt_key: str, keys: Iterable[str], dim: int = 0) -> Report:
        """A new report in which the model tensors ``keys`` load from consecutive pieces of the one
        unexpected checkpoint tensor ``ckpt_key`` along ``dim`` (a fused qkv into q, k, v)."""
        from .layouts import split

        return split(self, ckpt_key, list(keys), dim)

    def stack_suggestions(self) -> pd.DataFrame:
        """Missing model tensors that a group of unexpected checkpoint tensors stacks into exactly
        (see :func:`ckptviz.layouts.stack_suggestions`); apply one with :meth:`combine`."""
        from .layouts import stack_suggestions

        return stack_suggestions(self)

    def _with(self, frame: pd.DataFrame, **changes) -> Report:
        parts = {"suggestions": self._suggestions, "ambiguous": self._ambiguous, "adaptations": self.adaptations}
        parts.update(changes)
        return Report(frame, self.checkpoint, self.section, [Rule(*r) for r in self.rules], **parts)

    @property
    def summary(self) -> dict[str, int]:
        counts = self.frame["status"].value_counts()
        return {s: int(counts.get(s, 0)) for s in STATUSES}

    @property
    def loadable(self) -> list[str]:
        """Model keys that ``load_partial`` loads by default (match and dtype_mismatch rows, and adapted
        rows whose adaptation writes something)."""
        ok = self.frame["status"].isin(["match", "dtype_mismatch"])
        keys = self.frame.loc[ok, "key"].tolist()
        return keys + [k for k, a in self.adaptations.items() if a.loads]

    def device_moves(self) -> pd.DataFrame:
        """For the loadable rows: how many tensors go from each saved device to each model device."""
        rows = self.frame[self.frame["status"].isin(["match", "dtype_mismatch"])]
        moves = rows.groupby(["ckpt_device", "model_device"]).size().rename("tensors").reset_index()
        return moves.sort_values("tensors", ascending=False, ignore_index=True)

    def problems(self) -> pd.DataFrame:
        """The rows that are not a clean match."""
        return self.frame[self.frame["status"] != "match"]

    @property
    def folding(self) -> Folding:
        """How the rows fold into layer patterns (by model key, or checkpoint key where there is none)."""
        if getattr(self, "_folding", None) is None:
            self._folding = fold_keys(self.frame["key"].fillna(self.frame["ckpt_key"]).tolist())
        return self._folding

    def grouped(self) -> pd.DataFrame:
        """One row per layer pattern (keys that differ only in numeric indices): pattern, keys, how many
        rows of each status, every distinct shape and dtype on both sides, grid and note."""
        status = self.frame["status"].to_numpy()
        return group_frame(self.frame, self.folding, counts={s: status == s for s in STATUSES},
                           distinct=["model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype"])

    def styled(self, frame: pd.DataFrame | None = None):
        """A pandas Styler of ``frame`` (default: the whole report) coloured by status."""
        frame = self.frame if frame is None else frame
        return (
            frame.style.apply(lambda row: [_row_style(row)] * len(row), axis=1)
            .format(na_rep="—")
            .hide(axis="index")
        )

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.summary.items() if v)
        return f"Report({self.checkpoint.path!r}, section={self.section!r}, {counts})"

    def to_html(self, path: Any, **kw: Any) -> Any:
        """Write this report to ``path`` as one self-contained HTML file and return its Path; ``kw``
        as for :func:`ckptviz.html_report.write_report` (``title``, ``plots``, ``model``)."""
        from .html_report import write_report

        return write_report(self, path, **kw)

    def _summary_html(self) -> str:
        badges = " ".join(
            f"<span style='background:{STATUS_COLOURS[s]};padding:2px 6px;border-radius:3px'>{s}: {n}</span>"
            for s, n in self.summary.items()
        )
        rules = "".join(f"<li><code>{html.escape(str(Rule(*r)))}</code></li>" for r in self.rules)
        rules = f"<p>rename rules applied:</p><ul>{rules}</ul>" if rules else ""
        section = html.escape(self.section or "(top level)")
        return f"<p><b>{html.escape(str(self.checkpoint.path))}</b> [{section}]</p><p>{badges}</p>{rules}"

    def _repr_html_(self) -> str:
        if len(self.frame) > FOLD_THRESHOLD:
            return self._grouped_html()
        frame = pd.concat([self.problems(), self.frame[self.frame["status"] == "match"]])
        note = ""
        if len(frame) > HTML_ROW_LIMIT:
            note = f"<p>showing {HTML_ROW_LIMIT} of {len(frame)} rows, problems first; see <code>.frame</code></p>"
            frame = frame.head(HTML_ROW_LIMIT)
        return f"<div class='ckptviz-report'>{self._summary_html()}{note}{self.styled(frame).to_html()}</div>"


    def _grouped_html(self) -> str:
        groups = self.grouped()
        bad = groups["keys"] != groups["match"]
        groups = pd.concat([groups[bad], groups[~bad]])
        note = (f"<p>{len(self.frame)} rows folded into {len(groups)} layer patterns, problems first"
                + (f"; showing {HTML_ROW_LIMIT}" if len(groups) > HTML_ROW_LIMIT else "")
                + "; see <code>.grouped()</code> and <code>.frame</code></p>")
        table = groups.head(HTML_ROW_LIMIT).style.format(na_rep="—").hide(axis="index").to_html()
        return f"<div class='ckptviz-report ckptviz-folded'>{self._summary_html()}{note}{table}</div>"


def _row_style(row: pd.Series) -> str:
    style = f"background-color: {STATUS_COLOURS[row['status']]}"
    return style + "; color: #b00020; font-weight: bold" if row.get("nonfinite") is True else style


def is_lazy(t: torch.Tensor) -> bool:
    """Whether ``t`` is an uninitialized lazy parameter or buffer (``nn.LazyLinear`` before its first
    forward): it has no shape yet, and takes the checkpoint's, as torch's ``load_state_dict`` does."""
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


class _ModelColumns:
    """The model side of the frame, read once per :func:`compare` (and reused for every section).
    An uninitialized lazy tensor's shape is None (unknown); ``lazy`` marks those rows."""

    def __init__(self, live: dict[str, torch.Tensor]):
        tensors = list(live.values())
        n = len(tensors)
        self.keys = list(live)
        if any(issubclass(cls, nn.parameter.UninitializedTensorMixin) for cls in set(map(type, tensors))):
            self.lazy = np.fromiter(map(is_lazy, tensors), dtype=bool, count=n)
            shapes = (None if lazy else tuple(t.shape) for t, lazy in zip(tensors, self.lazy.tolist()))
        else:
            self.lazy = np.zeros(n, dtype=bool)
            shapes = _tuples(map(operator.attrgetter("shape"), tensors))
        self.shape = _objects(shapes, n)
        self.dtype = _named(list(map(operator.attrgetter("dtype"), tensors)), dtype_name)
        self.device = _named(list(map(operator.attrgetter("device"), tensors)), str)


def _tuples(sizes: Iterable[torch.Size]) -> list[tuple[int, ...]]:
    """Each ``torch.Size`` as a plain tuple, one tuple object per distinct shape (fewer objects: 3x faster)."""
    made: dict[torch.Size, tuple[int, ...]] = {}
    get, add = made.get, made.setdefault
    return [get(s) or add(s, tuple(s)) for s in sizes]


def _objects(values: Iterable[Any], count: int = -1) -> np.ndarray:
    """A 1-d object array of ``values`` (tuples stay single cells)."""
    return np.fromiter(values, dtype=object, count=count)


def _named(values: list[Any], name) -> np.ndarray:
    """``[name(v) for v in values]`` as an object array, calling ``name`` once per distinct value."""
    names = {v: name(v) for v in set(values)}
    return _objects(map(names.__getitem__, values), len(values))


def _taken(column: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``column[index]`` with None where ``index`` is -1."""
    padded = np.empty(len(column) + 1, dtype=object)
    padded[:-1] = column
    return padded[index]


def _rule_texts(al: Alignment, at: np.ndarray) -> np.ndarray:
    """The ``rule`` cell of each row: the rules that renamed its checkpoint key (row ``at``), or None."""
    texts = _objects(["; ".join(map(str, rules)) for rules in al.rule_sets] + [None])
    return texts[np.append(al.rule_row, -1)[at]]


CKPT_SIDE = ("shape", "dtype", "device")  # the columns of Checkpoint.tensors() the frame uses
_STATUS = _objects(("match", "dtype_mismatch", "shape_mismatch", "missing"))


def _in_order(tensors: pd.DataFrame, entries: dict[str, Any]) -> pd.DataFrame:
    """``tensors`` with its rows in the section's own key order (unexpected rows keep that order)."""
    index = tensors.index.to_numpy(dtype=object)
    if len(index) == len(entries) and all(map(operator.eq, index, entries)):
        return tensors
    return tensors.reindex(list(entries))


def _build_frame(model: _ModelColumns, tensors: pd.DataFrame, al: Alignment) -> pd.DataFrame:
    """One row per model key (model order), then one per unpaired checkpoint key (checkpoint order);
    ``tensors`` rows are in the order of the checkpoint keys that ``al`` was computed from."""
    at = al.ckpt_row
    saved = [tensors.index.to_numpy(dtype=object), *(tensors[c].to_numpy(dtype=object) for c in CKPT_SIDE)]
    c_key, c_shape, c_dtype, c_device = (_taken(col, at) for col in saved)
    code = np.where((model.shape != c_shape) & ~model.lazy, 2, (model.dtype != c_dtype).astype(np.int64))
    code[at < 0] = 3
    unexpected = np.ones(len(tensors), dtype=bool)
    unexpected[at[at >= 0]] = False
    extra = tensors[unexpected]
    n = len(extra)
    none = np.full(n, None, dtype=object)
    columns = {
        "key": (_objects(model.keys, len(model.keys)), none),
        "ckpt_key": (c_key, extra.index.to_numpy(dtype=object)),
        "status": (_STATUS[code], np.full(n, "unexpected", dtype=object)),
        "model_shape": (model.shape, none),
        "ckpt_shape": (c_shape, extra["shape"].to_numpy(dtype=object)),
        "model_dtype": (model.dtype, none),
        "ckpt_dtype": (c_dtype, extra["dtype"].to_numpy(dtype=object)),
        "model_device": (model.device, none),
        "ckpt_device": (c_device, extra["device"].to_numpy(dtype=object)),
        "rule": (_rule_texts(al, at), none),
    }
    frame = {c: np.concatenate(parts) for c, parts in columns.items()}
    names = COLUMNS
    if model.lazy.any():  # the column exists only for models with uninitialized lazy tensors
        frame["model_lazy"] = np.concatenate([model.lazy, np.zeros(n, dtype=bool)]).astype(object)
        names = [*COLUMNS, "model_lazy"]
    return pd.DataFrame(frame, columns=names, dtype=object, copy=False)  # empty cells stay None


def compare(
    model: nn.Module,
    source: Any,
    *,
    section: str | None = None,
    rules: Iterable[tuple[str, str]] | None = None,
    auto_align: bool = True,
    stats: bool = False,
) -> Report:
    """Compare ``model`` with a checkpoint (a path, a Checkpoint, or a mapping of tensors).

    With ``section=None`` every weights section is tried and the one pairing the most keys wins
    (ties go to the better-ranked name). ``rules`` are (regex, replacement) renames applied to
    checkpoint keys first; ``auto_align`` infers prefix and wrapper renames on top of them.
    ``stats=True`` adds ``ckpt_*`` and ``model_*`` statistics (mean, std, min, max, nan, inf), a
    ``nonfinite`` flag (NaN/Inf on either side) and ``still_initial``: a model tensor that still holds
    exactly the value it had before ckptviz's first load into this model (it was never loaded).
    """
    with paused_gc():  # ~10^5 small objects per 10^5 keys, none in cycles: no collection walks the heap meanwhile
        return _compare(model, source, section, rules, auto_align, stats)


def _compare(model: nn.Module, source: Any, section: str | None, rules, auto_align: bool, stats: bool) -> Report:
    live = model_tensors(model)
    ck = as_checkpoint(source)
    names = [ck.resolve(section)] if section is not None else ck.sections or [ck.resolve(None)]
    keys, best = KeyIndex(live), None
    for name in names:
        entries = ck._section(name)

        def same_shape(c: str, m: str, entries=entries) -> bool:
            return is_lazy(live[m]) or tuple(live[m].shape) == tensor_info(entries[c])[0]

        al = align(keys, list(entries), rules=rules, auto=auto_align, same_shape=same_shape)
        if best is None or al.paired > best[1].paired:
            best = (name, al)
    name, al = best
    columns, tensors = _ModelColumns(live), _in_order(ck.tensors(name), ck._section(name))
    inferred = None
    if auto_align:
        def norms() -> set[str]:
            return {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}

        inferred = infer(al, columns.shape, tensors["shape"].to_numpy(dtype=object), columns.dtype,
                         tensors["dtype"].to_numpy(dtype=object), norms)
    frame = _build_frame(columns, tensors, al)
    suggestions = ambiguous = None
    if inferred is not None and (inferred.suggested or inferred.ambiguous):
        frame, suggestions, ambiguous = _with_suggestions(frame, al, inferred)
    if stats:
        frame = _with_stats(frame, ck, name, model, live)
    return Report(frame, ck, name, al.rules, suggestions, ambiguous)


def _with_suggestions(frame: pd.DataFrame, al: Alignment, inferred: Inferred
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The frame with each suggestion's model row filled from its checkpoint key (status
    ``suggested``, that key's unexpected row removed), ambiguous rows saying so in ``rule``."""
    n_model = len(al.model_keys)
    unexpected = np.ones(len(al.ckpt_keys), dtype=bool)
    unexpected[al.ckpt_row[al.ckpt_row >= 0]] = False
    frame_row = n_model + np.cumsum(unexpected) - 1  # checkpoint row -> its unexpected row in the frame
    frame = frame.copy()
    drop = []
    for m, c, reason, _ in inferred.suggested:
        src = frame_row[c]
        for col in ("ckpt_key", "ckpt_shape", "ckpt_dtype", "ckpt_device"):
            frame.iat[m, frame.columns.get_loc(col)] = frame.iat[src, frame.columns.get_loc(col)]
        frame.iat[m, frame.columns.get_loc("status")] = "suggested"
        frame.iat[m, frame.columns.get_loc("rule")] = "suggested: " + reason
        drop.append(src)
    rule_at = frame.columns.get_loc("rule")
    model_at = dict(zip(al.model_keys.tolist(), range(n_model)))
    ckpt_at = dict(zip(al.ckpt_keys.tolist(), range(len(al.ckpt_keys))))
    for side, key, candidates, why in inferred.ambiguous:
        row = model_at[key] if side == "model" else frame_row[ckpt_at[key]]
        frame.iat[row, rule_at] = f"ambiguous: {why}: " + ", ".join(candidates)
    frame = frame.drop(index=frame.index[drop]).reset_index(drop=True)
    mk, ck = al.model_keys, al.ckpt_keys
    suggestions = pd.DataFrame([(mk[m], ck[c], r, conf) for m, c, r, conf in inferred.suggested],
                               columns=SUGGESTION_COLUMNS)
    ambiguous = pd.DataFrame(inferred.ambiguous, columns=AMBIGUOUS_COLUMNS)
    return frame, suggestions, ambiguous


STAT_COLUMNS = ("mean", "std", "min", "max", "nan", "inf")


def _with_stats(frame: pd.DataFrame, ck: Checkpoint, section: str, model: nn.Module,
                live: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Add checkpoint and model statistics, a ``nonfinite`` flag and a ``still_initial`` flag."""
    from .provenance import still_initial
    from .stats import tensor_stats

    ck_stats = ck.stats(section)
    live = {k: t for k, t in live.items() if not is_lazy(t)}  # no values yet: no statistics (NaN)
    model_stats = {k: tensor_stats(t.detach()) for k, t in live.items()}
    initial = still_initial(model, live)
    out = frame.copy()
    for col in STAT_COLUMNS:
        out[f"ckpt_{col}"] = [ck_stats.at[c, col] if isinstance(c, str) else float("nan") for c in frame["ckpt_key"]]
        out[f"model_{col}"] = [model_stats[k][col] if k in model_stats else float("nan") for k in frame["key"]]
    bad = out[["ckpt_nan", "ckpt_inf", "model_nan", "model_inf"]].fillna(0).sum(axis=1) > 0
    out["nonfinite"] = bad
    out["still_initial"] = [bool(initial.get(k, False)) if isinstance(k, str) else False for k in frame["key"]]
    return out
