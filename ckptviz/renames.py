"""What exact names and prefix renames leave unpaired, paired by the model's structure.

Three passes over the keys :func:`~ckptviz.align.align` left free, in this order:

1. **Families**: known renames between two ways of saving one layer: torch's old ``weight_norm``
   (``weight_g``/``weight_v``) and its parametrized form (``parametrizations.weight.original0/1``),
   old and parametrized ``spectral_norm``, and ``gamma``/``beta`` vs ``weight``/``bias`` scoped to
   the model's norm layers (a module that owns a real ``gamma`` is never renamed).
2. **Structure**: modules are compared by their skeleton (the names without numeric indices and
   wrapper tokens) and their leaves' names and shapes; modules of one skeleton and signature pair in
   index order when both sides have the same number of them. A block wrapped or unwrapped in
   ``nn.Sequential`` (``prefilt.0.weight`` vs ``prefilt.0.0.weight``) and a list renumbered after a
   layer was removed (``blocks.3`` -> ``blocks.2``) resolve this way.
3. **Suggestions**: what remains pairs only as a suggestion: same shape and dtype, and either the only
   candidate on both sides, or the clear best by name. Two equally plausible candidates leave both
   unresolved, reported as ambiguous. A suggestion is never loaded until accepted.

Passes 1 and 2 pair only one-to-one and only equal shapes, as the prefix renames do; exact names always
win because only free keys take part.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import SequenceMatcher

import numpy as np
import pandas as pd

from .align import WRAPPER_TOKENS, Alignment, Rule

MAX_SCORED_PAIRS = 50_000  # name similarity is scored for at most this many pairs in all (bounded time)
CLEAR_MARGIN = 0.01  # the best candidate by name must beat the second by this much to be suggested

_W = r"(^|\.)"
_OLD, _NEW, _GB, _WB = 0, 1, 2, 3  # which keys a family rule applies to (see _kind)
FAMILIES: list[tuple[Rule, int]] = [  # (rule on a checkpoint key, the kind of key it applies to)
    (Rule(_W + r"(\w+)_g$", r"\1parametrizations.\2.original0", "weight_norm, old -> parametrized"), _OLD),
    (Rule(_W + r"(\w+)_v$", r"\1parametrizations.\2.original1", "weight_norm, old -> parametrized"), _OLD),
    (Rule(_W + r"parametrizations\.(\w+)\.original0$", r"\1\2_g", "weight_norm, parametrized -> old"), _NEW),
    (Rule(_W + r"parametrizations\.(\w+)\.original1$", r"\1\2_v", "weight_norm, parametrized -> old"), _NEW),
    (Rule(_W + r"(\w+)_orig$", r"\1parametrizations.\2.original", "spectral_norm, old -> parametrized"), _OLD),
    (Rule(_W + r"(\w+)_u$", r"\1parametrizations.\2.0._u", "spectral_norm, old -> parametrized"), _OLD),
    (Rule(_W + r"(\w+)_v$", r"\1parametrizations.\2.0._v", "spectral_norm, old -> parametrized"), _OLD),
    (Rule(_W + r"parametrizations\.(\w+)\.original$", r"\1\2_orig", "spectral_norm, parametrized -> old"), _NEW),
    (Rule(_W + r"parametrizations\.(\w+)\.0\._u$", r"\1\2_u", "spectral_norm, parametrized -> old"), _NEW),
    (Rule(_W + r"parametrizations\.(\w+)\.0\._v$", r"\1\2_v", "spectral_norm, parametrized -> old"), _NEW),
    (Rule(_W + r"gamma$", r"\1weight", "norm layers: gamma -> weight"), _GB),
    (Rule(_W + r"beta$", r"\1bias", "norm layers: beta -> bias"), _GB),
    (Rule(_W + r"weight$", r"\1gamma", "norm layers: weight -> gamma"), _WB),
    (Rule(_W + r"bias$", r"\1beta", "norm layers: bias -> beta"), _WB),
]
_RULES_BY_KIND = {kind: [r for r, k in FAMILIES if k == kind] for kind in (_OLD, _NEW, _GB, _WB)}
_OLD_LEAF = re.compile(r"_[gvu]$|_orig$")


def _kind(key: str) -> int | None:
    """Which family rules can rename ``key``: old-style norm leaves, parametrized ones, gamma/beta,
    weight/bias; None for any other key."""
    if "parametrizations." in key:
        return _NEW
    leaf = key.rpartition(".")[2]
    if leaf in ("weight", "bias"):
        return _WB
    if leaf in ("gamma", "beta"):
        return _GB
    return _OLD if _OLD_LEAF.search(leaf) else None


# what a model key of each kind is renamed from (a checkpoint key of the paired kind)
_FROM = {_NEW: _OLD, _OLD: _NEW, _WB: _GB, _GB: _WB}


@dataclass
class Inferred:
    """What the passes found beyond the alignment: suggestions (model row, checkpoint row, reason,
    confidence) and ambiguities (a key with several equally plausible partners, left unresolved)."""

    suggested: list[tuple[int, int, str, float]] = field(default_factory=list)
    ambiguous: list[tuple[str, str, list[str], str]] = field(default_factory=list)  # (side, key, candidates, why)


def infer(al: Alignment, model_shape: np.ndarray, ckpt_shape: np.ndarray, model_dtype: np.ndarray,
          ckpt_dtype: np.ndarray, norm_modules: Callable[[], set[str]]) -> Inferred:
    """Run the three passes on the keys ``al`` left free; passes 1 and 2 pair into ``al`` (with their
    rules), pass 3 returns suggestions. Shapes and dtypes are columns over ``al``'s keys."""
    out = Inferred()
    free_m, free_c = _free(al)
    if not free_m.size or not free_c.size:
        return out
    _families(al, free_m, free_c, model_shape, ckpt_shape, norm_modules)
    free_m, free_c = _free(al)
    if free_m.size and free_c.size:
        _structure(al, free_m, free_c, model_shape, ckpt_shape)
        free_m, free_c = _free(al)
    if free_m.size and free_c.size:
        _suggest(al, free_m, free_c, model_shape, ckpt_shape, model_dtype, ckpt_dtype, out)
    return out


