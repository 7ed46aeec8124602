"""The fuzzing suite of issue 8: seeded mutations of every container and hand-built bombs, each case in a
forked child with a wall timeout and an address-space limit (tests/fuzz/harness.py).

The default run takes a fixed seed of ``CKPTVIZ_FUZZ_CASES`` cases (2000 unless set; ``--fuzz-cases N``
does the same); ``CKPTVIZ_FUZZ_SEED`` picks another seed and ``CKPTVIZ_FUZZ_OUT`` keeps each defect's file
for triage (or run ``python -m tests.fuzz --cases N --seed S --out DIR``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from tests.fuzz import harness, seeds
from tests.fuzz.bombs import BOMBS, reference_for

DEFAULT_CASES = 2000


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeds.build(root)
    return root


@pytest.fixture(scope="module")
def client(seeds_dir):
    c = harness.Client(seeds_dir)
    yield c
    c.close()


def _defects(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if r["cls"] in harness.DEFECTS:
            o = next((o for o in r["outcomes"] if o["cls"] in harness.DEFECTS), {})
            lines.append(f"{r['cls']} case={r.get('i', r.get('bomb'))} seed={r.get('seed_name')} "
                         f"verb={o.get('verb')} {o.get('type', '')}: {str(o.get('msg', ''))[:200]} "
                         f"mutations={r.get('mutations')}")
    return lines


@pytest.mark.parametrize("what,expected", [("segv", "crash"), ("exit", "crash"), ("sleep", "hang"),
                                           ("raise", "raw_exception"), ("memory", "memory"), ("ok", "ok")])
def test_harness_classifies(client, what, expected):
    """The runner itself: a child killed by SIGSEGV is a crash, one that sleeps past the timeout a hang,
    one that allocates past the address-space limit a memory blowup."""
    res = client.request({"op": "selftest", "what": what, "timeout": 2})[0]
    assert res["cls"] == expected, res


def test_seeds_are_clean(client, seeds_dir):
    """Every unmutated seed opens and goes through every verb, and the reference reader agrees on its values."""
    for name, ref in harness.REFERENCE.items():
        path = seeds_dir / name
        res = client.request({"op": "file", "path": str(path), "seed_path": str(path), "ref": ref})[0]
        assert res["cls"] == "ok", (name, res["outcomes"])


def test_fuzz_fixed_seed(seeds_dir, request):
    cases = request.config.getoption("fuzz_cases", None) or int(os.environ.get("CKPTVIZ_FUZZ_CASES", DEFAULT_CASES))
    seed = int(os.environ.get("CKPTVIZ_FUZZ_SEED", "0"))
    out = os.environ.get("CKPTVIZ_FUZZ_OUT")
    results = harness.fuzz(seeds_dir, cases, seed, out=Path(out) if out else None)
    assert len(results) == cases
    counts = harness.summary(results)
    assert counts.get("ok", 0) > 0 and counts.get("checkpoint_error", 0) > 0, counts  # the mutations bite
    bad = _defects(results)
    assert not bad, f"{len(bad)} defect case(s) of {cases} ({counts}):\n" + "\n".join(bad[:20])


def test_fuzz_fixed_seed_accepts_nothing_the_reference_rejects(seeds_dir):
    """Issue 8, item 10: no mutated file that the format's own reader refuses is read by ckptviz."""
    results = harness.fuzz(seeds_dir, 400, 1)
    lax = _defects([r for r in results if r["cls"] == "accepted_but_reference_rejects"])
    assert not lax, f"{len(lax)} file(s) accepted that the reference reader rejects:\n" + "\n".join(lax[:20])


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb(client, tmp_path, name):
    """Each hand-built bomb ends in a CheckpointError (or, for a valid file, a clean result) within the
    child's time and memory limits; files the reference reader rejects are never accepted."""
    build, expect = BOMBS[name]
    path = build(tmp_path)
    res = client.request({"op": "file", "path": str(path), "ref": reference_for(name, expect)})[0]
    assert res["cls"] in ("ok", "checkpoint_error"), _defects([{**res, "bomb": name}]) or res
    if expect == "refuse":
        refused = [o for o in res["outcomes"] if o["verb"] in ("open[F]", "state_dict[F]")
                   and o["cls"] == "checkpoint_error"]
        assert refused, f"{name}: ckptviz read a file the reference reader rejects: {res['outcomes']}"
