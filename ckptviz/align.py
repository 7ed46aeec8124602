"""Key alignment between a checkpoint and a model: user rename rules first, then exact matches, then
inferred prefix and wrapper-token renames, each applied only where it pairs keys one-to-one.

Per-key work is column work: exact names pair by set look-ups, and the rename search finds candidate
rules on a sample of the unpaired keys, tests each candidate on the whole column at once, and samples
more only while a rule it has not seen could still pair as many keys as the best one it has."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter, methodcaller, ne

import numpy as np

from .errors import AlignmentError

# Wrapper modules that insert a token into every key below them.
WRAPPER_TOKENS = ("module", "_orig_mod", "_forward_module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
MAX_ROUNDS = 32
SEEDS = 16  # keys per side sampled before the first round, spread over the column
MAX_COLUMN_RULES = 16  # a sample that proposes more new rules than this: enumerate its whole side instead
SCAN_KEYS = 256  # more keys than this are enumerated by one regex scan over their joined text
MAX_SCAN_FIRSTS = 256  # ... unless the other side's keys start with more distinct components than this
STRIP, DROP, ADD = 0, 1, 2  # kinds of inferred rule; a candidate is (kind, prefix or token)


@dataclass(frozen=True)
class Rule:
    """A rename rule: ``re.sub(pattern, replacement, key)``; ``why`` names where an inferred one came
    from (a family such as ``weight_norm``, or ``structure``)."""

    pattern: str
    replacement: str
    why: str = ""

    def apply(self, key: str) -> str:
        return re.sub(self.pattern, self.replacement, key)

    def __str__(self) -> str:
        text = f"{self.pattern} -> {self.replacement!r}"
        return f"{self.why}: {text}" if self.why else text

    def as_tuple(self) -> tuple[str, str]:
        return (self.pattern, self.replacement)


def strip_prefix(prefix: str) -> Rule:
    return Rule("^" + re.escape(prefix), "")


def add_prefix(prefix: str) -> Rule:
    return Rule("^", prefix.replace("\\", "\\\\"))


def drop_token(token: str) -> Rule:
    return Rule(r"(^|\.)" + re.escape(token) + r"\.", r"\1")


def _dropped(name: str, token: str) -> str:
    """``drop_token(token).apply(name)`` without the regex: both remove every leftmost non-overlapping
    ``token.`` that starts the name or follows a dot."""
    return ("." + name).replace(f".{token}.", ".")[1:]


_MAKE = {STRIP: strip_prefix, DROP: drop_token, ADD: add_prefix}


class Alignment:
    """Which checkpoint key feeds which model key, and the rules that renamed it.

    Held as columns over the keys given to :func:`align`: ``ckpt_row`` (per model key, the position of
    its checkpoint key, or -1) and ``rule_row`` (per checkpoint key, which of ``rule_sets`` renamed it,
    or -1). ``pairs`` (checkpoint key -> model key) and ``rule_of`` (checkpoint key -> rules applied)
    are dicts made from them when first asked for, in the order the pairs and renames were found.
    """

    def __init__(self, ckpt_keys: np.ndarray, model_keys: np.ndarray):
        self.ckpt_keys, self.model_keys = ckpt_keys, model_keys
        self.rules: list[Rule] = []  # every rule that renamed at least one key
        self.ckpt_row = np.full(len(model_keys), -1, dtype=np.int64)
        self.rule_row = np.full(len(ckpt_keys), -1, dtype=np.int64)
        self.rule_sets: list[tuple[Rule, ...]] = []
        self._paired: list[np.ndarray] = []  # model rows, batch by batch in the order they paired
        self._renamed: list[np.ndarray] = []  # checkpoint rows, in the order they were first renamed
        self._pairs: dict[str, str] | None = None
        self._rule_of: dict[str, list[Rule]] | None = None

    def pair(self, model_rows: np.ndarray, ckpt_rows: np.ndarray) -> None:
        self.ckpt_row[model_rows] = ckpt_rows
        self._paired.append(model_rows)
        self._pairs = None

    def add_rule(self, rows: np.ndarray, rule: Rule) -> None:
        """Record that ``rule`` renamed the checkpoint keys at ``rows`` (after any rules before it)."""
        before = self.rule_row[rows]
        self._renamed.append(rows[before < 0])
        for old in np.unique(before).tolist():
            self.rule_sets.append((*self.rule_sets[old], rule) if old >= 0 else (rule,))
            self.rule_row[rows[before == old]] = len(self.rule_sets) - 1
        self._rule_of = None

    @property
    def paired(self) -> int:
        return int((self.ckpt_row >= 0).sum())

    @property
    def pairs(self) -> dict[str, str]:
        if self._pairs is None:
            m = np.concatenate([np.zeros(0, dtype=np.int64), *self._paired])
            self._pairs = dict(zip(self.ckpt_keys[self.ckpt_row[m]].tolist(), self.model_keys[m].tolist()))
        return self._pairs

    @property
    def rule_of(self) -> dict[str, list[Rule]]:
        if self._rule_of is None:
            c = np.concatenate([np.zeros(0, dtype=np.int64), *self._renamed])
            rules = map(list, map(self.rule_sets.__getitem__, self.rule_row[c].tolist()))
            self._rule_of = dict(zip(self.ckpt_keys[c].tolist(), rules))
        return self._rule_of

    def __repr__(self) -> str:
        return f"Alignment({self.paired} pairs, rules={[str(r) for r in self.rules]})"


class KeyIndex:
    """A column of keys with its position index, built once to align several key sets against."""

    def __init__(self, keys: Iterable[str]):
        self.keys = list(keys)
        self.at = dict(zip(self.keys, range(len(self.keys))))  # a repeated key: its last position
        self.array = np.array(self.keys, dtype=object)


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


def _apply_user_rules(keys: list[str], user: list[Rule], result: Alignment) -> list[str]:
    """Each checkpoint key's name after the user rules, recording which rules renamed which key."""
    names, changed = keys, []
    for rule in user:
        new = list(map(re.compile(rule.pattern).sub, repeat(rule.replacement), names))
        changed.append(np.flatnonzero(np.fromiter(map(ne, names, new), dtype=bool, count=len(names))))
        names = new
    for rule, idx in zip(user, changed):
        result.add_rule(idx, rule)
    renamed = np.flatnonzero(result.rule_row >= 0)
    result._renamed = [renamed]  # a key's user rules are recorded at once, keys in checkpoint order
    for _, _, rule in sorted((idx[0], k, rule) for k, (rule, idx) in enumerate(zip(user, changed)) if idx.size):
        if rule not in result.rules:
            result.rules.append(rule)
    return names


