"""Shape adaptations for transfer learning, opt-in per row: what to write into a model tensor whose
shape differs from the checkpoint's.

- ``slice``: copy the overlapping block (a new class count or vocabulary, a position table cut or
  extended); the rest of the model tensor keeps its current values.
- ``channels``: a convolution's input channels (timm's ``adapt_input_conv``): 1 channel = the sum over
  the saved channels; N channels = the saved ones repeated and scaled by saved/N.
- ``resample``: a position-embedding grid resampled bicubically to the model's grid, prefix tokens (class,
  distillation, registers) kept; or a patch-embedding kernel resampled to another patch size (FlexiViT's
  pseudo-inverse resize, as timm's ``resample_patch_embed``).
- ``reinit``: load nothing; the model tensor keeps its initialization, and the report says so.

Each method checks the two shapes first (:func:`plan`), says in words what will happen, computes the
model-shaped tensor (:func:`apply`) and writes the same as plain PyTorch (:func:`code`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import AdaptError

METHODS = ("slice", "channels", "resample", "reinit")  # the per-row ones; layouts adds stack, concat, split
MULTI = ("stack", "concat")  # adaptations that read several checkpoint tensors
MAX_PREFIX_TOKENS = 16
_DIM_NAMES = ("rows", "columns")


@dataclass(frozen=True)
class Adaptation:
    """One row's adaptation: ``method``, the shapes, what will happen (``text``) and its options."""

    method: str
    ckpt_shape: tuple[int, ...]
    model_shape: tuple[int, ...]
    text: str
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def loads(self) -> bool:
        """Whether anything is written (``reinit`` writes nothing)."""
        return self.method != "reinit"


def applicable(ckpt_shape: tuple[int, ...] | None, model_shape: tuple[int, ...] | None, key: str = "") -> list[str]:
    """The methods that fit these two shapes, most specific first (``reinit`` always). A token grid is
    offered for resampling only when ``key`` names a position embedding (``pos_embed``, ...)."""
    out, later = [], []
    for method in ("resample", "channels", "slice"):
        try:
            a = plan(method, ckpt_shape, model_shape)
        except AdaptError:
            if method == "resample" and _token_table(ckpt_shape, model_shape) and re.search(r"pos", key, re.I):
                later.append(method)  # a grid no square fits: offered last, it needs grid=/prefix_tokens=
            continue
        if a.method == "resample" and a.options.get("kind") == "grid" and not re.search(r"pos", key, re.IGNORECASE):
            continue
        out.append(method)
    return [*out, *later, "reinit"]


def _token_table(c, m) -> bool:
    """Whether two shapes are ([1,] tokens, dim) tables that differ only in the number of tokens."""
    return (c is not None and m is not None and len(c) in (2, 3) and len(c) == len(m) and c[-1] == m[-1]
            and tuple(c[:-2]) == tuple(m[:-2]) and c[-2] != m[-2])


def plan(method: str, ckpt_shape, model_shape, **options) -> Adaptation:
    """Check that ``method`` fits the two shapes and describe it; raises :class:`AdaptError` if not."""
    if method not in METHODS:
        raise AdaptError(f"unknown adaptation {method!r}; use one of {', '.join(METHODS)}")
    if ckpt_shape is None or model_shape is None:
        raise AdaptError("both the checkpoint tensor and the model tensor need a shape to adapt")
    c, m = tuple(ckpt_shape), tuple(model_shape)
    if method == "reinit":
        return Adaptation(method, c, m, "reinit: kept as initialized, nothing loaded", options)
    if c == m:
        raise AdaptError(f"the shapes already agree ({c}): nothing to adapt")
    if method == "slice":
        return _plan_slice(c, m, options)
    if method == "channels":
        return _plan_channels(c, m, options)
    return _plan_resample(c, m, options)


