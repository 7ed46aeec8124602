"""``ckptviz diff A B``: two checkpoints key by key and value by value; ``--top N`` the N that moved most."""

from __future__ import annotations

from typing import Any

from . import FAIL_CODE
from .cmd_compare import parse_rules
from .output import Output, fail_statuses, records, status_style

COLUMNS = ["key_b", "status", "shape_a", "shape_b", "dtype_a", "dtype_b", "max_abs_diff", "rel_l2", "cosine"]
CONDITIONS = ("changed", "only_a", "only_b", "shape_differs", "dtype_differs")


def run(args: Any) -> int:
    from ..checkpoint import open_checkpoint
    from ..diff import diff

    fail = fail_statuses(args.fail_on, CONDITIONS)
    rules = parse_rules(args.rule)
    out = Output(args)
    a, b = open_checkpoint(args.a, trust=args.trust), open_checkpoint(args.b, trust=args.trust)
    rep = diff(a, b, section_a=args.section_a, section_b=args.section_b, rules=rules, auto_align=args.auto_align,
               progress=False if args.quiet else None)
    frame = rep.frame.set_index("key")
    changed = int((frame["changed_frac"].fillna(0) > 0).sum())
    counts = {**{k: v for k, v in rep.summary.items() if v}, "changed": changed}
    failed = sorted(c for c in fail if counts.get(c))
    moved = frame[frame["status"] == "both"].sort_values("rel_l2", ascending=False, kind="stable")
    if args.top is not None:
        frame = moved.head(args.top)
    cols = COLUMNS if (frame["key_b"].fillna("") != frame.index.to_series().fillna("")).any() else COLUMNS[1:]
    if out.format == "json":
        out.json({"a": a.path, "b": b.path, "section_a": rep.section_a, "section_b": rep.section_b,
                  "summary": rep.summary, "changed": changed, "rules": [list(r) for r in rep.rules],
                  "failed_on": failed, "rows": records(frame)})
    elif out.format == "csv":
        out.csv(frame)
    else:
        out.line(f"{a.path} -> {b.path}", style="bold")
        out.line("  ".join(f"{k}: {v:,}" for k, v in counts.items()) + f"  (of {len(rep.frame):,} keys)")
        for r in rep.rules:
            out.line(f"rule applied: {r[0]!r} -> {r[1]!r}")
        if args.top is not None:
            out.table(frame[cols], f"the {len(frame)} tensors that moved most (relative L2 change)",
                      styles={"status": status_style})
        else:
            odd = frame[frame["status"] != "both"]
            if len(odd):
                out.table(odd[cols], "keys not in both, or of another shape or dtype", styles={"status": status_style})
            out.table(moved[cols], "tensors in both, most changed first", styles={"status": status_style})
    if failed:
        out.note(f"ckptviz diff: --fail-on {args.fail_on}: " + ", ".join(f"{counts[c]:,} {c}" for c in failed))
        return FAIL_CODE
    return 0
