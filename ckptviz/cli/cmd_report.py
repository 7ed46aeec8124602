"""``ckptviz report PATH (--model SPEC | --against PATH) -o report.html``: one self-contained HTML file."""

from __future__ import annotations

import sys
from typing import Any

from . import UsageError
from .cmd_compare import model_for, parse_rules


def run(args: Any) -> int:
    from ..checkpoint import open_checkpoint

    if not args.model and not args.against:
        raise UsageError("name what to compare with: --model SPEC (a model class) or --against PATH "
                         "(a second checkpoint)")
    if not str(args.output).lower().endswith((".html", ".htm")):
        raise UsageError(f"--output {args.output!r} should end in .html (the report is one HTML page)")
    rules = parse_rules(args.rule)
    ck = open_checkpoint(args.path, trust=args.trust)
    if args.model:
        from ..compare import compare

        model = model_for(args.model, args.kwargs, args.path)
        rep = compare(model, ck, section=args.section, rules=rules, auto_align=args.auto_align)
        written = rep.to_html(args.output, model=model)
    else:
        from ..diff import diff

        other = open_checkpoint(args.against, trust=args.trust)
        rep = diff(ck, other, section_a=args.section, rules=rules, auto_align=args.auto_align,
                   progress=False if args.quiet else None)
        written = rep.to_html(args.output)
    counts = ", ".join(f"{k} {v:,}" for k, v in rep.summary.items() if v)
    print(f"ckptviz report: wrote {written} ({counts})", file=sys.stderr)
    return 0
