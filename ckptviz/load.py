"""``load_partial()``: put a Report's loadable rows into the live model, in place and atomically, with
an undo: by copying into the model's tensors, or (``assign=True``) by giving the model's very
Parameter and buffer objects the checkpoint's tensors, which materializes a meta-device model without
copying what needs no cast. (``load_optimizer()`` lives in ``optim_load``.)"""

from __future__ import annotations

import html
import weakref
from collections.abc import Callable, Iterable
from functools import partial

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapt import MULTI, apply_many
from .adapt import apply as adapt_apply
from .compare import Report, is_lazy, model_tensors
from .errors import AdaptError, LoadError
from .provenance import remember_initial

PROGRESS_BYTES = 512 * 2**20  # show a progress bar when loading more than this
META_HINT = "load with assign=True to materialize it from the checkpoint"


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers on the meta device (no values): its state-dict keys
    first, then non-persistent buffers, which no checkpoint holds."""
    names = [k for k, t in model_tensors(model).items() if t.is_meta]
    seen = set(names)
    names += [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta and n not in seen]
    return names


def _tied(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict keys that name one tensor object."""
    names: dict[int, list[str]] = {}
    for k, t in model_tensors(model).items():
        names.setdefault(id(t), []).append(k)
    return [keys for keys in names.values() if len(keys) > 1]


class _Assigned:
    """One model tensor object that an assign load gave new contents, and how to give the old ones back."""

    __slots__ = ("keys", "obj", "old", "how")

    def __init__(self, keys: list[str], obj: torch.Tensor, old: torch.Tensor, how: str):
        self.keys, self.obj, self.old, self.how = keys, obj, old, how

    def revert(self) -> None:
        if self.how == "data":
            self.obj.data = self.old
        else:  # "swap": ``old`` is the object that now holds the previous contents
            torch.utils.swap_tensors(self.obj, self.old)


class _Materialized:
    """Uninitialized lazy tensors (``nn.LazyLinear`` before a forward) this load gave the checkpoint's
    shape, as torch's ``_lazy_load_hook`` does, and how to make them uninitialized again."""

    __slots__ = ("items",)

    def __init__(self):
        self.items: list[tuple[torch.Tensor, type, torch.Tensor]] = []  # (object, its lazy class, its old data)

    def materialize(self, dst: torch.Tensor, shape: torch.Size) -> None:
        cls, old = type(dst), dst.data
        self.items.append((dst, cls, old))  # first: an interrupt cannot skip the revert
        dst.materialize(shape)  # the lazy tensor's own dtype and device, as torch's load hook does

    def revert(self) -> None:
        """Make every tensor uninitialized again (class and empty data back), last first."""
        for dst, cls, old in reversed(self.items):
            with torch.no_grad():
                dst.data = old
            dst.__class__ = cls
        self.items = []


def _materialize_lazy(live: dict[str, torch.Tensor], sources: dict[str, torch.Tensor],
                      skipped: dict[str, str]) -> _Materialized:
    """Give each uninitialized lazy model tensor in ``sources`` the checkpoint tensor's shape (the last
    key of a tie wins, as for the load itself); on failure or interrupt make them lazy again."""
    done, shapes = _Materialized(), {}
    for k, src in sources.items():
        dst = live[k]
        if not is_lazy(dst):
            continue
        if src.is_meta:
            skipped[k] = "the checkpoint tensor is on the meta device: it holds no values"
        elif src.is_complex() and not dst.dtype.is_complex:
            skipped[k] = f"complex {src.dtype} into real {dst.dtype} would drop the imaginary part"
        else:
            shapes[id(dst)] = (dst, src.shape)
    for k in [k for k in skipped if k in sources]:
        sources.pop(k)
    try:
        for dst, shape in shapes.values():
            done.materialize(dst, shape)
    except BaseException as e:
        done.revert()
        if not isinstance(e, Exception):
            raise
        raise LoadError(f"giving a lazy tensor the checkpoint's shape failed ({type(e).__name__}: {e}); "
                        "the model was restored, nothing was loaded") from e
    return done


