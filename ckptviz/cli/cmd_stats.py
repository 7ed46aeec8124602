"""``ckptviz stats PATH``: value statistics of every tensor; ``--fail-on nonfinite`` gates on NaN/Inf."""

from __future__ import annotations

from typing import Any

from . import FAIL_CODE
from .output import Output, records

SHOWN = ["shape", "dtype", "mean", "std", "min", "max", "zero_frac", "nan", "inf"]


def run(args: Any) -> int:
    from ..checkpoint import open_checkpoint

    out = Output(args)
    ck = open_checkpoint(args.path, trust=args.trust)
    section = ck.resolve(args.section)
    frame = ck.tensors(section)[["shape", "dtype"]].join(ck.stats(section, progress=False if args.quiet else True))
    bad = frame[(frame["nan"] > 0) | (frame["inf"] > 0)]
    if out.format == "json":
        out.json({"path": ck.path, "section": section, "nonfinite": list(bad.index), "rows": records(frame)})
    elif out.format == "csv":
        out.csv(frame)
    else:
        out.line(f"{ck.path} (section {section!r}): {len(frame):,} tensors", style="bold")
        if len(bad):
            out.table(bad[SHOWN], f"{len(bad):,} tensors hold NaN or Inf")
        out.table(frame[SHOWN], "statistics")
    if args.fail_on == "nonfinite" and len(bad):
        out.note(f"ckptviz stats: {len(bad):,} tensors hold NaN or Inf: {', '.join(bad.index[:5])}")
        return FAIL_CODE
    return 0
