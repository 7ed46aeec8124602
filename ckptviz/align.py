"""Key alignment between a checkpoint and a model: user rename rules first, then exact matches, then
inferred prefix and wrapper-token renames, each applied only where it pairs keys one-to-one."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import AlignmentError

# Wrapper modules that insert a token into every key below them.
WRAPPER_TOKENS = ("module", "_orig_mod", "_forward_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
MAX_ROUNDS = 32


@dataclass(frozen=True)
class Rule:
    """A rename rule: ``re.sub(pattern, replacement, key)``."""

    pattern: str
    replacement: str

    def apply(self, key: str) -> str:
        return re.sub(self.pattern, self.replacement, key)

    def __str__(self) -> str:
        return f"{self.pattern} -> {self.replacement!r}"

    def as_tuple(self) -> tuple[str, str]:
        return (self.pattern, self.replacement)


def strip_prefix(prefix: str) -> Rule:
    return Rule("^" + re.escape(prefix), "")


def add_prefix(prefix: str) -> Rule:
    return Rule("^", prefix.replace("\\", "\\\\"))


def drop_token(token: str) -> Rule:
    return Rule(r"(^|\.)" + re.escape(token) + r"\.", r"\1")


@dataclass
class Alignment:
    """Which checkpoint key feeds which model key, and the rules that renamed it."""

    pairs: dict[str, str] = field(default_factory=dict)  # checkpoint key -> model key
    rule_of: dict[str, list[Rule]] = field(default_factory=dict)  # checkpoint key -> rules applied
    rules: list[Rule] = field(default_factory=list)  # every rule that renamed at least one key


def _as_rules(rules: Iterable[tuple[str, str] | Rule] | None) -> list[Rule]:
    out = []
    for r in rules or ():
        rule = r if isinstance(r, Rule) else Rule(*r)
        try:
            re.compile(rule.pattern)
        except re.error as e:
            raise AlignmentError(f"rename rule {rule.pattern!r} is not a valid regular expression: {e}") from None
        out.append(rule)
    return out


def _dot_splits(name: str) -> Iterable[tuple[str, str]]:
    for i, ch in enumerate(name):
        if ch == ".":
            yield name[: i + 1], name[i + 1 :]


def _candidates(names: Mapping[str, str], free_model: set[str]) -> dict[Rule, list[tuple[str, str]]]:
    """Every inferable rule with the (checkpoint key, model key) pairs it would create."""
    cands: dict[Rule, list[tuple[str, str]]] = defaultdict(list)
    by_name = {n: c for c, n in names.items()}
    for c, name in names.items():
        for prefix, rest in _dot_splits(name):
            if rest in free_model:
                cands[strip_prefix(prefix)].append((c, rest))
        for token in WRAPPER_TOKENS:
            if f".{token}." in f".{name}":
                rule = drop_token(token)
                renamed = rule.apply(name)
                if renamed in free_model:
                    cands[rule].append((c, renamed))
    for m in free_model:
        for prefix, rest in _dot_splits(m):
            if rest in by_name:
                cands[add_prefix(prefix)].append((by_name[rest], m))
    return cands


def _one_to_one(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop pairs whose model key is claimed by several checkpoint keys (or vice versa)."""
    by_m = Counter(m for _, m in pairs)
    by_c = Counter(c for c, _ in pairs)
    return [(c, m) for c, m in pairs if by_m[m] == 1 and by_c[c] == 1]


def _conflict(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> bool:
    """Whether two pairings disagree about any key they share."""
    fa, fb = dict(a), dict(b)
    ra, rb = {m: c for c, m in a}, {m: c for c, m in b}
    return any(fa[c] != fb[c] for c in fa.keys() & fb.keys()) or any(ra[m] != rb[m] for m in ra.keys() & rb.keys())


def align(
    model_keys: Sequence[str],
    ckpt_keys: Sequence[str],
    *,
    rules: Iterable[tuple[str, str] | Rule] | None = None,
    auto: bool = True,
    same_shape=None,
) -> Alignment:
    """Pair checkpoint keys with model keys.

    ``rules`` (regex, replacement) apply first, in order, to every checkpoint key; then exact names
    pair; then, if ``auto``, inferred renames (strip or add a prefix, drop a wrapper token) are tried
    greedily, each kept only if it pairs keys one-to-one and adds pairs. ``same_shape(c, m)``, when
    given, breaks ties in favour of renames that pair equal shapes.
    """
    user = _as_rules(rules)
    result = Alignment()
    names: dict[str, str] = {}
    for c in ckpt_keys:
        name = c
        for rule in user:
            new = rule.apply(name)
            if new != name:
                result.rule_of.setdefault(c, []).append(rule)
                if rule not in result.rules:
                    result.rules.append(rule)
            name = new
        names[c] = name
    clashes = {n: [c for c in ckpt_keys if names[c] == n] for n, k in Counter(names.values()).items() if k > 1}
    if clashes:
        shown = "; ".join(f"{n!r} <- {cs}" for n, cs in list(clashes.items())[:5])
        raise AlignmentError(
            f"the rename rules map several checkpoint keys to one name: {shown}. Make the rules more specific."
        )

    model_set = set(model_keys)
    for c, n in names.items():
        if n in model_set:
            result.pairs[c] = n
    if not auto:
        return result

    free_model = model_set - set(result.pairs.values())
    free = {c: n for c, n in names.items() if c not in result.pairs}
    rejected: set[Rule] = set()
    for _ in range(MAX_ROUNDS):
        scored = []
        for rule, pairs in _candidates(free, free_model).items():
            pairs = _one_to_one(pairs)
            if rule in rejected or not pairs:
                continue
            shapes = sum(bool(same_shape(c, m)) for c, m in pairs) if same_shape else 0
            scored.append(((len(pairs), shapes, rule.replacement == "", -len(rule.pattern)), rule, pairs))
        if not scored:
            break
        scored.sort(key=lambda s: s[0], reverse=True)
        (score, rule, pairs), rivals = scored[0], scored[1:]
        tied = [r for s, r, p in rivals if s[:2] == score[:2] and _conflict(pairs, p)]
        if tied:  # two equally good renames pair the same keys differently: guess neither
            rejected.update([rule, *tied])
            continue
        result.rules.append(rule)
        for c, m in pairs:
            result.pairs[c] = m
            result.rule_of.setdefault(c, []).append(rule)
            free_model.discard(m)
            del free[c]
    return result
