"""``write_report()``: one self-contained HTML file for a report, to attach to a pull request or a bug
report. Header (files, format, section, model class, ckptviz version, date), counts by status, the rename
rules applied, figures inline as base64 PNG, CSS inline, and the table: every row when small; above
``FOLD_THRESHOLD`` rows, one plain-HTML ``<details>`` per layer pattern (``ckptviz.fold``) that expands to
its rows; never more than ``ROW_LIMIT`` rows and ``GROUP_LIMIT`` patterns, saying how many were left out.
Problem rows come first. The page has no script, refers to no URL, and forbids both in its
Content-Security-Policy; every key and path is HTML-escaped. A report type takes part through a
``_report_parts()`` method returning :class:`ReportParts`, or a builder given to :func:`register`
(how :class:`~ckptviz.compare.Report` and :class:`~ckptviz.diff.DiffReport` do). Headless: matplotlib
(Agg) only, never ipywidgets."""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .fold import FOLD_THRESHOLD, Folding, fold_keys, group_frame, shape_text

ROW_LIMIT = 5000  # rows written in all (flat, or inside the folded groups)
GROUP_LIMIT = 1000  # layer patterns written when folded
GROUP_ROWS = 50  # rows written inside one folded group (problems first)

Builder = Callable[[Any], "ReportParts"]
_BUILDERS: dict[str, Builder] = {}  # "module.QualName" of a report class -> its builder


@dataclass
class ReportParts:
    """What a report type hands :func:`write_report`.

    ``frame`` is in display order (problems first); ``problem`` flags its rows that are not clean;
    ``status`` names its status column, coloured by ``colours`` (status -> CSS colour, in display order);
    ``keys`` is the key of each row that folding groups by; ``folding`` may give that folding ready-made
    (aligned with ``frame``'s rows); ``distinct`` are the columns whose distinct values a folded group
    line shows. ``formats`` turn cells of some columns into text (default: shapes as ``(2, 3)``, floats
    with 4 significant digits, empty as "—"). ``figures`` are (caption, function building a matplotlib
    Figure), built only when plots are wanted."""

    kind: str
    title: str
    meta: list[tuple[str, str]]
    counts: dict[str, int]
    colours: dict[str, str]
    frame: pd.DataFrame
    problem: np.ndarray
    keys: Sequence[str]
    status: str = "status"
    rules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    distinct: list[str] = field(default_factory=list)
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)
    figures: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    folding: Folding | None = None
    show_rules: bool = True  # the "rename rules applied" section (reports that align keys)
    table_title: str = "Keys"


def register(cls: type | str, builder: Builder) -> None:
    """Make :func:`write_report` accept instances of ``cls`` (a class, or its ``"module.QualName"``, so
    that registering imports nothing): ``builder(obj)`` returns their ReportParts."""
    _BUILDERS[cls if isinstance(cls, str) else _qualified(cls)] = builder


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def report_parts(obj: Any) -> ReportParts:
    """The parts of ``obj``: its own ``_report_parts()``, else the builder registered for its class."""
    if hasattr(obj, "_report_parts"):
        return obj._report_parts()
    for cls in type(obj).__mro__:
        builder = _BUILDERS.get(_qualified(cls))
        if builder is not None:
            return builder(obj)
    known = ", ".join(sorted(name.rsplit(".", 1)[-1] for name in _BUILDERS))
    raise TypeError(f"write_report: no HTML report for a {type(obj).__name__}; it takes {known}, or any object "
                    "with a _report_parts() method (see ckptviz.html_report.ReportParts)")


def write_report(obj: Any, path: str | os.PathLike, *, title: str | None = None, plots: bool = True,
                 model: Any = None) -> Path:
    """Write ``obj`` (a compare Report, a DiffReport, ...) to ``path`` as one self-contained HTML file
    and return its path. ``title`` replaces the default heading; ``plots=False`` leaves the figures out
    (faster); ``model`` (the module compared, or a class name) is named in the header, since a Report
    does not keep it."""
    parts = report_parts(obj)
    if model is not None:
        name = model if isinstance(model, str) else f"{type(model).__module__}.{type(model).__qualname__}"
        parts.meta.insert(0, ("model class", name))
    out = Path(path)
    out.write_text(render(parts, title=title, plots=plots), encoding="utf-8")
    return out