def _check_clashes(keys: list[str], names: list[str]) -> None:
    if len(set(names)) == len(names):
        return
    by_name: dict[str, list[str]] = {}
    for c, n in zip(keys, names):
        by_name.setdefault(n, []).append(c)
    clashes = {n: cs for n, cs in by_name.items() if len(cs) > 1}
    shown = "; ".join(f"{n!r} <- {cs}" for n, cs in list(clashes.items())[:5])
    raise AlignmentError(
        f"the rename rules map several checkpoint keys to one name: {shown}. Make the rules more specific."
    )


def align(
    model_keys: Sequence[str] | KeyIndex,
    ckpt_keys: Sequence[str],
    *,
    rules: Iterable[tuple[str, str] | Rule] | None = None,
    auto: bool = True,
    same_shape: Callable[[str, str], bool] | None = None,
) -> Alignment:
    """Pair checkpoint keys with model keys (each side's keys unique, as in a state dict).

    ``rules`` (regex, replacement) apply first, in order, to every checkpoint key; then exact names
    pair; then, if ``auto``, inferred renames (strip or add a prefix, drop a wrapper token) are tried
    greedily, each kept only if it pairs keys one-to-one and adds pairs. ``same_shape(c, m)``, when
    given, breaks ties in favour of renames that pair equal shapes. ``model_keys`` may be a
    :class:`KeyIndex`, to align several checkpoint sections against one model cheaply.
    """
    user = _as_rules(rules)
    index = model_keys if isinstance(model_keys, KeyIndex) else KeyIndex(model_keys)
    keys, model, model_at = list(ckpt_keys), index.keys, index.at
    result = Alignment(np.array(keys, dtype=object), index.array)
    names = _apply_user_rules(keys, user, result) if user else keys
    if user:
        _check_clashes(keys, names)
    hit = np.fromiter(map(model_at.get, names, repeat(-1)), dtype=np.int64, count=len(names))
    exact = np.flatnonzero(hit >= 0)
    if len(model_at) < len(model) or (exact.size and np.bincount(hit[exact]).max() > 1):
        return _align_unique(model, keys, user, auto, same_shape)
    result.pair(hit[exact], exact)
    free_c, free_m = np.flatnonzero(hit < 0), np.flatnonzero(result.ckpt_row < 0)
    if auto and free_c.size and free_m.size:
        search = _Search(result, free_c, free_m, [names[i] for i in free_c.tolist()], model_at, same_shape)
        if len(search.name_at) < free_c.size:
            return _align_unique(model, keys, user, auto, same_shape)
        search.run()
    return result