def _free(al: Alignment) -> tuple[np.ndarray, np.ndarray]:
    taken = np.zeros(len(al.ckpt_keys), dtype=bool)
    taken[al.ckpt_row[al.ckpt_row >= 0]] = True
    return np.flatnonzero(al.ckpt_row < 0), np.flatnonzero(~taken)


def _pair(al: Alignment, pairs: list[tuple[int, int, Rule]]) -> None:
    """Pair (model row, checkpoint row, rule) triples into ``al``, one rule at a time."""
    by_rule: dict[Rule, list[tuple[int, int]]] = {}
    for m, c, rule in pairs:
        by_rule.setdefault(rule, []).append((m, c))
    for rule, mc in by_rule.items():
        m, c = (np.array(v, dtype=np.int64) for v in zip(*mc))
        al.pair(m, c)
        al.add_rule(c, rule)
        if rule not in al.rules:
            al.rules.append(rule)


def _one_to_one(pairs: list[tuple[int, int, Rule]]) -> list[tuple[int, int, Rule]]:
    """Keep the pairs whose model row and checkpoint row appear in no other pair."""
    ms = pd.Series([p[0] for p in pairs]).value_counts()
    cs = pd.Series([p[1] for p in pairs]).value_counts()
    return [p for p in pairs if ms[p[0]] == 1 and cs[p[1]] == 1]


