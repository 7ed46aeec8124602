"""``ckptviz inspect PATH``: sections, metadata, tensors (flat or folded), sizes; ``--stats`` adds statistics."""

from __future__ import annotations

from typing import Any

from .output import Output, records

STATS_SHOWN = ["mean", "std", "min", "max", "nan", "inf"]  # the terminal's columns; JSON and CSV get all
FOLD_ABOVE = 200  # tensors: a longer listing is folded by layer pattern unless --flat


def run(args: Any) -> int:
    from ..checkpoint import human_size, open_checkpoint

    out = Output(args)
    ck = open_checkpoint(args.path, trust=args.trust)
    section = ck.resolve(args.section)
    frame = ck.tensors(section)
    folded = args.fold if args.fold is not None else len(frame) > FOLD_ABOVE
    table = _folded(ck.tensors(section, grouped=True)) if folded else frame
    stats = None
    if args.stats:
        stats = ck.stats(section, progress=False if args.quiet else True)
        if not folded:
            table = table[["shape", "dtype"]].join(stats[STATS_SHOWN])
    by_dtype = ck.sizes(section, by="dtype")
    by_layer = ck.sizes(section, by="layer")
    if out.format == "json":
        out.json({
            "path": ck.path, "format": ck.format, "sections": ck.sections, "section": section,
            "optimizer_sections": ck.optimizer_sections, "files": ck.files, "metadata": ck.metadata,
            "tensors": len(frame), "nbytes": int(frame["nbytes"].sum()),
            "rows": records(frame if stats is None else frame.join(stats.drop(columns=["numel"], errors="ignore"))),
            "sizes": {"dtype": records(by_dtype), "layer": records(by_layer)},
        })
        return 0
    if out.format == "csv":
        out.csv(frame if stats is None else frame.join(stats.drop(columns=["numel"], errors="ignore")))
        return 0
    out.line(f"{ck.path}  ({ck.format}, {len(frame):,} tensors in section {section!r}, "
             f"{human_size(int(frame['nbytes'].sum()))})", style="bold")
    if len(ck.sections) > 1:
        out.line(f"sections: {', '.join(repr(s) for s in ck.sections)}")
    if ck.optimizer_sections:
        out.line(f"optimizer state: {', '.join(ck.optimizer_sections)}")
    if len(ck.files) > 1:
        out.line(f"files: {len(ck.files)}")
    if ck.metadata:
        out.line(f"metadata: {_short(ck.metadata)}")
    show = table.drop(columns=[c for c in ("file",) if c in table and len(ck.files) <= 1])
    show = show.assign(nbytes=show["nbytes"].map(human_size)) if "nbytes" in show else show
    out.table(show, "tensors, folded by layer pattern (--flat for one row per tensor)" if folded else "tensors")
    if stats is not None:
        bad = stats[(stats["nan"] > 0) | (stats["inf"] > 0)]
        out.line(f"{len(bad):,} tensors hold NaN or Inf" + (f": {', '.join(bad.index[:10])}" if len(bad) else ""),
                 style="bold red" if len(bad) else "green")
    out.table(_sizes(by_dtype, human_size), "size by dtype", whole=True)
    out.table(_sizes(by_layer.head(10), human_size), "largest layers" + (" (top 10)" if len(by_layer) > 10 else ""),
              whole=True)
    return 0


def _folded(grouped):
    return grouped.set_index("pattern").drop(columns=["grid", "note"] if not grouped["note"].any() else ["grid"])


def _sizes(frame, human_size):
    return frame.assign(nbytes=frame["nbytes"].map(human_size), share=frame["share"].map(lambda s: f"{s:.1%}"))


def _short(meta: dict, limit: int = 300) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in meta.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."