class LoadResult:
    """What :func:`load_partial` did: keys loaded, skipped (with reasons), missing, unexpected, and
    (``still_meta``) the model's tensors that are still on the meta device after the load."""

    def __init__(self, model: nn.Module, report: Report, loaded: list[str], skipped: dict[str, str],
                 backup: _StorageBackup | list[_Assigned] | None, *, assign: bool = False,
                 device: str | None = None):
        self._model = weakref.ref(model)
        self._backup = backup
        self.report = report
        self.loaded = loaded
        self.skipped = skipped
        self.assign = assign
        self.device = device  # where meta tensors went (assign loads only)
        frame = report.frame
        self.missing_keys: list[str] = frame.loc[frame["status"] == "missing", "key"].tolist()
        self.unexpected_keys: list[str] = frame.loc[frame["status"] == "unexpected", "ckpt_key"].tolist()
        self.still_meta: list[str] = meta_tensors(model)
        self.tied: list[list[str]] = _tied(model)  # model keys that name one tensor object (tied weights)
        self.undone = False
        self.lazy: list[str] = []  # lazy model keys this load gave the checkpoint's shape (undo: lazy again)
        self._lazy: _Materialized | None = None

    @property
    def frame(self) -> pd.DataFrame:
        """One row per key of the report: outcome (loaded, skipped, missing, unexpected, not_selected) and why."""
        loaded, meta = set(self.loaded), set(self.still_meta)
        via = {k: next(o for o in names if o in loaded) for names in self.tied if loaded & set(names) for k in names}
        rows = []
        for r in self.report.frame.itertuples(index=False):
            if r.key in loaded:
                outcome, detail = "loaded", r.rule
            elif r.key in self.skipped:
                outcome, detail = "skipped", self.skipped[r.key]
            else:
                outcome, detail = (r.status if r.status in ("missing", "unexpected") else "not_selected"), None
            if r.key in via and outcome == "missing":
                detail = f"tied to {via[r.key]}, which was loaded"
            if r.key in meta and outcome != "loaded":
                detail = "; ".join(filter(None, [detail, "still on the meta device (no values)"]))
            rows.append((r.key, r.ckpt_key, outcome, detail))
        return pd.DataFrame(rows, columns=["key", "ckpt_key", "outcome", "detail"])

    def undo(self) -> None:
        """Put back exactly the values (for an assign load: the very tensors) that this load replaced."""
        if self.undone:
            raise LoadError("this load was already undone")
        if self._backup is None:
            raise LoadError("this load kept no copy of what it overwrote (it ran with undo=False); "
                            "load with load_partial(model, report) to be able to undo")
        model = self._model()
        if model is None:
            raise LoadError("the model this load went into no longer exists")
        live = model_tensors(model)
        if isinstance(self._backup, list):
            _undo_assign(live, self._backup)
        else:
            changed = self._backup.changed(live)
            if changed:
                raise LoadError(f"cannot undo: the model no longer holds the storages this load wrote to "
                                f"({changed[:5]}; e.g. a parameter was replaced or resized); nothing was restored")
            failed = self._backup.restore()
            if failed:
                raise LoadError(f"undo could not write back {len(failed)} storage(s) ({'; '.join(failed[:3])}); "
                                "the model is only partly restored")
        if self._lazy is not None:
            self._lazy.revert()
        self.undone = True
        if isinstance(self._backup, list):
            self._backup = []
        else:
            self._backup.clear()

    def __repr__(self) -> str:
        meta = f", still_meta={len(self.still_meta)}" if self.still_meta or self.assign else ""
        return (f"LoadResult(loaded={len(self.loaded)}, skipped={len(self.skipped)}, "
                f"missing={len(self.missing_keys)}, unexpected={len(self.unexpected_keys)}{meta}"
                f"{', assign' if self.assign else ''}{', undone' if self.undone else ''})")

    def _meta_html(self) -> str:
        if not self.still_meta:
            return ""
        shown = ", ".join(f"<code>{html.escape(k)}</code>" for k in self.still_meta[:20])
        more = f" and {len(self.still_meta) - 20} more" if len(self.still_meta) > 20 else ""
        return (f"<p style='color:#8a4b00'>{len(self.still_meta)} tensor(s) are still on the meta device "
                f"and hold no values, so the model cannot run yet: {shown}{more}</p>")

    def _repr_html_(self) -> str:
        colours = {"loaded": "#e3f4e6", "skipped": "#fbd9d7", "missing": "#ffe3cc", "unexpected": "#e2e6f7",
                   "not_selected": "#f2f2f2"}
        frame = self.frame
        frame = frame[frame["outcome"] != "loaded"] if len(frame) > 200 else frame
        styled = (frame.style.apply(lambda r: [f"background-color: {colours[r['outcome']]}"] * len(r), axis=1)
                  .format(na_rep="—").hide(axis="index"))
        head = html.escape(repr(self))
        return (f"<div class='ckptviz-loadresult'><p><b>{head}</b></p>{self._meta_html()}"
                f"{styled.to_html()}</div>")