def _module(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


# ---- 1. families ---------------------------------------------------------------------------------
def _families(al: Alignment, free_m: np.ndarray, free_c: np.ndarray, model_shape: np.ndarray,
              ckpt_shape: np.ndarray, norm_modules: Callable[[], set[str]]) -> None:
    model_keys, ckpt_keys = al.model_keys, al.ckpt_keys
    free_model, wanted = {}, set()  # model keys a family could rename to; the kinds of checkpoint key that could
    for j in free_m.tolist():
        kind = _kind(model_keys[j])
        if kind is not None:
            free_model[model_keys[j]] = j
            wanted.add(_FROM[kind])
    if not free_model:
        return
    norms: set[str] | None = None
    pairs = []
    for c in free_c.tolist():
        key = ckpt_keys[c]
        kind = _kind(key)
        if kind not in wanted:
            continue
        for rule in _RULES_BY_KIND[kind]:
            name = rule.apply(key)
            j = free_model.get(name) if name != key else None
            if j is None or model_shape[j] is None or model_shape[j] != ckpt_shape[c]:
                continue
            if kind in (_GB, _WB):  # gamma/beta only inside the model's norm layers
                norms = norm_modules() if norms is None else norms
                if _module(name)[0] not in norms:
                    continue
            pairs.append((j, c, rule))
    _pair(al, _one_to_one(pairs))


# ---- 2. structure --------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[0-9]+$")


def skeleton(module: str) -> tuple[str, ...]:
    """A module path without its numeric indices and wrapper tokens: ``blocks.3.0.attn`` -> ``('blocks', 'attn')``."""
    return tuple(p for p in module.split(".") if p and not _NUMBER.match(p) and p not in WRAPPER_TOKENS)


def _indices(module: str) -> tuple[int, ...]:
    return tuple(int(p) for p in module.split(".") if _NUMBER.match(p))


def _members(keys: np.ndarray, rows: np.ndarray) -> dict[str, list[tuple[str, int]]]:
    """Free keys grouped by module: module -> [(leaf, row)]."""
    members: dict[str, list[tuple[str, int]]] = {}
    for r in rows.tolist():
        module, _, leaf = keys[r].rpartition(".")
        members.setdefault(module, []).append((leaf, r))
    return members


def _classes(members: dict[str, list[tuple[str, int]]], skeletons: dict[str, tuple], keep: set[tuple],
             shapes: np.ndarray) -> dict[tuple, list[tuple[str, list]]]:
    """Modules whose skeleton is in ``keep``, grouped by (skeleton, signature): the signature is the
    module's free leaves with their shapes, so equal classes pair leaf by leaf with equal shapes."""
    classes: dict[tuple, list[tuple[str, list]]] = {}
    for module, leaves in members.items():
        sk = skeletons[module]
        if sk not in keep or any(shapes[r] is None for _, r in leaves):
            continue  # nothing like it on the other side, or a lazy tensor (no shape to agree on)
        leaves.sort()
        classes.setdefault((sk, tuple((leaf, shapes[r]) for leaf, r in leaves)), []).append((module, leaves))
    return classes


def _structure(al: Alignment, free_m: np.ndarray, free_c: np.ndarray, model_shape: np.ndarray,
               ckpt_shape: np.ndarray) -> None:
    m_members, c_members = _members(al.model_keys, free_m), _members(al.ckpt_keys, free_c)
    m_sk = {m: skeleton(m) for m in m_members}
    c_sk = {c: skeleton(c) for c in c_members}
    both = set(m_sk.values()) & set(c_sk.values())
    if not both:
        return
    model = _classes(m_members, m_sk, both, model_shape)
    ckpt = _classes(c_members, c_sk, both, ckpt_shape)
    pairs = []
    for signature, ms in model.items():
        cs = ckpt.get(signature)
        if not cs or len(cs) != len(ms):
            continue  # a different number of such modules: which pairs with which is not clear
        ms = sorted(ms, key=lambda m: _indices(m[0]))  # index order on both sides, whatever the file's order
        cs = sorted(cs, key=lambda c: _indices(c[0]))
        if len({_indices(m) for m, _ in ms}) < len(ms) or len({_indices(c) for c, _ in cs}) < len(cs):
            continue  # modules told apart by more than their indices: no order to pair them in
        for (m_mod, m_leaves), (c_mod, c_leaves) in zip(ms, cs):
            pattern = "^" + re.escape(c_mod + ".") if c_mod else "^"
            rule = Rule(pattern, (m_mod + "." if m_mod else "").replace("\\", "\\\\"), "structure")
            pairs += [(m, c, rule) for (_, m), (_, c) in zip(m_leaves, c_leaves)]
    _pair(al, _one_to_one(pairs))


# ---- 3. suggestions ------------------------------------------------------------------------------
def similarity(a: str, b: str) -> float:
    """How alike two key names are, by their dotted components (0 to 1): ``encoder.layers.0.weight``
    is closer to ``encoder.layer.0.weight`` than to ``encoder.layer.1.weight``; ``head.weight`` is as
    close to ``fc_a.weight`` as to ``fc_b.weight`` (letters shared by chance do not count)."""
    return SequenceMatcher(None, a.split("."), b.split("."), autojunk=False).ratio()


def _suggest(al: Alignment, free_m: np.ndarray, free_c: np.ndarray, model_shape: np.ndarray,
             ckpt_shape: np.ndarray, model_dtype: np.ndarray, ckpt_dtype: np.ndarray, out: Inferred) -> None:
    by_class: dict[tuple, tuple[list[int], list[int]]] = {}
    for j in free_m.tolist():
        if model_shape[j] is not None:
            by_class.setdefault((model_shape[j], model_dtype[j]), ([], []))[0].append(j)
    for c in free_c.tolist():
        if (cls := by_class.get((ckpt_shape[c], ckpt_dtype[c]))) is not None:
            cls[1].append(c)
    mk, ck = al.model_keys, al.ckpt_keys
    budget = MAX_SCORED_PAIRS
    for (shape, dtype), (ms, cs) in sorted(by_class.items(), key=lambda kv: len(kv[1][0]) * len(kv[1][1])):
        if not cs:
            continue
        what = f"same shape {tuple(shape)} and dtype {dtype}"
        if len(ms) == 1 and len(cs) == 1:
            m, c = ms[0], cs[0]
            sim = similarity(mk[m], ck[c])
            out.suggested.append((m, c, f"{what}, the only unpaired tensor of that shape on both sides", round(sim, 2)))
            continue
        budget -= len(ms) * len(cs)
        if budget < 0:
            break  # the rest stay missing and unexpected: too many look-alikes to rank by name
        scores = np.array([[similarity(mk[m], ck[c]) for c in cs] for m in ms])
        best_c = scores.argmax(axis=1)
        best_m = scores.argmax(axis=0)
        for i, m in enumerate(ms):
            row = scores[i]
            top = row[best_c[i]]
            rivals = np.flatnonzero(row >= top - CLEAR_MARGIN)
            col = scores[:, best_c[i]]
            col_rivals = np.flatnonzero(col >= top - CLEAR_MARGIN)
            if len(rivals) == 1 and len(col_rivals) == 1 and best_m[best_c[i]] == i:
                c = cs[int(best_c[i])]
                out.suggested.append((m, c, f"{what}, the closest name among {len(cs)} candidates",
                                      round(float(top), 2)))
            elif len(rivals) > 1:
                names = [str(ck[cs[int(k)]]) for k in rivals[:5]]
                out.ambiguous.append(("model", str(mk[m]), names,
                                      f"{len(rivals)} checkpoint tensors fit equally ({what})"))
        taken = {s[1] for s in out.suggested}
        for k, c in enumerate(cs):
            col = scores[:, k]
            rivals = np.flatnonzero(col >= col.max() - CLEAR_MARGIN)
            if len(rivals) > 1 and c not in taken:
                names = [str(mk[ms[int(i)]]) for i in rivals[:5]]
                out.ambiguous.append(("checkpoint", str(ck[c]), names,
                                      f"{len(rivals)} model tensors fit equally ({what})"))
