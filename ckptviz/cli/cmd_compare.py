"""``ckptviz compare PATH --model SPEC``: the comparison table and counts; ``--fail-on`` gates CI."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from . import FAIL_CODE, UsageError
from .output import Output, fail_statuses, records, status_style

COLUMNS = ["ckpt_key", "status", "model_shape", "ckpt_shape", "model_dtype", "ckpt_dtype", "rule"]


def parse_rules(texts: list[str]) -> list[tuple[str, str]]:
    """``--rule REGEX=REPL`` options as (regex, replacement) pairs (split at the last ``=``)."""
    out = []
    for text in texts:
        if "=" not in text:
            raise UsageError(f"--rule {text!r}: write REGEX=REPLACEMENT, e.g. --rule '^backbone\\.='")
        pattern, _, repl = text.rpartition("=")
        out.append((pattern, repl))
    return out


def model_for(spec: str, kwargs: str, path: str) -> Any:
    """Build the model ``spec`` names; 'config' means the checkpoint folder's own config.json."""
    from ..models import build_model, find_config

    if spec == "config":
        found = find_config(path)
        if found is None:
            raise UsageError(f"--model config: no config.json beside or inside {path}; name a model SPEC instead")
        spec = str(found)
    if ":" in spec and os.getcwd() not in sys.path and not Path(spec).exists():
        sys.path.insert(0, os.getcwd())  # `package.module:Class` from the working directory, as `python -m` does
    return build_model(spec, kwargs)


def run(args: Any) -> int:
    from ..compare import STATUSES, compare

    fail = fail_statuses(args.fail_on, STATUSES, any_means=tuple(s for s in STATUSES if s != "match"))
    rules = parse_rules(args.rule)
    out = Output(args)
    model = model_for(args.model, args.kwargs, args.path)
    from ..checkpoint import open_checkpoint

    ck = open_checkpoint(args.path, trust=args.trust)
    rep = compare(model, ck, section=args.section, rules=rules, auto_align=args.auto_align)
    frame = rep.frame.set_index("key")
    counts = {k: v for k, v in rep.summary.items() if v}
    failed = sorted(s for s in fail if counts.get(s))
    if out.format == "json":
        out.json({"checkpoint": ck.path, "format": ck.format, "section": rep.section,
                  "model": type(model).__module__ + "." + type(model).__qualname__, "summary": rep.summary,
                  "rules": [list(r) for r in rep.rules], "failed_on": failed, "rows": records(frame)})
    elif out.format == "csv":
        out.csv(frame)
    else:
        out.line(f"{ck.path} (section {rep.section!r}) vs {type(model).__name__}", style="bold")
        out.line("  ".join(f"{k}: {v:,}" for k, v in counts.items()))
        for r in rep.rules:
            out.line(f"rule applied: {r[0]!r} -> {r[1]!r}")
        problems = frame[frame["status"] != "match"]
        if args.all or problems.empty:
            out.table(frame[COLUMNS], "every row", styles={"status": status_style})
        else:
            out.table(problems[COLUMNS], f"{len(problems):,} rows that do not simply match (--all for all "
                      f"{len(frame):,})", styles={"status": status_style})
    if failed:
        out.note(f"ckptviz compare: --fail-on {args.fail_on}: " + ", ".join(f"{counts[s]:,} {s}" for s in failed))
        return FAIL_CODE
    return 0
