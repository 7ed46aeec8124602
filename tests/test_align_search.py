"""The column-wise rename search against a straightforward reference: the rule-by-rule greedy search over
every dot split of every key. Random key sets (prefixes, wrapper tokens, conflicting and tied renames,
shapes, user rules) must give the same pairs, in the same order, the same rules and the same rule_of."""

import random
import re
from collections import Counter, defaultdict

import pytest

from ckptviz import AlignmentError
from ckptviz import align as search
from ckptviz.align import WRAPPER_TOKENS, KeyIndex, _dropped, add_prefix, align, drop_token, strip_prefix


def _splits(name):
    return [(name[: i + 1], name[i + 1 :]) for i, ch in enumerate(name) if ch == "."]


def _candidates(free, free_model, model_order):
    cands = defaultdict(list)
    for c, name in free.items():
        for prefix, rest in _splits(name):
            if rest in free_model:
                cands[strip_prefix(prefix)].append((c, rest))
        for token in WRAPPER_TOKENS:
            if f".{token}." in f".{name}" and (renamed := drop_token(token).apply(name)) in free_model:
                cands[drop_token(token)].append((c, renamed))
    by_name = {n: c for c, n in free.items()}
    for m in [m for m in model_order if m in free_model]:
        for prefix, rest in _splits(m):
            if rest in by_name:
                cands[add_prefix(prefix)].append((by_name[rest], m))
    return cands


def _one_to_one(pairs):
    by_m, by_c = Counter(m for _, m in pairs), Counter(c for c, _ in pairs)
    return [(c, m) for c, m in pairs if by_m[m] == 1 and by_c[c] == 1]


def _conflict(a, b):
    fa, fb, ra, rb = dict(a), dict(b), {m: c for c, m in a}, {m: c for c, m in b}
    return any(fa[c] != fb[c] for c in fa.keys() & fb.keys()) or any(ra[m] != rb[m] for m in ra.keys() & rb.keys())


def reference_align(model_keys, ckpt_keys, rules=None, same_shape=None):
    """Pairs, rules and rule_of as the rule-by-rule search finds them (model keys met in model order)."""
    rule_of, applied, names = {}, [], {}
    for c in ckpt_keys:
        name = c
        for rule in [search.Rule(*r) for r in rules or ()]:
            new = rule.apply(name)
            if new != name:
                rule_of.setdefault(c, []).append(rule)
                applied += [rule] if rule not in applied else []
            name = new
        names[c] = name
    if len(set(names.values())) < len(names):
        return "clash"
    pairs = {c: n for c, n in names.items() if n in set(model_keys)}
    free_model = set(model_keys) - set(pairs.values())
    free = {c: n for c, n in names.items() if c not in pairs}
    rejected = set()
    for _ in range(search.MAX_ROUNDS):
        scored = []
        for rule, found in _candidates(free, free_model, model_keys).items():
            found = _one_to_one(found)
            if rule in rejected or not found:
                continue
            shapes = sum(bool(same_shape(c, m)) for c, m in found) if same_shape else 0
            scored.append(((len(found), shapes, rule.replacement == "", -len(rule.pattern)), rule, found))
        if not scored:
            break
        scored.sort(key=lambda s: s[0], reverse=True)
        (score, rule, found), rivals = scored[0], scored[1:]
        tied = [r for s, r, p in rivals if s[:2] == score[:2] and _conflict(found, p)]
        if tied:
            rejected.update([rule, *tied])
            continue
        applied.append(rule)
        for c, m in found:
            pairs[c] = m
            rule_of.setdefault(c, []).append(rule)
            free_model.discard(m)
            del free[c]
    return list(pairs.items()), [(c, [r.as_tuple() for r in rs]) for c, rs in rule_of.items()], \
        [r.as_tuple() for r in applied]


COMPONENTS = ["a", "b", "layers", "0", "1", "weight", "bias", "model", "", "x\ny", *WRAPPER_TOKENS]


def _small_case(r: random.Random):
    """A few keys of random components: every rename kind, clashes, empty components."""
    model = list(dict.fromkeys(".".join(r.choices(COMPONENTS, k=r.randint(1, 4))) for _ in range(r.randint(1, 25))))
    ckpt = []
    for k in model:
        p = r.random()
        if p < 0.2:
            ckpt.append(k)
        elif p < 0.45:
            ckpt.append(r.choice(["module.", "a.", "model.", "_orig_mod.", "a.b."]) + k)
        elif p < 0.55:
            parts = k.split(".")
            i = r.randint(0, len(parts))
            ckpt.append(".".join([*parts[:i], r.choice(WRAPPER_TOKENS), *parts[i:]]))
        elif p < 0.65 and "." in k:
            ckpt.append(k.split(".", 1)[1])
        elif p < 0.75:
            ckpt.append(".".join(r.choices(COMPONENTS, k=r.randint(1, 5))))
    return model, list(dict.fromkeys(ckpt))


def _large_case(r: random.Random):
    """Tens to hundreds of structured keys: one dominant rename plus stragglers and distractors."""
    model = list(dict.fromkeys(f"model.layers.{r.randint(0, 3)}.{r.choice(['mlp', 'attn'])}.{r.randint(0, 40)}."
                               f"{r.choice(['weight', 'bias'])}" for _ in range(r.randint(20, 200))))
    mode, ckpt = r.randrange(4), []
    for k in model:
        p = r.random()
        if mode == 0:
            ckpt.append("module." + k if p < 0.9 else "x." + k if p < 0.95 else k)
        elif mode == 1:
            ckpt.append(k.replace("layers.", "layers._fsdp_wrapped_module.") if p < 0.8 else "a." + k if p < 0.9 else k)
        elif mode == 2:
            ckpt.append(k.split(".", 1)[1] if p < 0.7 else "b." + k if p < 0.8 else k.replace("mlp", "mlp_old"))
        else:
            ckpt.append(r.choice(["", "a.", "b.", "module.", "a.module."]) + k if p < 0.7 else f"z.{r.random()}")
    if r.random() < 0.3:
        model += ["weight", "bias", "0.weight"]
    if r.random() < 0.3:
        r.shuffle(ckpt)
    return model, list(dict.fromkeys(ckpt))