def _plan_slice(c, m, options) -> Adaptation:
    if len(c) != len(m):
        raise AdaptError(f"slice needs tensors with as many dimensions: {c} vs {m}")
    parts = []
    for d, (a, b) in enumerate(zip(c, m)):
        if a != b:
            what = _DIM_NAMES[d] if d < 2 else f"dim {d}"
            kept = f"first {min(a, b)} copied" + (", the rest kept as initialized" if b > a else "")
            parts.append(f"{what} {a}→{b} ({kept})")
    return Adaptation("slice", c, m, "slice " + "; ".join(parts), options)


def _plan_channels(c, m, options) -> Adaptation:
    if len(c) < 3 or len(c) != len(m) or c[0] != m[0] or c[2:] != m[2:] or c[1] == m[1]:
        raise AdaptError(f"channels needs a convolution weight that differs only in input channels "
                         f"(dim 1): {c} vs {m}")
    i, n = c[1], m[1]
    how = f"sum over the {i} saved channels" if n == 1 else f"saved channels repeated, scaled by {i}/{n}"
    return Adaptation("channels", c, m, f"channels {i}→{n} ({how})", options)


def _square(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r > 0 and r * r == n else None


def _plan_resample(c, m, options) -> Adaptation:
    if len(c) == 4 and c[:2] == m[:2] and c[2:] != m[2:]:  # a patch-embedding kernel (D, C, p, p)
        return Adaptation("resample", c, m, f"resample kernel {c[2]}×{c[3]}→{m[2]}×{m[3]} (pseudo-inverse resize)",
                          {**options, "kind": "kernel"})
    if len(c) not in (2, 3) or len(c) != len(m) or c[-1] != m[-1] or c[:-2] != m[:-2]:
        raise AdaptError(f"resample needs a position embedding ([1,] tokens, dim) or a patch kernel "
                         f"(dim, channels, h, w): {c} vs {m}")
    nc, nm = c[-2], m[-2]
    prefix = options.get("prefix_tokens")
    grids = options.get("grid"), options.get("old_grid")
    candidates = [prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)
    for p in candidates:
        old = tuple(grids[1]) if grids[1] else ((g, g) if (g := _square(nc - p)) else None)
        new = tuple(grids[0]) if grids[0] else ((g, g) if (g := _square(nm - p)) else None)
        if old and new and old[0] * old[1] == nc - p and new[0] * new[1] == nm - p and old != new:
            text = (f"resample {old[0]}×{old[1]}→{new[0]}×{new[1]} grid, bicubic"
                    + (f" ({p} prefix token{'s' if p != 1 else ''} kept)" if p else ""))
            return Adaptation("resample", c, m, text, {**options, "kind": "grid", "prefix_tokens": p,
                                                       "old_grid": old, "grid": new})
    raise AdaptError(f"no square grid fits {nc} and {nm} tokens (with 0 to {MAX_PREFIX_TOKENS} prefix tokens); "
                     "pass grid=(h, w), old_grid=(h, w) and prefix_tokens=")


def apply(a: Adaptation, src: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
    """The model-shaped tensor that ``a`` writes, in ``src``'s dtype (a load casts it as usual).
    ``current`` (the model tensor now) is needed by ``slice``, which keeps what it does not copy."""
    if tuple(src.shape) != a.ckpt_shape:
        raise AdaptError(f"the checkpoint tensor has shape {tuple(src.shape)}, the adaptation was planned for "
                         f"{a.ckpt_shape}")
    if a.method == "slice":
        if current is None or current.is_meta:
            if any(mm > cc for cc, mm in zip(a.ckpt_shape, a.model_shape)):
                raise AdaptError("slice keeps the model's own values outside the copied block, and this model "
                                 "tensor has none (meta device): materialize the model first, or use reinit")
            out = torch.empty(a.model_shape, dtype=src.dtype)
        else:
            out = current.detach().to(device="cpu", dtype=src.dtype, copy=True)
        block = tuple(slice(0, min(cc, mm)) for cc, mm in zip(a.ckpt_shape, a.model_shape))
        out[block] = src[block]
        return out
    if a.method == "channels":
        w = src.float()
        n = a.model_shape[1]
        if n == 1:
            w = w.sum(dim=1, keepdim=True)
        else:
            reps = [1] * w.dim()
            reps[1] = math.ceil(n / w.shape[1])
            w = w.repeat(*reps)[:, :n] * (w.shape[1] / n)
        return w.to(src.dtype)
    if a.method == "split":
        return src.narrow(a.options["dim"], a.options["offset"], a.model_shape[a.options["dim"]]).clone()
    if a.method == "resample":
        if a.options["kind"] == "kernel":
            return _resample_kernel(src, a.model_shape[2:])
        return _resample_grid(src, a.options["prefix_tokens"], a.options["old_grid"], a.options["grid"])
    raise AdaptError(f"{a.method} writes nothing")


def apply_many(a: Adaptation, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A ``stack`` or ``concat`` adaptation (see :mod:`ckptviz.layouts`) of the checkpoint tensors in order."""
    if any(tuple(t.shape) != a.ckpt_shape for t in tensors):
        got = [tuple(t.shape) for t in tensors][:3]
        raise AdaptError(f"the checkpoint tensors' shapes changed since the report: {got}")
    join = torch.stack if a.method == "stack" else torch.cat
    groups = a.options.get("groups")
    if groups:  # each group joined first (inner), then the groups
        inner = torch.stack if a.options["inner"] == "stack" else torch.cat
        at = dict(zip(a.options["keys"], tensors))
        tensors = [inner([at[k] for k in g], dim=a.options["inner_dim"]) for g in groups]
    return join(list(tensors), dim=a.options["dim"])


def _resample_grid(src: torch.Tensor, prefix: int, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed``: prefix tokens kept, the grid resized bicubically (antialiased)."""
    x = src if src.dim() == 3 else src[None]
    head, grid = x[:, :prefix], x[:, prefix:]
    d = grid.shape[-1]
    grid = grid.float().reshape(x.shape[0], old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(x.shape[0], new[0] * new[1], d).to(src.dtype)
    out = torch.cat([head, grid], dim=1)
    return out if src.dim() == 3 else out[0]


def resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """The (new h*w, old h*w) matrix of a bicubic antialiased resize, column by column."""
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
    resized = F.interpolate(basis.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
    return resized.reshape(old[0] * old[1], -1).double().T


def _resample_kernel(src: torch.Tensor, new: tuple[int, int]) -> torch.Tensor:
    """FlexiViT's patch-embedding resize (timm ``resample_patch_embed``): the kernel ``w'`` with
    ``<resize(x), w'> ≈ <x, w>``, i.e. ``w' = pinv(R^T) w`` for the resize matrix ``R``."""
    old = tuple(src.shape[2:])
    inverse = torch.linalg.pinv(resize_matrix(old, new).T)  # (new, old)
    flat = src.double().reshape(-1, old[0] * old[1])
    return (flat @ inverse.T).reshape(*src.shape[:2], *new).to(src.dtype)


def code(a: Adaptation, key: str) -> str:
    """The same adaptation as plain PyTorch, on ``sd`` (keyed by model names) and ``dst`` (the model's
    state dict); imports: ``math``, ``torch``, ``torch.nn.functional as F``."""
    k = repr(key)
    if a.method in ("stack", "concat"):
        fn = "torch.stack" if a.method == "stack" else "torch.cat"
        if a.options.get("groups"):
            inner = "torch.stack" if a.options["inner"] == "stack" else "torch.cat"
            groups = list(map(list, a.options["groups"]))
            parts = f"{inner}([raw[c] for c in g], dim={a.options['inner_dim']}) for g in {groups!r}"
            return f"sd[{k}] = {fn}([{parts}], dim={a.options['dim']})  # {a.text}\n"
        return f"sd[{k}] = {fn}([raw[c] for c in {list(a.options['keys'])!r}], dim={a.options['dim']})  # {a.text}\n"
    if a.method == "split":
        d, o = a.options["dim"], a.options["offset"]
        return f"sd[{k}] = raw[{a.options['source']!r}].narrow({d}, {o}, {a.model_shape[d]}).clone()  # {a.text}\n"
    if a.method == "slice":
        block = ", ".join(f":{min(c, m)}" for c, m in zip(a.ckpt_shape, a.model_shape))
        return (f"t = dst[{k}].detach().clone().to(sd[{k}].dtype)  # {a.text}\n"
                f"t[{block}] = sd[{k}][{block}]\nsd[{k}] = t\n")
    if a.method == "channels":
        n = a.model_shape[1]
        if n == 1:
            return f"sd[{k}] = sd[{k}].float().sum(dim=1, keepdim=True).to(sd[{k}].dtype)  # {a.text}\n"
        reps = ", ".join(["1", str(math.ceil(n / a.ckpt_shape[1]))] + ["1"] * (len(a.ckpt_shape) - 2))
        return (f"sd[{k}] = (sd[{k}].float().repeat({reps})[:, :{n}] * ({a.ckpt_shape[1]} / {n}))"
                f".to(sd[{k}].dtype)  # {a.text}\n")
    if a.method == "resample" and a.options["kind"] == "grid":
        p, (oh, ow), (nh, nw) = a.options["prefix_tokens"], a.options["old_grid"], a.options["grid"]
        lead = "" if len(a.ckpt_shape) == 3 else "[None]"
        back = "" if len(a.ckpt_shape) == 3 else "[0]"
        return (f"x = sd[{k}]{lead}  # {a.text}\n"
                f"g = x[:, {p}:].float().reshape(x.shape[0], {oh}, {ow}, -1).permute(0, 3, 1, 2)\n"
                f"g = F.interpolate(g, size=({nh}, {nw}), mode='bicubic', antialias=True, align_corners=False)\n"
                f"g = g.permute(0, 2, 3, 1).reshape(x.shape[0], {nh * nw}, -1).to(x.dtype)\n"
                f"sd[{k}] = torch.cat([x[:, :{p}], g], dim=1){back}\n")
    if a.method == "resample":
        old, new = a.ckpt_shape[2:], a.model_shape[2:]
        return (f"# {a.text}: w' = pinv(R^T) w, R the bicubic resize {old} -> {new} (as timm's "
                "resample_patch_embed)\n"
                f"basis = torch.eye({old[0] * old[1]}).reshape(-1, 1, {old[0]}, {old[1]})\n"
                f"R = F.interpolate(basis, size={tuple(new)}, mode='bicubic', antialias=True, align_corners=False)"
                f".reshape({old[0] * old[1]}, -1).double().T\n"
                f"w = sd[{k}]\n"
                f"sd[{k}] = (w.double().reshape(-1, {old[0] * old[1]}) @ torch.linalg.pinv(R.T).T)"
                f".reshape(*w.shape[:2], {new[0]}, {new[1]}).to(w.dtype)\n")
    return f"sd.pop({k}, None)  # {a.text}\n"


def preview(report, model, key: str, adaptation: Adaptation | None = None) -> dict[str, torch.Tensor]:
    """For an adapted row of ``report`` (or a row whose shapes differ, with an ``adaptation`` from
    :func:`plan` not applied yet): ``{"checkpoint": saved tensor, "model now": the model's tensor,
    "will be written": what ``load_partial`` would write}`` (nothing is written), to compare before loading."""
    from .compare import model_tensors

    a = adaptation if adaptation is not None else report.adaptations.get(key)
    if a is None:
        raise AdaptError(f"{key!r} is not adapted in this report; call report.adapt({key!r}, method) first")
    row = report.frame.loc[report.frame["key"] == key].iloc[0]
    src = report.checkpoint.tensor(row["ckpt_key"], report.section)
    live = model_tensors(model)[key].detach()
    out = {"checkpoint": src, "model now": live}
    if a.loads:
        out["will be written"] = apply(a, src, live).to(live.dtype)
    return out
