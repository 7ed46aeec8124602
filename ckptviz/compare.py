"""``compare()``: line a checkpoint section up with a live model and classify every key, giving a
:class:`Report` whose DataFrame is what the table widget and ``load_partial`` work from."""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch
from torch import nn

from .align import Alignment, Rule, align
from .checkpoint import Checkpoint, as_checkpoint, dtype_name, tensor_info
from .errors import ModelError

STATUSES = ("match", "shape_mismatch", "dtype_mismatch", "missing", "unexpected")
COLUMNS = ["key", "ckpt_key", "status", "model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype",
           "model_device", "ckpt_device", "rule"]
STATUS_COLOURS = {
    "match": "#e3f4e6", "shape_mismatch": "#fbd9d7", "dtype_mismatch": "#fff1c2",
    "missing": "#ffe3cc", "unexpected": "#e2e6f7",
}
HTML_ROW_LIMIT = 200


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors (parameters and persistent buffers), as live objects."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


class Report:
    """The result of :func:`compare`: one row per model key and per unmatched checkpoint key."""

    def __init__(self, frame: pd.DataFrame, checkpoint: Checkpoint, section: str, rules: list[Rule]):
        self.frame = frame
        self.checkpoint = checkpoint
        self.section = section
        self.rules = [r.as_tuple() for r in rules]

    @property
    def summary(self) -> dict[str, int]:
        counts = self.frame["status"].value_counts()
        return {s: int(counts.get(s, 0)) for s in STATUSES}

    @property
    def loadable(self) -> list[str]:
        """Model keys that ``load_partial`` loads by default (match and dtype_mismatch rows)."""
        ok = self.frame["status"].isin(["match", "dtype_mismatch"])
        return self.frame.loc[ok, "key"].tolist()

    def device_moves(self) -> pd.DataFrame:
        """For the loadable rows: how many tensors go from each saved device to each model device."""
        rows = self.frame[self.frame["status"].isin(["match", "dtype_mismatch"])]
        moves = rows.groupby(["ckpt_device", "model_device"]).size().rename("tensors").reset_index()
        return moves.sort_values("tensors", ascending=False, ignore_index=True)

    def problems(self) -> pd.DataFrame:
        """The rows that are not a clean match."""
        return self.frame[self.frame["status"] != "match"]

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
        frame = pd.concat([self.problems(), self.frame[self.frame["status"] == "match"]])
        note = ""
        if len(frame) > HTML_ROW_LIMIT:
            note = f"<p>showing {HTML_ROW_LIMIT} of {len(frame)} rows, problems first; see <code>.frame</code></p>"
            frame = frame.head(HTML_ROW_LIMIT)
        return f"<div class='ckptviz-report'>{self._summary_html()}{note}{self.styled(frame).to_html()}</div>"


def _row_style(row: pd.Series) -> str:
    style = f"background-color: {STATUS_COLOURS[row['status']]}"
    return style + "; color: #b00020; font-weight: bold" if row.get("nonfinite") is True else style


def _status(m_shape, c_shape, m_dtype, c_dtype) -> str:
    if m_shape != c_shape:
        return "shape_mismatch"
    return "match" if m_dtype == c_dtype else "dtype_mismatch"


def _build_frame(model: dict[str, torch.Tensor], entries: dict[str, Any], al: Alignment) -> pd.DataFrame:
    by_model = {m: c for c, m in al.pairs.items()}
    rows = []
    for key, t in model.items():
        m_shape, m_dtype, m_device = tuple(t.shape), dtype_name(t.dtype), str(t.device)
        c = by_model.get(key)
        if c is None:
            rows.append((key, None, "missing", m_shape, None, m_dtype, None, m_device, None, None))
            continue
        c_shape, c_dtype, c_device, _, _ = tensor_info(entries[c])
        rule = "; ".join(str(r) for r in al.rule_of.get(c, [])) or None
        rows.append((key, c, _status(m_shape, c_shape, m_dtype, c_dtype), m_shape, c_shape,
                     m_dtype, c_dtype, m_device, c_device, rule))
    for c, v in entries.items():
        if c not in al.pairs:
            c_shape, c_dtype, c_device, _, _ = tensor_info(v)
            rows.append((None, c, "unexpected", None, c_shape, None, c_dtype, None, c_device, None))
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)  # empty cells stay None


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
    live = model_tensors(model)
    ck = as_checkpoint(source)
    names = [ck.resolve(section)] if section is not None else ck.sections or [ck.resolve(None)]
    best = None
    for name in names:
        entries = ck._section(name)

        def same_shape(c: str, m: str, entries=entries) -> bool:
            return tuple(live[m].shape) == tensor_info(entries[c])[0]

        al = align(list(live), list(entries), rules=rules, auto=auto_align, same_shape=same_shape)
        if best is None or len(al.pairs) > len(best[2].pairs):
            best = (name, entries, al)
    name, entries, al = best
    frame = _build_frame(live, entries, al)
    if stats:
        frame = _with_stats(frame, ck, name, model, live)
    return Report(frame, ck, name, al.rules)


STAT_COLUMNS = ("mean", "std", "min", "max", "nan", "inf")


def _with_stats(frame: pd.DataFrame, ck: Checkpoint, section: str, model: nn.Module,
                live: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Add checkpoint and model statistics, a ``nonfinite`` flag and a ``still_initial`` flag."""
    from .provenance import still_initial
    from .stats import tensor_stats

    ck_stats = ck.stats(section)
    model_stats = {k: tensor_stats(t.detach()) for k, t in live.items()}
    initial = still_initial(model, live)
    out = frame.copy()
    for col in STAT_COLUMNS:
        out[f"ckpt_{col}"] = [ck_stats.at[c, col] if isinstance(c, str) else float("nan") for c in frame["ckpt_key"]]
        out[f"model_{col}"] = [model_stats[k][col] if isinstance(k, str) else float("nan") for k in frame["key"]]
    bad = out[["ckpt_nan", "ckpt_inf", "model_nan", "model_inf"]].fillna(0).sum(axis=1) > 0
    out["nonfinite"] = bad
    out["still_initial"] = [bool(initial.get(k, False)) if isinstance(k, str) else False for k in frame["key"]]
    return out
