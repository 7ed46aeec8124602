"""``ckptviz series RUN/``: a training run checkpoint by checkpoint: flags (frozen layers, exploding norms,
NaN/Inf appearing) and the layers that moved most; ``--fail-on`` gates a CI job on them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import FAIL_CODE, UsageError
from .output import Output, fail_statuses, records

CONDITIONS = ("frozen", "norm_exploding", "nonfinite")


def run(args: Any) -> int:
    from ..series import diff_series

    fail = fail_statuses(args.fail_on, CONDITIONS)
    if args.html and not str(args.html).lower().endswith((".html", ".htm")):
        raise UsageError(f"--html {args.html!r} should end in .html (the report is one HTML page)")
    source: Any = args.paths[0] if len(args.paths) == 1 else args.paths
    out = Output(args)
    series = diff_series(source, reference=args.reference, section=args.section, order=args.order,
                         explode=args.explode, progress=False if args.quiet else None, trust=args.trust)
    flags = series.flags
    summary = series.summary
    failed = sorted(c for c in fail if summary.get(c))
    moved = _most_moved(series)
    if out.format == "json":
        out.json({"labels": series.labels, "steps": series.steps, "reference": series.reference,
                  "summary": summary, "failed_on": failed, "flags": records(flags, index=False),
                  "layers": records(moved)})
    elif out.format == "csv":
        out.csv(series.frame, index=False)
    else:
        out.line(f"{summary['checkpoints']} checkpoints: {series.labels[0]} .. {series.labels[-1]}  "
                 f"({summary['keys']:,} keys, each compared with the {series.reference} checkpoint)", style="bold")
        out.line("  ".join(f"{f}: {summary[f]:,}" for f in CONDITIONS))
        if len(flags):
            out.table(flags.set_index("key")[["flag", "label", "detail"]], "flags", styles={"flag": _flag_style})
        out.table(moved, "layers, most moved over the run first")
    if args.html:
        written = series.to_html(args.html)
        out.note(f"ckptviz series: wrote {written}")
    if failed:
        out.note(f"ckptviz series: --fail-on {args.fail_on}: " + ", ".join(f"{summary[c]:,} {c}" for c in failed))
        return FAIL_CODE
    return 0


def _most_moved(series: Any) -> pd.DataFrame:
    """Per key: the largest relative change over the run, where, and the first and last norms."""
    rel = series.matrix("rel_change").to_numpy(dtype=float)
    norm = series.matrix("norm").to_numpy(dtype=float)
    finite = np.where(np.isfinite(rel), rel, -np.inf)
    at = finite.argmax(axis=1)
    top = finite[np.arange(len(at)), at]
    first = [row[np.isfinite(row)][0] if np.isfinite(row).any() else np.nan for row in norm]
    last = [row[np.isfinite(row)][-1] if np.isfinite(row).any() else np.nan for row in norm]
    frame = pd.DataFrame({"max_rel_change": np.where(np.isfinite(top), top, np.nan),
                          "at": [series.labels[j] if np.isfinite(t) else None for j, t in zip(at, top)],
                          "norm_first": first, "norm_last": last},
                         index=pd.Index(series.keys, name="key"))
    return frame.sort_values("max_rel_change", ascending=False, na_position="last", kind="stable")


def _flag_style(v: Any) -> str | None:
    return {"frozen": "cyan", "norm_exploding": "bold red", "nonfinite": "bold red"}.get(str(v))
