"""Seeded mutational fuzzing and hand-built bombs for every container ckptviz reads (issue 8).

Run ``python -m tests.fuzz --cases 100000 --seed 1 --report DIR`` for a long run; tests/test_fuzz.py runs
a fixed seed in CI and the bombs on their own (``tests/test_fuzz.py::test_bombs``)."""