def _align_unique(model: list[str], keys: list[str], user: list[Rule], auto: bool, same_shape) -> Alignment:
    """:func:`align` for key lists that repeat keys: each key counts once, at its first place; every
    place of a repeated model key gets its checkpoint row (a repeated checkpoint key: its last place)."""
    model_once, keys_once = list(dict.fromkeys(model)), list(dict.fromkeys(keys))
    once = align(model_once, keys_once, rules=user, auto=auto, same_shape=same_shape)
    al = Alignment(np.array(keys, dtype=object), np.array(model, dtype=object))
    al.rules, al.rule_sets, al._pairs, al._rule_of = once.rules, once.rule_sets, once.pairs, once.rule_of
    last, first = dict(zip(keys, range(len(keys)))), dict(zip(keys_once, range(len(keys_once))))
    rows = np.array([last[keys_once[r]] if r >= 0 else -1 for r in once.ckpt_row.tolist()], dtype=np.int64)
    at = dict(zip(model_once, range(len(model_once))))
    al.ckpt_row = rows[np.array([at[m] for m in model], dtype=np.int64)]
    al.rule_row = once.rule_row[np.array([first[c] for c in keys], dtype=np.int64)]
    return al


def _prefixed(keys: list[str], prefix: str, target: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``keys`` that start with ``prefix``, and where each one's rest is in ``target``
    (only those whose rest is there), in C-speed passes over the whole column."""
    n = len(keys)
    starts = np.fromiter(map(methodcaller("startswith", prefix), keys), dtype=bool, count=n)
    rests = map(itemgetter(slice(len(prefix), None)), keys)
    hit = np.fromiter(map(target.get, rests, repeat(-1)), dtype=np.int64, count=n)
    src = np.flatnonzero(starts & (hit >= 0))
    return src, hit[src]


def _one_to_one(ci: np.ndarray, mj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop pairs whose model key is claimed by several checkpoint keys (or vice versa)."""
    keep = np.ones(ci.size, dtype=bool)
    for side in (ci, mj):
        _, inverse, counts = np.unique(side, return_inverse=True, return_counts=True)
        keep &= counts[inverse] == 1
    return ci[keep], mj[keep]


@dataclass
class _Live:
    """A candidate rule in one round: its one-to-one pairs among the free keys, and its rank."""

    key: tuple[int, str]
    order: tuple[int, int, int]  # where the rule-by-rule search would first have met it
    ci: np.ndarray
    mj: np.ndarray
    shapes: int = 0

    @property
    def rule(self) -> Rule:
        return _MAKE[self.key[0]](self.key[1])

    def rank(self) -> tuple:
        rule = self.rule
        return (-self.shapes, rule.replacement != "", len(rule.pattern), self.order)

    def canonical(self) -> tuple[np.ndarray, np.ndarray]:
        o = np.argsort(self.ci, kind="stable")
        return self.ci[o], self.mj[o]


class _Search:
    """The greedy rename search over the keys exact names left unpaired.

    Checkpoint side ``i`` (``names`` are the keys after user rules) and model side ``j`` are column
    positions. A candidate's raw pairs are computed once, on whole columns; each round keeps the ones
    whose keys are both still free. Strip and drop rules are found from checkpoint keys, add rules from
    model keys: a rule no sampled key proposes pairs at most as many keys as remain free and unsampled
    on its side, so the search samples until that bound is below the best count it has seen.
    """

    def __init__(self, result: Alignment, free_c: np.ndarray, free_m: np.ndarray, names: list[str],
                 model_at: dict[str, int], same_shape):
        self.result = result
        self.free_c, self.free_m = free_c, free_m  # search position -> position in the keys given
        self.ckpt, self.model = result.ckpt_keys[free_c], result.model_keys[free_m]
        self.names, self.model_keys = names, self.model.tolist()
        self.name_at = dict(zip(names, range(len(names))))
        self.model_at = model_at  # every model key given -> its position there; ``local`` maps that to ours
        self.local = np.full(len(result.model_keys) + 1, -1, dtype=np.int64)  # (position -1 stays -1)
        self.local[free_m] = np.arange(free_m.size)
        self.local_list = self.local.tolist()
        self.free = (np.ones(len(names), dtype=bool), np.ones(len(self.model_keys), dtype=bool))
        self.seen = (np.zeros(len(names), dtype=bool), np.zeros(len(self.model_keys), dtype=bool))
        self.hits: tuple[dict, dict] = ({}, {})  # per side: candidate -> [(i, j)] from enumerated keys
        self.found: dict[tuple[int, str], tuple[int, np.ndarray, np.ndarray]] = {}  # -> (sub-order, ci, mj)
        self.columns: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self.rejected: set[tuple[int, str]] = set()
        self.same_shape = same_shape
        self._joined: str | None = None

    # ---- candidates ------------------------------------------------------------------------------
    def _hits_of_name(self, i: int) -> Iterable[tuple[tuple[int, str], int]]:
        name, at, local = self.names[i], self.model_at, self.local_list
        k = name.find(".")
        while k >= 0:
            j = local[at.get(name[k + 1 :], -1)]
            if j >= 0:
                yield (STRIP, name[: k + 1]), j
            k = name.find(".", k + 1)
        for token in WRAPPER_TOKENS:
            if f"{token}." in name and (j := local[at.get(_dropped(name, token), -1)]) >= 0:
                yield (DROP, token), j

    def _hits_of_model_key(self, j: int) -> Iterable[tuple[tuple[int, str], int]]:
        key, at = self.model_keys[j], self.name_at
        k = key.find(".")
        while k >= 0:
            i = at.get(key[k + 1 :])
            if i is not None:
                yield (ADD, key[: k + 1]), i
            k = key.find(".", k + 1)

    def _enumerate(self, side: int, idx: np.ndarray) -> set[tuple[int, str]]:
        """Record every raw pair the keys ``idx`` of ``side`` take part in; return the candidates met."""
        hits, met = self.hits[side], set()
        found = self._scan(side, idx) if idx.size > SCAN_KEYS else self._hits_one_by_one(side, idx)
        for cand, x, y in found:
            hits.setdefault(cand, []).append((x, y) if side == 0 else (y, x))
            met.add(cand)
        self.seen[side][idx] = True
        return met

    def _hits_one_by_one(self, side: int, idx: np.ndarray) -> Iterable[tuple[tuple[int, str], int, int]]:
        for x in idx.tolist():
            for cand, y in self._hits_of_name(x) if side == 0 else self._hits_of_model_key(x):
                yield cand, x, y

    def _scan(self, side: int, idx: np.ndarray) -> Iterable[tuple[tuple[int, str], int, int]]:
        """The hits of many keys at once: a regex over the joined keys finds the only cuts that can hit,
        dots followed by a whole first component of some key on the other side; each is then looked up."""
        keys = self.names if side == 0 else self.model_keys
        target = self.model_at if side == 0 else self.name_at
        local = self.local_list if side == 0 else range(len(self.names) + 1)  # (there, -1 is never looked up)
        firsts = set(map(itemgetter(0), map(methodcaller("partition", "."), target)))
        if len(firsts) > MAX_SCAN_FIRSTS:
            yield from self._hits_one_by_one(side, idx)
            return
        batch = [keys[x] for x in idx.tolist()]
        joined = "\n".join(batch) + "\n"  # a key's own newlines only add cuts, which the look-up rejects
        starts = np.cumsum([0, *map(len, batch)])[:-1] + np.arange(len(batch))
        alternatives = "|".join(map(re.escape, sorted(firsts, key=len, reverse=True)))
        dots = np.fromiter((m.start() for m in re.finditer(rf"\.(?=(?:{alternatives})[.\n])", joined)), dtype=np.int64)
        owner = np.searchsorted(starts, dots, side="right") - 1
        for x, cut in zip(idx[owner].tolist(), (dots - starts[owner] + 1).tolist()):
            key = keys[x]
            y = target.get(key[cut:])
            if y is not None and local[y] >= 0:
                yield (STRIP if side == 0 else ADD, key[:cut]), x, local[y]
        if side == 1:
            return
        for token in WRAPPER_TOKENS:
            if f"{token}." in joined:
                for x in idx[[i for i, n in enumerate(batch) if f"{token}." in n]].tolist():
                    if (y := local[target.get(_dropped(keys[x], token), -1)]) >= 0:
                        yield (DROP, token), x, y

    def _sub_order(self, cand: tuple[int, str]) -> int:
        kind, text = cand
        return WRAPPER_TOKENS.index(text) if kind == DROP else len(text)

    def _column(self, cand: tuple[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """All raw pairs of one candidate, tested on the whole column (once)."""
        if cand not in self.columns:
            self.columns[cand] = self._test_column(cand)
        return self.columns[cand]

    def _test_column(self, cand: tuple[int, str]) -> tuple[np.ndarray, np.ndarray]:
        kind, text = cand
        if kind == ADD:
            mj, ci = _prefixed(self.model_keys, text, self.name_at)
            return ci, mj
        if kind == STRIP:
            ci, mj = _prefixed(self.names, text, self.model_at)
            mj = self.local[mj]
            return ci[mj >= 0], mj[mj >= 0]
        if f".{text}." not in self._all_names():  # the token only ever starts a name: a plain strip
            return self._column((STRIP, text + "."))
        names = self.names
        has = np.flatnonzero(np.fromiter(map(methodcaller("__contains__", text + "."), names), dtype=bool,
                                         count=len(names)))
        dotted = map(methodcaller("replace", f".{text}.", "."), map(".".__add__, np.array(names, dtype=object)[has]))
        renamed = map(itemgetter(slice(1, None)), dotted)  # _dropped, column-wise
        hit = self.local[np.fromiter(map(self.model_at.get, renamed, repeat(-1)), dtype=np.int64, count=has.size)]
        return has[hit >= 0], hit[hit >= 0]

    def _all_names(self) -> str:
        if self._joined is None:
            self._joined = "\n".join(self.names)  # a match of ".token." never spans the separator
        return self._joined

    def _pending(self, side: int) -> np.ndarray:
        """Free keys of ``side`` not enumerated yet."""
        return np.flatnonzero(self.free[side] & ~self.seen[side])

    def _complete(self, side: int, cands: set[tuple[int, str]]) -> None:
        """Give every new candidate its full raw pairs: from the hits once every free key of ``side`` is
        enumerated (pairs with keys no longer free never count again), else on the whole column; many
        new candidates at once are cheaper found by enumerating the rest of the side."""
        cands = {c for c in cands if c not in self.found}
        if cands and len(cands) > MAX_COLUMN_RULES:
            cands |= self._enumerate(side, self._pending(side))
            cands = {c for c in cands if c not in self.found}
        enumerated = not self._pending(side).size
        for cand in cands:
            if enumerated:
                pairs = sorted(self.hits[side][cand], key=lambda p: p[side])
                ci, mj = (np.array(v, dtype=np.int64) for v in zip(*pairs))
            else:
                ci, mj = self._column(cand)
            self.found[cand] = (self._sub_order(cand), ci, mj)

    def _sample(self, side: int, count: int) -> None:
        """Enumerate ``count`` more free keys of ``side`` (all of them if that is most of them)."""
        pending = self._pending(side)
        self._complete(side, self._enumerate(side, pending[:count] if count <= pending.size // 2 else pending))

    # ---- rounds ----------------------------------------------------------------------------------
    def _live(self) -> list[_Live]:
        c_free, m_free = self.free
        live = []
        for cand, (sub, ci, mj) in self.found.items():
            if cand in self.rejected:
                continue
            ok = c_free[ci] & m_free[mj]
            if not ok.any():
                continue
            ci, mj = ci[ok], mj[ok]
            order = (len(c_free), int(mj[0]), sub) if cand[0] == ADD else (int(ci[0]), cand[0], sub)
            if cand[0] == DROP:  # strip and add pairs are one-to-one by construction
                ci, mj = _one_to_one(ci, mj)
            if ci.size:
                live.append(_Live(cand, order, ci, mj))
        return live

    def _certified(self) -> list[_Live]:
        """The live candidates, once no unseen rule could pair as many keys as the best one."""
        for side in (0, 1):
            pending = self._pending(side)
            if not self.seen[side].any() and pending.size:
                seeds = np.unique(np.linspace(0, pending.size - 1, min(SEEDS, pending.size)).astype(np.int64))
                self._complete(side, self._enumerate(side, pending[seeds]))
        while True:
            live = self._live()
            best = max((x.ci.size for x in live), default=0)
            short = [(side, n - best + 1) for side in (0, 1) if (n := self._pending(side).size) and n >= best]
            if not short:
                return live
            for side, count in short:
                self._sample(side, count)

    def _score_ties(self, group: list[_Live]) -> None:
        """Count same-shape pairs where they can decide: between distinct pairings of the best count."""
        if self.same_shape is None or len(group) < 2:
            return
        distinct: list[tuple[np.ndarray, np.ndarray, list[_Live]]] = []
        for x in group:
            ci, mj = x.canonical()
            same = next((d for d in distinct if np.array_equal(ci, d[0]) and np.array_equal(mj, d[1])), None)
            if same is None:
                distinct.append((ci, mj, [x]))
            else:
                same[2].append(x)
        if len(distinct) < 2:  # one pairing: equal shape counts, so they cannot decide
            return
        for ci, mj, members in distinct:
            shapes = sum(bool(self.same_shape(c, m)) for c, m in zip(self.ckpt[ci], self.model[mj]))
            for x in members:
                x.shapes = shapes

    def _conflict(self, a: _Live, b: _Live) -> bool:
        """Whether two pairings disagree about any key they share."""
        for src, dst, other_src, other_dst, n in ((a.ci, a.mj, b.ci, b.mj, self.free[0].size),
                                                  (a.mj, a.ci, b.mj, b.ci, self.free[1].size)):
            to = np.full(n, -1, dtype=np.int64)
            to[src] = dst
            mapped = to[other_src]
            if np.any((mapped >= 0) & (mapped != other_dst)):
                return True
        return False

    def _apply(self, x: _Live) -> None:
        rule = x.rule
        self.result.rules.append(rule)
        self.result.pair(self.free_m[x.mj], self.free_c[x.ci])
        self.result.add_rule(self.free_c[x.ci], rule)
        self.free[0][x.ci] = False
        self.free[1][x.mj] = False

    def run(self) -> None:
        for _ in range(MAX_ROUNDS):
            live = self._certified()
            if not live:
                break
            best = max(x.ci.size for x in live)
            group = [x for x in live if x.ci.size == best]
            self._score_ties(group)
            group.sort(key=_Live.rank)
            top, rivals = group[0], group[1:]
            tied = [r for r in rivals if r.shapes == top.shapes and self._conflict(top, r)]
            if tied:  # two equally good renames pair the same keys differently: guess neither
                self.rejected.update([top.key, *(r.key for r in tied)])
                continue
            self._apply(top)