def _case(seed: int):
    r = random.Random(seed)
    model, ckpt = _large_case(r) if seed % 2 else _small_case(r)
    shape_m = {m: r.randint(1, 2) for m in model}
    shape_c = {c: r.randint(1, 2) for c in ckpt}
    same_shape = (lambda c, m: shape_c[c] == shape_m[m]) if r.random() < 0.7 else None
    rules = r.choice([None] * 8 + [[(r"^a\.", "")], [(r"^module\.", ""), ("x", "b")], [(r"\.0\.", ".1.")]])
    return model, ckpt, rules, same_shape


def _rows(pairs, model, ckpt):
    """``Alignment.ckpt_row`` as pairs say it should be."""
    model = model.keys if isinstance(model, KeyIndex) else model
    by_model, where = {m: c for c, m in pairs.items()}, {c: i for i, c in enumerate(ckpt)}
    return [where[by_model[m]] if m in by_model else -1 for m in model]


def _ours(model, ckpt, rules, same_shape):
    try:
        al = align(model, ckpt, rules=rules, same_shape=same_shape)
    except AlignmentError:
        return "clash"
    assert al.ckpt_row.tolist() == _rows(al.pairs, model, ckpt)
    assert {c: list(al.rule_sets[r]) for c, r in zip(ckpt, al.rule_row.tolist()) if r >= 0} == al.rule_of
    return list(al.pairs.items()), [(c, [r.as_tuple() for r in rs]) for c, rs in al.rule_of.items()], \
        [r.as_tuple() for r in al.rules]


@pytest.mark.parametrize("seeds,column_rules,scan_keys,scan_firsts", [
    (16, 16, 256, 256), (1, 1, 0, 256), (2, 0, 1, 2), (3, 2, 0, 256), (1, 0, 10**9, 256)])
def test_same_result_as_the_rule_by_rule_search(monkeypatch, seeds, column_rules, scan_keys, scan_firsts):
    """Small thresholds push small cases through sampling, column tests, scans and one-by-one enumeration."""
    for name, value in (("SEEDS", seeds), ("MAX_COLUMN_RULES", column_rules), ("SCAN_KEYS", scan_keys),
                        ("MAX_SCAN_FIRSTS", scan_firsts)):
        monkeypatch.setattr(search, name, value)
    renamed = 0
    for seed in range(200):
        model, ckpt, rules, same_shape = _case(seed)
        want = reference_align(model, ckpt, rules, same_shape)
        assert _ours(model, ckpt, rules, same_shape) == want, seed
        renamed += want != "clash" and bool(want[2])
    assert renamed > 100  # most cases exercise inferred renames, not just exact names


def test_sampled_search_pairs_a_large_prefixed_checkpoint_with_stragglers():
    model = [f"model.layers.{i}.mlp.experts.{j}.w{w}.weight" for i in range(8) for j in range(64) for w in (1, 2, 3)]
    ckpt = ["module." + k if n % 50 else "other." + k for n, k in enumerate(model)]
    ckpt += ["module.model.layers.0.extra.weight"]
    want = reference_align(model, ckpt)
    assert _ours(model, ckpt, None, None) == want
    assert want[2] == [(r"^module\.", ""), (r"^other\.", "")]


def test_repeated_keys_count_once():
    model = ["a.w", "b.w", "a.w"]
    ckpt = ["module.a.w", "b.w", "module.a.w", "c.w"]
    al = align(model, ckpt)
    assert al.pairs == {"module.a.w": "a.w", "b.w": "b.w"} and [str(r) for r in al.rules] == [r"^module\. -> ''"]
    assert al.ckpt_row.tolist() == [2, 1, 2] == _rows(al.pairs, model, ckpt)
    assert [al.rule_sets[r] if r >= 0 else None for r in al.rule_row.tolist()] == [(al.rules[0],), None] * 2
    renamed_twice = align(["a.w", "b.w"], ["module.a.w", "b.w", "module.a.w"])  # repeated, and not an exact name
    assert renamed_twice.pairs == {"b.w": "b.w", "module.a.w": "a.w"} and renamed_twice.ckpt_row.tolist() == [2, 1]


def test_a_key_index_aligns_like_the_keys():
    model = [f"layers.{i}.weight" for i in range(50)]
    index = KeyIndex(model)
    for ckpt in (model, ["module." + k for k in model], ["x." + k for k in model[:20]] + model[20:]):
        assert _ours(index, ckpt, None, None) == _ours(model, ckpt, None, None) == reference_align(model, ckpt)


def test_tie_between_conflicting_renames_of_many_keys_guesses_neither():
    model = [f"layers.{i}.weight" for i in range(100)]
    ckpt = ["a." + k for k in model] + ["b." + k for k in model]
    al = align(model, ckpt)
    assert al.pairs == {} and al.rules == []


@pytest.mark.parametrize("name", ["module.x", "a.module.b", "module.module.x", "a.module.module.b", "xmodule.y",
                                  "a.module", ".module.x", "..module.x", "module.", "module..x", "a.module.b.module.c"])
def test_dropped_is_the_drop_token_regex(name):
    for token in ("module", "_orig_mod"):
        assert _dropped(name, token) == drop_token(token).apply(name)
    assert re.sub(r"(^|\.)module\.", r"\1", name) == _dropped(name, "module")
