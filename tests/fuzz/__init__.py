"""Seeded mutational fuzzing and hand-built bombs for every container ckptviz reads (issue 8).

``python -m tests.fuzz --cases 100000 --seed 1 --out DIR [--bombs]`` runs a long campaign and keeps every
defect's file and classification JSON in DIR; tests/test_fuzz.py runs a fixed seed in CI
(``CKPTVIZ_FUZZ_CASES`` / ``--fuzz-cases`` for more) and each bomb as its own test."""
