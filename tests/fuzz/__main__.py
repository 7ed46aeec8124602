"""``python -m tests.fuzz --cases N --seed S --out DIR``: run N mutated cases (and, with --bombs, every
hand-built bomb) and save each defect's file and classification JSON under DIR for triage."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import harness, seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for the defect cases (file + JSON each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=harness.DEFAULT_TIMEOUT, help="wall seconds per case")
    ap.add_argument("--bombs", action="store_true", help="also run the hand-built bombs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckptviz-fuzz-seeds-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        seeds.build(root / "seeds")
        t = time.monotonic()
        results = harness.fuzz(root / "seeds", args.cases, args.seed, args.workers, args.timeout, args.out,
                               progress=True)
        if args.bombs:
            results += run_bombs(root / "bombs", args.timeout, args.out)
        wall = time.monotonic() - t
    counts = harness.summary(results)
    defects = [r for r in results if r["cls"] in harness.DEFECTS]
    print(json.dumps({"cases": len(results), "wall_s": round(wall, 1), "classes": counts}, indent=1))
    for r in defects[:50]:
        bad = [o for o in r["outcomes"] if o["cls"] in harness.DEFECTS]
        o = bad[0] if bad else {}
        print(f"{r['cls']:>32} #{r.get('i', r.get('bomb'))} {r.get('seed_name', '')} {o.get('verb')} "
              f"{o.get('type', '')}: {str(o.get('msg', ''))[:150]}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)  # a clean run saved no case, so made no folder
        (args.out / "summary.json").write_text(json.dumps({"classes": counts, "wall_s": wall}, indent=1))
    return 1 if defects else 0


def run_bombs(root: Path, timeout: float, out: Path | None) -> list[dict]:
    from .bombs import BOMBS, reference_for

    root.mkdir(parents=True, exist_ok=True)
    client = harness.Client(root.parent / "seeds")
    results = []
    try:
        for name, (build, expect) in BOMBS.items():
            path = build(root)
            res = client.request({"op": "file", "path": str(path), "ref": reference_for(name, expect),
                                  "timeout": timeout})[0]
            res.update(bomb=name, expect=expect)
            if expect == "refuse" and res["cls"] == "ok":
                res["cls"] = "accepted_but_reference_rejects"
            if out and res["cls"] in harness.DEFECTS:
                harness.save_case(path, res, out, f"{res['cls']}-bomb-{name}")
            results.append(res)
    finally:
        client.close()
    return results


if __name__ == "__main__":
    sys.exit(main())