class _StorageBackup:
    """The bytes of every model storage a copying load wrote to, saved once per storage (so two
    Parameters over one storage, tied weights and a buffer that views a weight are saved and put back
    once, whole), with the storage objects themselves to write them back into."""

    __slots__ = ("saved", "swapped")

    def __init__(self):
        self.saved: dict[tuple[str, int], tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
        # model tensors given fresh storage (their old one kept whole, untouched, as the undo copy)
        self.swapped: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def swap_in(self, dst: torch.Tensor, write: Callable[[torch.Tensor], None]) -> bool:
        """Write the new values (``write(out)``) into fresh storage and give it to ``dst``, keeping the
        old storage as the undo copy (one write instead of a backup copy plus a write), if ``dst``
        alone uses its storage."""
        if id(dst) in self.swapped:
            write(dst)  # a tied key of a tensor already given fresh storage by this load
            return True
        if not _exclusive(dst):
            return False
        new = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
        write(new)
        old = dst.data
        self.swapped[id(dst)] = (dst, old, new.data_ptr())
        dst.data = new
        return True

    def keep(self, dst: torch.Tensor) -> None:
        """Save ``dst``'s whole storage, unless it (or a tensor sharing it) was saved already."""
        st = dst.untyped_storage()
        where = (str(st.device), st.data_ptr())
        if where not in self.saved:
            self.saved[where] = (st, st.clone())

    def changed(self, live: dict[str, torch.Tensor]) -> list[str]:
        """Model keys whose storage is no longer one this backup can write back into whole."""
        objs = {id(t) for t in live.values()}
        moved = [f"{tuple(t.shape)} tensor given other memory" for oid, (t, _, ptr) in self.swapped.items()
                 if oid not in objs or t.data_ptr() != ptr]
        if moved:
            return moved
        held = {(str(t.untyped_storage().device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in live.values() if not t.is_meta}
        return [f"storage at {ptr:#x}" for (dev, ptr), (st, old) in self.saved.items()
                if held.get((dev, ptr)) != old.nbytes() or st.nbytes() != old.nbytes()]

    def restore(self) -> list[str]:
        """Write every saved storage back; returns the ones that could not be written (empty: all were)."""
        failed = []
        for t, old, _ in self.swapped.values():
            try:
                t.data = old
            except BaseException as e:  # noqa: BLE001 - keep restoring the others, then say which failed
                failed.append(f"a {tuple(t.shape)} tensor ({type(e).__name__}: {e})")
        for (dev, ptr), (st, old) in self.saved.items():
            try:
                st.copy_(old)
            except BaseException as e:  # noqa: BLE001 - keep restoring the others, then say which failed
                failed.append(f"storage at {ptr:#x} on {dev} ({type(e).__name__}: {e})")
        return failed

    def clear(self) -> None:
        self.saved, self.swapped = {}, {}


def _exclusive(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain, dense, contiguous tensor (or Parameter) that alone uses its whole
    storage, so replacing the storage changes nothing any other tensor sees."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or t.layout != torch.strided:
        return False  # accelerator tensors keep their addresses (CUDA graphs capture them)
    if t.is_inference() or not t.is_contiguous() or t.storage_offset() != 0:
        return False
    st = t.untyped_storage()
    if st.nbytes() != t.numel() * t.element_size():
        return False
    return torch._C._storage_Use_Count(st._cdata) <= 2  # ``t`` itself and ``st`` here


def _undo_assign(live: dict[str, torch.Tensor], done: list[_Assigned]) -> None:
    moved = [a.keys[0] for a in done if any(live.get(k) is not a.obj for k in a.keys)]
    if moved:
        raise LoadError(f"cannot undo: the model holds other tensor objects than the load gave it (keys {moved[:5]}); "
                        "nothing was restored")
    stuck = [f"{a.keys[0]} ({why})" for a in done if a.how == "swap" and (why := _swap_problem(a.obj))]
    if stuck:
        raise LoadError(f"cannot undo: {'; '.join(stuck[:5])}. Drop those references and undo again; "
                        "nothing was restored")
    _revert(done)


def _revert(done: list[_Assigned]) -> None:
    for a in reversed(done):
        a.revert()


def _plan(report: Report, live: dict[str, torch.Tensor], keys: Iterable[str] | None):
    rows = {r.key: r for r in report.frame.itertuples(index=False) if isinstance(r.key, str)}
    if rows.keys() != live.keys():
        extra = sorted(live.keys() ^ rows.keys())[:5]
        raise LoadError(f"the report was made for a different model (keys differ, e.g. {extra}); "
                        "run ckptviz.compare(model, checkpoint) on this model first")
    if keys is None:
        tried = ("match", "dtype_mismatch", "shape_mismatch", "adapted", "suggested")  # suggested: skipped, saying why
        selected = [k for k, r in rows.items() if r.status in tried]
    else:
        selected = list(dict.fromkeys(keys))
        unknown = [k for k in selected if k not in rows]
        if unknown:
            raise LoadError(f"keys not in the model: {unknown[:10]}; pass model keys (the report's 'key' column)")
    plan, skipped = {}, {}
    for k in selected:
        r = rows[k]
        if r.status == "missing":
            skipped[k] = "not in the checkpoint"
        elif r.status == "suggested":
            skipped[k] = (f"only suggested ({r.ckpt_key!r}: {r.rule.removeprefix('suggested: ')}); "
                          f"accept it first: report.accept([{k!r}])")
        elif r.status == "adapted" and not report.adaptations[k].loads:
            skipped[k] = report.adaptations[k].text
        elif r.status == "shape_mismatch":
            skipped[k] = f"shape {tuple(r.ckpt_shape)} in the checkpoint, {tuple(r.model_shape)} in the model"
        else:
            plan[k] = r.ckpt_key
    return plan, skipped


def _sources(report: Report, plan: dict[str, str]) -> dict[str, torch.Tensor]:
    """The checkpoint tensors the plan reads, keyed by model key: views of each file's one private map
    (no RAM up front; an assign load keeps them as the model's tensors)."""
    entries = report.checkpoint.values(set(plan.values()), report.section, copy=False)
    return {k: entries[c] for k, c in plan.items()}


def _adapted(report: Report, live: dict[str, torch.Tensor], sources: dict[str, torch.Tensor],
             plan: dict[str, str], skipped: dict[str, str]) -> dict[str, torch.Tensor]:
    """``sources`` with each adapted row's tensor computed (model-shaped, in memory) before anything is
    written; a row whose adaptation cannot run is skipped with the reason."""
    for k in [k for k in plan if k in report.adaptations]:
        a = report.adaptations[k]
        try:
            if a.method in MULTI:
                parts = report.checkpoint.values(list(a.options["keys"]), report.section, copy=False)
                sources[k] = apply_many(a, [parts[c] for c in a.options["keys"]])
            else:
                sources[k] = adapt_apply(a, sources[k], live[k])
        except AdaptError as e:
            skipped[k] = f"{report.adaptations[k].text}: {e}"
            del sources[k], plan[k]
    return sources


def load_partial(model: nn.Module, report: Report, *, keys: Iterable[str] | None = None, undo: bool = True,
                 assign: bool = False, device: str | torch.device | None = None) -> LoadResult:
    """Load checkpoint tensors into ``model`` in place (``strict=False`` semantics, shape-safe).

    Loads every ``match`` and ``dtype_mismatch`` row of ``report`` (or exactly ``keys``), cast to each
    model tensor's dtype and device. Everything is checked before the first write, and a failure
    leaves the model as it was. The copying load (default) copies each tensor aside just before
    overwriting it, so ``LoadResult.undo()`` works; ``undo=False`` keeps no such copy (for models too
    big to hold twice, and as fast as ``load_state_dict``): a failure then names the tensors written.
    A model tensor on the meta device holds no memory to copy into: it is skipped, with a reason.

    ``assign=True`` (like ``load_state_dict(assign=True)``) instead gives the model's own Parameter
    and buffer objects the checkpoint's tensors: identity, ``requires_grad`` and ties are kept, meta
    tensors are materialized on ``device`` (default ``"cpu"``; others stay on their device), and a
    tensor that needs no cast or move is the checkpoint's memory-mapped tensor itself (no copy, no RAM
    up front; writes stay private, never reaching the file). The dtype rule is the copying load's: a
    model tensor keeps its dtype, meta ones included, so a file in another dtype is cast (a copy);
    build the model in the file's dtype to avoid it. All casts run before the first tensor is given,
    so a failure changes nothing. Undo puts the previous tensors back (for meta ones, free to keep);
    ``undo=False`` lets them go at once.
    """
    if device is not None and not assign:
        raise LoadError("device= says where meta tensors go in an assign load; pass assign=True with it")
    live = model_tensors(model)
    plan, skipped = _plan(report, live, keys)
    sources = _adapted(report, live, _sources(report, plan), plan, skipped)
    target = _meta_target(device) if assign else None
    lazy = _materialize_lazy(live, sources, skipped)  # lazy tensors take the file's shape, as in torch
    try:
        result = _load(model, report, live, plan, sources, skipped, undo, assign, target)
    except BaseException as e:
        made = [k for k in live if any(live[k] is d for d, _, _ in lazy.items)]
        lazy.revert()  # the load was rolled back (or left partial with undo=False): lazy ones are lazy again
        if made:
            e.add_note(f"ckptviz: the {len(made)} lazy tensor(s) this load had given the checkpoint's shapes are "
                       f"uninitialized again, as before the call ({', '.join(made[:5])}"
                       f"{' ...' if len(made) > 5 else ''}).")
        raise
    loaded_ids = {id(live[k]) for k in result.loaded}
    result.lazy = [k for k in result.loaded if any(live[k] is d for d, _, _ in lazy.items)]
    unwritten = _Materialized()  # materialized but then skipped: uninitialized again
    unwritten.items = [item for item in lazy.items if id(item[0]) not in loaded_ids]
    lazy.items = [item for item in lazy.items if id(item[0]) in loaded_ids]
    unwritten.revert()
    result._lazy = lazy if undo else None
    return result


def _load(model: nn.Module, report: Report, live: dict[str, torch.Tensor], plan: dict[str, str],
          sources: dict[str, torch.Tensor],
          skipped: dict[str, str], undo: bool, assign: bool, target: torch.device | None) -> LoadResult:
    if assign:
        return _assign_load(model, report, live, sources, skipped, undo, target)
    ready: dict[str, torch.Tensor] = {}
    for k, src in sources.items():
        reason = _cannot_copy(src, live[k])
        if reason:
            skipped[k] = reason
        else:
            ready[k] = src
    remember_initial(model, live, (k for k in live if k not in ready and not is_lazy(live[k])))
    backup = _copy_into(live, ready, undo, _writer(report, plan, ready))
    return LoadResult(model, report, list(ready), skipped, backup)


def _writer(report: Report, plan: dict[str, str], sources: dict[str, torch.Tensor]
            ) -> Callable[[str, torch.Tensor], None]:
    """``write(key, out)``: the checkpoint's values of model key ``key`` into ``out``, read from the
    file with ``pread`` (straight into ``out`` where dtype and layout allow), never through a map, so
    a file cut short during the load is a clear error (and a rollback), not a crash."""
    ck = report.checkpoint

    def write(key: str, out: torch.Tensor) -> None:
        src = sources[key]
        if key in report.adaptations:  # computed already (in memory, model-shaped)
            out.copy_(src)
        elif type(src) is not torch.Tensor or type(out) not in (torch.Tensor, nn.Parameter):
            out.copy_(src)  # tensor subclasses keep their own copy semantics
        elif out.device.type == "cpu" and out.dtype == src.dtype and not out.is_inference():
            ck.read_into(plan[key], out, report.section)
            _bump_version(out)
        else:
            out.copy_(ck.tensor(plan[key], report.section, copy=True))

    return write


def _bump_version(t: torch.Tensor) -> None:
    """Tell autograd that ``t`` changed in place (as ``copy_`` would), after a write it did not see."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(t)


def _copy_into(live: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], undo: bool,
               write: Callable[[str, torch.Tensor], None]) -> _StorageBackup | None:
    """Copy each source into its model tensor; on any failure or interrupt (``BaseException``:
    Ctrl-C included) write every touched storage back (with ``undo``) and re-raise. Returns the backup."""
    backup = _StorageBackup() if undo else None
    total = sum(t.numel() * t.element_size() for t in sources.values())
    written: list[str] = []
    try:
        with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="loading",
                                   disable=total < PROGRESS_BYTES) as bar:
            for key, src in sources.items():
                dst = live[key]
                written.append(key)
                put = partial(write, key)
                if backup is None:
                    put(dst)
                elif not backup.swap_in(dst, put):
                    backup.keep(dst)
                    put(dst)
                bar.update(src.numel() * src.element_size())
    except BaseException as e:
        what = f"copying {written[-1]!r} into the model failed ({type(e).__name__}: {e})" if written else (
            f"loading failed before the first copy ({type(e).__name__}: {e})")
        if backup is None:
            done = (f"{len(written) - 1} tensor(s) before it were loaded ({written[:-1][:5]}); "
                    "load with undo=True (the default) for an all-or-nothing load.")
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: let it through, say what happened
                e.add_note(f"ckptviz: load_partial was interrupted: {done}")
                raise
            raise LoadError(f"{what}. {done}") from e
        failed = backup.restore()
        if not isinstance(e, Exception):  # the model is back (or says it is not): let the interrupt through
            e.add_note("ckptviz: load_partial was interrupted; " + (
                f"restoring the model FAILED for {len(failed)} storage(s): {'; '.join(failed[:3])}" if failed else
                "the model was restored to exactly its previous values, nothing was loaded."))
            raise
        if failed:
            raise LoadError(f"{what}. Restoring the model failed for {len(failed)} storage(s) "
                            f"({'; '.join(failed[:3])}): the model is NOT as it was") from e
        raise LoadError(f"{what}. The model was restored to exactly its previous values; nothing was loaded.") from e
    return backup


def _cannot_copy(src: torch.Tensor, dst: torch.Tensor) -> str | None:
    """Why ``src`` cannot be copied into ``dst`` in place, or None."""
    if dst.is_meta:
        return f"the model tensor is on the meta device: it has no memory to copy into; {META_HINT}"
    reason = _cannot_take(src, dst)
    if reason:
        return reason
    if dst.numel() > 1 and torch._debug_has_internal_overlap(dst) == 1:
        return "the model tensor has overlapping memory (e.g. an expand()ed buffer) and cannot be written in place"
    return None


def _cannot_take(src: torch.Tensor, dst: torch.Tensor) -> str | None:
    """Why ``dst`` cannot take ``src``'s values at all (copied or assigned), or None."""
    if src.shape != dst.shape:
        return f"shape {tuple(src.shape)} in the checkpoint, {tuple(dst.shape)} in the model"
    if src.is_meta:
        return "the checkpoint tensor is on the meta device: it holds no values"
    if src.is_complex() and not dst.is_complex():
        return f"complex {src.dtype} into real {dst.dtype} would drop the imaginary part"
    return None


# ---- assign loads ------------------------------------------------------------------------------------
class _Group:
    """One model tensor object (tied weights: several keys) and the checkpoint tensor it will take."""

    __slots__ = ("dst", "keys", "src")

    def __init__(self, dst: torch.Tensor):
        self.dst, self.keys, self.src = dst, [], None


def _meta_target(device: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise LoadError(f"device={device!r} is not a torch device ({e}); pass e.g. 'cpu' or 'cuda:0'") from None
    if dev.type == "meta":
        raise LoadError("device='meta' would leave the meta tensors without values; "
                        "pass the device to materialize them on, e.g. 'cpu'")
    return dev


def _swap_problem(t: torch.Tensor) -> str | None:
    """Why ``torch.utils.swap_tensors`` would refuse ``t``, or None."""
    if weakref.getweakrefs(t):
        return "something holds a weak reference to it"
    busy = "other tensors (views of it, or a live autograd graph) still refer to it"
    count = t._use_count()
    if count == 2 and t.is_leaf and t.requires_grad:  # the second reference may be its gradient accumulator
        node = torch.autograd.graph.get_gradient_edge(t).node  # made now if it did not exist (as swap does)
        count = t._use_count()
        del node
    return busy if count > 2 or (count == 2 and not (t.is_leaf and t.requires_grad)) else None


def _groups(live: dict[str, torch.Tensor], sources: dict[str, torch.Tensor],
            skipped: dict[str, str]) -> dict[int, _Group]:
    """The model tensor objects to assign, by id; like the copying load, the last key of a tie wins."""
    groups: dict[int, _Group] = {}
    for k, src in sources.items():
        dst = live[k]
        reason = _cannot_take(src, dst)
        if reason:
            skipped[k] = reason
            continue
        g = groups.setdefault(id(dst), _Group(dst))
        g.keys.append(k)
        g.src = src
    return groups


def _convert(groups: dict[int, _Group], device: torch.device) -> dict[int, torch.Tensor]:
    """Each object's new tensor, cast to its dtype and moved to its device (meta ones: ``device``).
    Nothing is copied where nothing changes; every conversion runs before the model is touched."""
    targets = {oid: device if g.dst.is_meta else g.dst.device for oid, g in groups.items()}
    moved = {oid for oid, g in groups.items() if g.src.dtype != g.dst.dtype or g.src.device != targets[oid]}
    total = sum(groups[oid].src.numel() * groups[oid].src.element_size() for oid in moved)
    news: dict[int, torch.Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=total < PROGRESS_BYTES) as bar:
        for oid, g in groups.items():
            target = targets[oid]
            try:
                news[oid] = g.src.to(device=target, dtype=g.dst.dtype).detach()
            except Exception as e:  # noqa: BLE001 - an unavailable device, out of memory: all the same to the user
                raise LoadError(
                    f"converting {g.keys[0]!r} ({g.src.dtype} on {g.src.device}) to {g.dst.dtype} on {target} "
                    f"failed ({type(e).__name__}: {e}); nothing was loaded, the model is as it was"
                ) from e
            bar.update(g.src.numel() * g.src.element_size() if oid in moved else 0)
    _unshare(news)
    return news


def _unshare(news: dict[int, torch.Tensor]) -> None:
    """Copy new tensors whose bytes overlap another's (a file that stores two keys in one storage, given
    to untied model tensors) or themselves (an expanded tensor), so no two model tensors alias."""
    spans = []
    for oid, t in news.items():
        if t.numel() and torch._debug_has_internal_overlap(t) == 1:
            news[oid] = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
            spans.append((str(t.device), t.data_ptr(), t.data_ptr() + extent * t.element_size(), oid))
    reach: dict[str, int] = {}
    for dev, start, end, oid in sorted(spans):
        if start < reach.get(dev, -1):
            news[oid] = news[oid].clone(memory_format=torch.contiguous_format)
        else:
            reach[dev] = end


def _steps(groups: dict[int, _Group], news: dict[int, torch.Tensor],
           skipped: dict[str, str]) -> list[tuple[_Group, torch.Tensor, str]]:
    """How each object takes its new tensor: ``.data =`` (same kind of tensor: storage replaced in place)
    or ``torch.utils.swap_tensors`` (meta to a real device); objects that allow neither are skipped."""
    steps = []
    for oid, g in groups.items():
        dst, new = g.dst, news[oid]
        if not dst.is_meta and torch._has_compatible_shallow_copy_type(dst, new):
            steps.append((g, new, "data"))
            continue
        why = (f"it is a {type(dst).__name__} (a tensor subclass); ckptviz assigns into plain tensors and "
               "nn.Parameter only" if type(dst) not in (torch.Tensor, nn.Parameter) else _swap_problem(dst))
        if why:
            skipped.update({k: f"cannot be replaced in place: {why}" for k in g.keys})
            continue
        if isinstance(dst, nn.Parameter):
            new = nn.Parameter(new, requires_grad=dst.requires_grad)
        elif dst.requires_grad:
            new.requires_grad_(True)
        new.__dict__.update(dst.__dict__)  # attributes set on the object (e.g. by a framework) stay with it
        steps.append((g, new, "swap"))
    return steps


def _apply(steps: list[tuple[_Group, torch.Tensor, str]]) -> list[_Assigned]:
    """Give every object its new tensor; on any failure put back the ones already given and raise."""
    done: list[_Assigned] = []
    try:
        for g, new, how in steps:
            if how == "data":
                done.append(_Assigned(g.keys, g.dst, g.dst.data, how))  # first: an interrupt cannot skip it
                g.dst.data = new
            else:
                torch.utils.swap_tensors(g.dst, new)
                done.append(_Assigned(g.keys, g.dst, new, how))  # ``new`` now holds the previous contents
    except BaseException as e:
        _revert(done)
        if not isinstance(e, Exception):
            e.add_note("ckptviz: the assign load was interrupted; the model holds exactly the tensors it had.")
            raise
        raise LoadError(f"assigning {g.keys[0]!r} failed ({type(e).__name__}: {e}). The model was restored: "
                        "it holds exactly the tensors it had; nothing was loaded.") from e
    return done


def _assign_load(model: nn.Module, report: Report, live: dict[str, torch.Tensor], sources: dict[str, torch.Tensor],
                 skipped: dict[str, str], undo: bool, device: torch.device) -> LoadResult:
    groups = _groups(live, sources, skipped)
    steps = _steps(groups, _convert(groups, device), skipped)
    taken = {k for g, _, _ in steps for k in g.keys}
    remember_initial(model, live, (k for k in live if k not in taken and not is_lazy(live[k])))
    done = _apply(steps)
    loaded = [k for k in sources if k in taken]
    return LoadResult(model, report, loaded, skipped, done if undo else None, assign=True, device=str(device))