# ---- the page --------------------------------------------------------------------------------------
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1300px;
padding:0 1em;color:#222}
h1{font-size:1.4em;margin:0 0 .4em;word-break:break-all}h2{font-size:1.12em;margin:1.4em 0 .5em}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:0}dl.meta dt{color:#666}
dl.meta dd{margin:0;word-break:break-all}
ul.counts{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.4em}
ul.counts li{border:1px solid #ccc;border-radius:4px;padding:.2em .6em}ul.counts b{margin-left:.3em}
code,td,summary .pattern{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
table{border-collapse:collapse;margin:.3em 0}th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;
vertical-align:top}th{background:#f4f4f4;position:sticky;top:0}td{overflow-wrap:anywhere}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}figure img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em}p.note{color:#555}
details{border:1px solid #ddd;border-radius:4px;margin:.25em 0;padding:.15em .5em}
details.problem{border-color:#d9534f}summary{cursor:pointer}summary .n{color:#555;margin-left:.6em}
summary .badge{border-radius:3px;padding:0 .4em;margin-left:.35em;font-size:.9em;border:1px solid #ccc}
summary .shapes{color:#555;margin-left:.6em;font-size:.9em}footer{margin-top:2em;color:#888;font-size:.85em}
"""


def render(parts: ReportParts, *, title: str | None = None, plots: bool = True) -> str:
    """The whole HTML page of ``parts``."""
    esc = html.escape
    heading = title or parts.title
    css = CSS + "".join(f".st-{_css_name(s)}{{background:{c}}}" for s, c in parts.colours.items())
    meta = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in parts.meta)
    counts = "".join(f"<li class='st-{_css_name(s)}' data-status='{esc(s)}'>{esc(s)}<b>{n:,}</b></li>"
                     for s, n in parts.counts.items())
    rules = "".join(f"<li><code>{esc(r)}</code></li>" for r in parts.rules) or "<li>none</li>"
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in parts.notes)
    body = [
        f"<header><h1>{esc(heading)}</h1><dl class='meta'>{meta}</dl></header>",
        f"<section id='counts'><h2>Counts by {esc(parts.status)} ({len(parts.frame):,} rows)</h2>"
        f"<ul class='counts'>{counts}</ul>{notes}</section>",
    ]
    if parts.show_rules:
        body.append(f"<section id='rules'><h2>Rename rules applied</h2><ul>{rules}</ul></section>")
    if plots and parts.figures:
        body.append(f"<section id='plots'><h2>Figures</h2>{_figures(parts.figures)}</section>")
    body.append(f"<section id='table'><h2>{esc(parts.table_title)}</h2>{_table_section(parts)}</section>")
    body.append(f"<footer>Written by ckptviz; self-contained: no scripts, no network requests. "
                f"{esc(parts.kind)} report.</footer>")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(heading)}</title><style>{css}</style></head>\n<body class='ckptviz-html-report'>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _css_name(status: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(status))


def _figures(figures: list[tuple[str, Callable[[], Any]]]) -> str:
    from .plots import figure_to_png

    out = []
    for caption, build in figures:
        png = base64.b64encode(figure_to_png(build())).decode("ascii")
        out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "".join(out)


def _table_section(parts: ReportParts) -> str:
    frame = parts.frame
    if len(frame) <= FOLD_THRESHOLD:
        shown = frame.head(ROW_LIMIT)
        left = len(frame) - len(shown)
        note = f"<p class='note'>{len(frame):,} rows, problems first.</p>" if len(frame) else "<p>no rows</p>"
        if left:
            note += f"<p class='note'>{left:,} rows left out (only {ROW_LIMIT:,} are written).</p>"
        return note + _rows_table(parts, shown)
    return _folded(parts)


def _rows_table(parts: ReportParts, frame: pd.DataFrame) -> str:
    esc = html.escape
    columns = list(frame.columns)
    head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
    cells = [[_formatter(parts, c)(v) for v in frame[c].tolist()] for c in columns]
    statuses = frame[parts.status].tolist()
    rows = [f"<tr class='st-{_css_name(s)}'>" + "".join(f"<td>{esc(col[i])}</td>" for col in cells) + "</tr>"
            for i, s in enumerate(statuses)]
    return f"<table class='rows'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _formatter(parts: ReportParts, column: str) -> Callable[[Any], str]:
    fmt = parts.formats.get(column)
    if fmt is not None:
        return lambda v: "—" if _empty(v) else fmt(v)
    return _cell


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(v: Any) -> str:
    if _empty(v):
        return "—"
    if isinstance(v, tuple):
        return shape_text(v)
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def _folded(parts: ReportParts) -> str:
    """One ``<details>`` per layer pattern (groups holding problems first), each with up to
    ``GROUP_ROWS`` of its rows, within ``GROUP_LIMIT`` groups and ``ROW_LIMIT`` rows in all."""
    frame = parts.frame.reset_index(drop=True)
    folding = parts.folding or fold_keys(list(parts.keys))
    statuses = frame[parts.status].to_numpy(dtype=object)
    names = list(parts.colours) + [s for s in pd.unique(statuses) if s not in parts.colours]
    groups = group_frame(frame, folding, counts={s: statuses == s for s in names}, distinct=parts.distinct)
    codes = folding.codes
    g = len(folding)
    bad = np.bincount(codes, weights=parts.problem.astype(np.float64), minlength=g) > 0
    first = np.full(g, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    order = np.lexsort((first, ~bad))  # groups holding problems first, then by first row (display order)
    members = np.argsort(codes, kind="stable")  # rows of each group, in display order (problems first)
    starts = np.concatenate([[0], np.cumsum(folding.sizes)])
    written, blocks = 0, []
    for grp in order[:GROUP_LIMIT].tolist():
        rows = members[starts[grp]:starts[grp + 1]]
        take = rows[:max(0, min(GROUP_ROWS, ROW_LIMIT - written))]
        written += len(take)
        blocks.append(_group_block(parts, groups.iloc[grp], names, bool(bad[grp]), frame.iloc[take], len(rows)))
    groups_left = max(0, g - GROUP_LIMIT)
    rows_left = len(frame) - written
    note = (f"<p class='note'>{len(frame):,} rows folded into {g:,} layer patterns (keys that differ only in "
            f"numeric indices), patterns holding problems first; click a pattern to see its rows.</p>")
    if groups_left or rows_left:
        note += (f"<p class='note left-out'>Written: {min(g, GROUP_LIMIT):,} of {g:,} patterns and {written:,} of "
                 f"{len(frame):,} rows; left out: {groups_left:,} patterns and {rows_left:,} rows (at most "
                 f"{GROUP_ROWS} rows per pattern and {ROW_LIMIT:,} in all are written).</p>")
    return note + "".join(blocks)


def _group_block(parts: ReportParts, group: pd.Series, names: list[str], bad: bool, rows: pd.DataFrame,
                 size: int) -> str:
    esc = html.escape
    badges = "".join(f"<span class='badge st-{_css_name(s)}'>{esc(s)} {int(group[s]):,}</span>"
                     for s in names if int(group[s]))
    shapes = "; ".join(f"{c}: {group[c]}" for c in parts.distinct if group[c])
    note = f" — {group['note']}" if group["note"] else ""
    left = size - len(rows)
    more = f"<p class='note'>{left:,} more rows of this pattern not written.</p>" if left else ""
    return (f"<details class='group{' problem' if bad else ''}'><summary><span class='pattern'>"
            f"{esc(str(group['pattern']))}</span><span class='n'>{int(group['keys']):,} keys</span>{badges}"
            f"<span class='shapes'>{esc(shapes + note)}</span></summary>"
            f"{_rows_table(parts, rows)}{more}</details>")


# ---- the built-in report types --------------------------------------------------------------------
def _common_meta() -> list[tuple[str, str]]:
    try:
        from . import __version__ as version
    except ImportError:
        version = "unknown"
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return [("ckptviz version", str(version)), ("written", now)]


def _checkpoint_meta(ck: Any, section: str, label: str = "") -> list[tuple[str, str]]:
    prefix = f"{label} " if label else ""
    meta = [(f"{prefix}checkpoint", str(ck.path)), (f"{prefix}format", str(ck.format)),
            (f"{prefix}section", section or "(top level)")]
    files = getattr(ck, "files", None) or []
    if len(files) > 1:
        meta.append((f"{prefix}files", f"{len(files)} files"))
    scalars = [(k, v) for k, v in getattr(ck, "metadata", {}).items() if isinstance(v, (str, int, float, bool))]
    if scalars:
        meta.append((f"{prefix}metadata", ", ".join(f"{k}={v}" for k, v in scalars[:12])))
    return meta


def _compare_parts(rep: Any) -> ReportParts:
    from .align import Rule
    from .compare import STATUS_COLOURS
    from .plots import status_by_layer_figure

    frame = rep.frame
    problem = (frame["status"] != "match").to_numpy()
    order = np.concatenate([np.flatnonzero(problem), np.flatnonzero(~problem)])
    shown = frame.iloc[order].reset_index(drop=True)
    folding = None
    if len(frame) > FOLD_THRESHOLD:
        f = rep.folding
        folding = Folding(f.codes[order], f.patterns, f.sizes, f.grid, f.notes)
    notes = []
    if len(rep.suggestions):
        notes.append(f"{len(rep.suggestions)} suggested pairings (status 'suggested') are not loaded until accepted.")
    if len(rep.ambiguous):
        notes.append(f"{len(rep.ambiguous)} keys have several equally plausible partners and were left unpaired.")
    ck = rep.checkpoint
    notes += [f"warning: {w}" for w in getattr(ck, "warnings", [])]
    if getattr(ck, "unsafe_globals", None):
        notes.append("the file's pickle refers to classes beyond torch's allowlist: " + ", ".join(ck.unsafe_globals))
    return ReportParts(
        kind="compare", title=f"ckptviz compare: {ck.path}",
        meta=_checkpoint_meta(ck, rep.section) + _common_meta(),
        counts=rep.summary, colours=dict(STATUS_COLOURS), frame=shown, problem=problem[order],
        keys=shown["key"].fillna(shown["ckpt_key"]).tolist(),
        rules=[str(Rule(*r)) for r in rep.rules], notes=notes,
        distinct=["model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype"],
        figures=[("keys of each status per layer, in model order",
                  lambda: status_by_layer_figure(frame, STATUS_COLOURS))],
        folding=folding)


def _diff_parts(rep: Any) -> ReportParts:
    from .align import Rule
    from .diff import STATUS_COLOURS
    from .plots import diff_bar_figure, status_by_layer_figure

    ordered = rep.by_change()
    undefined = ordered["rel_l2"].isna() & (ordered["changed_frac"] > 0)  # a NaN appeared on one side
    bad = ((ordered["status"] != "both") | undefined).to_numpy()
    shown = pd.concat([ordered[bad], ordered[~bad]]).reset_index(drop=True)
    problem = np.concatenate([np.ones(int(bad.sum()), dtype=bool), np.zeros(int((~bad).sum()), dtype=bool)])
    compared = int(rep.frame["changed_frac"].notna().sum())
    changed = int((rep.frame["changed_frac"] > 0).sum())
    top = None if len(rep.frame) <= FOLD_THRESHOLD else 30
    caption = "relative change ||b − a|| / ||a|| per key, in model order"
    caption += f" (the {top} most changed)" if top else ""
    colours = {**STATUS_COLOURS, "both": "#cfe8d2"}  # the table's white "both" would not show in a figure
    frame = rep.frame
    return ReportParts(
        kind="diff", title=f"ckptviz diff: {rep.a.path} vs {rep.b.path}",
        meta=_checkpoint_meta(rep.a, rep.section_a, "a") + _checkpoint_meta(rep.b, rep.section_b, "b")
        + _common_meta(),
        counts=rep.summary, colours=dict(STATUS_COLOURS), frame=shown, problem=problem,
        keys=shown["key"].fillna(shown["key_b"]).tolist(),
        rules=[str(Rule(*r)) for r in rep.rules],
        notes=[f"values changed in {changed:,} of {compared:,} compared tensors"],
        distinct=["shape_a", "shape_b", "dtype_a", "dtype_b"],
        formats={"max_abs_diff": "{:.3g}".format, "rel_l2": "{:.3g}".format, "cosine": "{:.6f}".format,
                 "changed_frac": "{:.1%}".format},
        figures=[(caption, lambda: diff_bar_figure(frame, top=top)),
                 ("keys of each status per layer, in model order", lambda: status_by_layer_figure(frame, colours))])


def _series_parts(rep: Any) -> ReportParts:
    from .series import FLAG_COLOURS, FLAGS

    flags = rep.flags
    frame = pd.DataFrame({"key": flags["key"], "flag": flags["flag"], "checkpoint": flags["label"],
                          "detail": flags["detail"]})
    paths = [str(ck.path) for ck in rep.checkpoints if ck.path]
    run = os.path.commonpath(paths) if len(paths) == len(rep.checkpoints) else "checkpoints given in code"
    s = rep.summary
    meta = [("run", run), ("checkpoints", f"{s['checkpoints']}: {rep.labels[0]} .. {rep.labels[-1]}"),
            ("keys", f"{s['keys']:,}"), ("reference", f"each checkpoint against the {rep.reference} one"),
            ("norm_exploding", f"x{rep.explode:g} from one checkpoint to the next, or x{rep.explode ** 2:g} "
                               "since the first")]
    return ReportParts(
        kind="series", title=f"ckptviz series: {run}", meta=meta + _common_meta(),
        counts={f: s[f] for f in FLAGS}, colours=dict(FLAG_COLOURS), frame=frame.reset_index(drop=True),
        problem=np.ones(len(frame), dtype=bool), keys=frame["key"].tolist(), status="flag", show_rules=False,
        table_title="Flags (where each first holds)",
        notes=[f"{s['checkpoints']} checkpoints x {s['keys']:,} keys, each file read once"],
        figures=[("relative change per layer (rows, model order) and checkpoint (columns)", rep.heatmap),
                 ("norm of each layer over the run", rep.norms_plot)])


register("ckptviz.compare.Report", _compare_parts)
register("ckptviz.diff.DiffReport", _diff_parts)
register("ckptviz.series.SeriesReport", _series_parts)
