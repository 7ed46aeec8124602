"""``diff()``: compare two checkpoints (or models, or state dicts) key by key and value by value, giving a
:class:`DiffReport` whose DataFrame says, for every key, whether it is in both or one only or differs in
shape or dtype, and how far its values moved (largest absolute change, relative L2 change, cosine
similarity, fraction of elements changed). Keys are paired by ``ckptviz.align`` with ``a`` as the model
side, so a ``module.``-prefixed fine-tuned copy lines up with its base. Values are read in one streaming
pass over both tensors, in blocks cast into small preallocated float64 buffers, never as whole-tensor
float copies (see :func:`diff_tensors` for the arithmetic and its NaN, integer and complex rules).
This module never opens widgets and never imports ipywidgets."""

from __future__ import annotations

import builtins
import functools
import html
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .align import Alignment, Rule, align
from .checkpoint import Checkpoint, as_checkpoint, dtype_name, tensor_info
from .errors import ModelError, NoTensorsError, SectionError
from .readers.mapped import Reads
from .readers.records import TensorTable
from .stats import ElementStream

STATUSES = ("both", "only_a", "only_b", "shape_differs", "dtype_differs")
DIFF_KEYS = ("max_abs_diff", "rel_l2", "cosine", "changed_frac")
COLUMNS = ["key", "key_b", "status", "shape_a", "shape_b", "dtype_a", "dtype_b", "numel", *DIFF_KEYS, "rule"]
STATUS_COLOURS = {
    "both": "#ffffff", "only_a": "#ffe3cc", "only_b": "#e2e6f7", "shape_differs": "#fbd9d7",
    "dtype_differs": "#fff1c2",
}
BLOCK_ELEMENTS = 1 << 18  # elements per block: three float64 buffers of 2 MiB each, per worker
TASK_BLOCKS = 4  # blocks per task handed to a worker thread
MAX_WORKERS = 4  # threads of the pass (at most torch.get_num_threads())
PARALLEL_ELEMENTS = 1 << 22  # below this many elements to compare, one thread does it all
PROGRESS_BYTES = 256 * 2**20  # a progress bar is shown above this many bytes to read, unless told
GROUP_BYTES = 64 * 2**20  # pairs read into memory together (both sides); a larger pair is read alone
STREAM_BYTES = 16 * 2**20  # stored dense pairs larger than this (both sides) stream through per-thread buffers
HTML_ROW_LIMIT = 200
_EXACT_INTS = (torch.int64, torch.uint64)  # values beyond 2**53 round in float64: count changes natively

Tick = Callable[[int], None]
Source = str | os.PathLike | Checkpoint | nn.Module | Mapping[str, Any]


# ---- the report ----------------------------------------------------------------------------------
class DiffReport:
    """The result of :func:`diff`: one row per key of ``a`` (in ``a``'s order), then the keys only in ``b``."""

    def __init__(self, frame: pd.DataFrame, a: Checkpoint, b: Checkpoint, section_a: str, section_b: str,
                 rules: list[Rule]):
        self.frame = frame
        self.a, self.b = a, b
        self.section_a, self.section_b = section_a, section_b
        self.rules = [r.as_tuple() for r in rules]

    @property
    def summary(self) -> dict[str, int]:
        counts = self.frame["status"].value_counts()
        return {s: int(counts.get(s, 0)) for s in STATUSES}

    def pair(self, key: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(tensor in a, tensor in b)`` of a row, by ``a``'s key (or ``key_b`` for a row only in ``b``);
        None on the side that lacks it."""
        rows = self.frame[self.frame["key"] == key]
        if rows.empty:
            rows = self.frame[(self.frame["status"] == "only_b") & (self.frame["key_b"] == key)]
        if rows.empty:
            raise SectionError(f"no row for key {key!r} in this diff; give a key of a (column 'key') or, "
                               "for a row only in b, its 'key_b'")
        row = rows.iloc[0]
        ta = self.a.tensor(row["key"], self.section_a) if row["key"] is not None else None
        tb = self.b.tensor(row["key_b"], self.section_b) if row["key_b"] is not None else None
        return ta, tb

    def by_change(self) -> pd.DataFrame:
        """The frame sorted by ``rel_l2``, most changed first (NaN last)."""
        return self.frame.sort_values("rel_l2", ascending=False, na_position="last", kind="stable")

    def styled(self, frame: pd.DataFrame | None = None):
        """A pandas Styler of ``frame`` (default: the whole report): rows coloured by status, a bar on rel_l2."""
        frame = self.frame if frame is None else frame
        finite = frame["rel_l2"].to_numpy(dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        others = [c for c in frame.columns if c != "rel_l2"]
        return (
            frame.style.apply(lambda row: [f"background-color: {STATUS_COLOURS[row['status']]}"] * len(others),
                              axis=1, subset=others)
            .bar(subset=["rel_l2"], vmin=0.0, vmax=top, color="#f4a6a0")
            .format({"max_abs_diff": "{:.3g}", "rel_l2": "{:.3g}", "cosine": "{:.6f}", "changed_frac": "{:.1%}"},
                    na_rep="—")
            .format(na_rep="—", subset=[c for c in others if c not in DIFF_KEYS])
            .hide(axis="index")
        )

    def _title(self) -> str:
        return (f"{self.a.path!r} [{self.section_a or '(top level)'}] vs "
                f"{self.b.path!r} [{self.section_b or '(top level)'}]")

    def _changed(self) -> int:
        return int((self.frame["changed_frac"] > 0).sum())

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.summary.items() if v)
        return f"DiffReport({self._title()}, {counts}, values changed in {self._changed()})"

    def to_html(self, path: Any, **kw: Any) -> Any:
        """Write this diff to ``path`` as one self-contained HTML file and return its Path; ``kw``
        as for :func:`ckptviz.html_report.write_report` (``title``, ``plots``, ``model``)."""
        from .html_report import write_report

        return write_report(self, path, **kw)

    def _repr_html_(self) -> str:
        badges = " ".join(
            f"<span style='background:{STATUS_COLOURS[s]};border:1px solid #ccc;padding:2px 6px;"
            f"border-radius:3px'>{s}: {n}</span>"
            for s, n in self.summary.items()
        )
        compared = int(self.frame["changed_frac"].notna().sum())
        rules = "".join(f"<li><code>{html.escape(str(Rule(*r)))}</code></li>" for r in self.rules)
        rules = f"<p>rename rules applied to b's keys:</p><ul>{rules}</ul>" if rules else ""
        ordered = self.by_change()
        undefined = ordered["rel_l2"].isna() & (ordered["changed_frac"] > 0)  # a NaN appeared on one side
        problem = (ordered["status"] != "both") | undefined
        frame = pd.concat([ordered[problem], ordered[~problem]])
        note = ""
        if len(frame) > HTML_ROW_LIMIT:
            note = (f"<p>showing {HTML_ROW_LIMIT} of {len(frame)} rows, problems and most changed first; "
                    "see <code>.frame</code></p>")
            frame = frame.head(HTML_ROW_LIMIT)
        return (
            f"<div class='ckptviz-diff'><p><b>{html.escape(self._title())}</b></p><p>{badges}</p>"
            f"<p>values changed in {self._changed()} of {compared} compared tensors</p>{rules}{note}"
            f"{self.styled(frame).to_html()}</div>"
        )


# ---- the verb ------------------------------------------------------------------------------------
def diff(
    a: Source,
    b: Source,
    *,
    section_a: str | None = None,
    section_b: str | None = None,
    rules: Iterable[tuple[str, str] | Rule] | None = None,
    auto_align: bool = True,
    progress: bool | None = None,
    executor: Any = None,
) -> DiffReport:
    """Compare checkpoint ``a`` with checkpoint ``b`` key by key and value by value.

    ``a`` and ``b`` are each a path, a :class:`Checkpoint`, an ``nn.Module`` (its state dict) or a
    mapping of tensors. ``rules`` (regex, replacement) rename ``b``'s keys first; ``auto_align`` then
    infers prefix and wrapper renames (``module.``, ``_orig_mod.``, ...). With a section left None,
    every weights section of that side is tried and the pair of sections that pairs the most keys wins
    (ties go to the better-ranked names). A ``tqdm.auto`` bar over bytes is shown when ``progress`` is
    True, or when it is None and more than 256 MiB are to be read. By default the values are read on
    worker threads in blocks; with ``executor`` (any ``concurrent.futures`` executor, or a
    ``dask.distributed`` Client) pairs are sent there in tasks, one file of ``a`` at a time, and each
    worker reads the files itself. The numbers are the same either way, bit for bit.
    """
    ck_a, ck_b = _as_source(a, "a"), _as_source(b, "b")
    names_a = [ck_a.resolve(section_a)] if section_a is not None else ck_a.sections or [ck_a.resolve(None)]
    names_b = [ck_b.resolve(section_b)] if section_b is not None else ck_b.sections or [ck_b.resolve(None)]
    best = None
    for na in names_a:
        shapes_a = {k: tensor_info(v)[0] for k, v in ck_a._section(na).items()}
        for nb in names_b:
            shapes_b = {k: tensor_info(v)[0] for k, v in ck_b._section(nb).items()}

            def same_shape(c: str, m: str, shapes_a=shapes_a, shapes_b=shapes_b) -> bool:
                return shapes_b[c] == shapes_a[m]

            al = align(list(shapes_a), list(shapes_b), rules=rules, auto=auto_align, same_shape=same_shape)
            if best is None or len(al.pairs) > len(best[2].pairs):
                best = (na, nb, al)
    na, nb, al = best
    rows, jobs = _rows(ck_a._section(na), ck_b._section(nb), al)
    numbers = _values(ck_a, na, ck_b, nb, jobs, progress, executor)
    for (i, _, _), values in zip(jobs, numbers):
        rows[i][8:12] = [values[k] for k in DIFF_KEYS]
    frame = pd.DataFrame(rows, columns=COLUMNS, dtype=object)  # empty cells stay None
    frame["numel"] = frame["numel"].astype(np.int64)
    for k in DIFF_KEYS:
        frame[k] = frame[k].astype(np.float64)
    return DiffReport(frame, ck_a, ck_b, na, nb, al.rules)


def _as_source(x: Any, side: str) -> Checkpoint:
    if isinstance(x, nn.Module):
        sd = x.state_dict()
        if not sd:
            raise NoTensorsError(f"diff: {side} is a {type(x).__name__} with an empty state dict: nothing to compare")
        return Checkpoint.from_mapping(sd, name=f"<{type(x).__name__}>")
    if not isinstance(x, (str, os.PathLike, Checkpoint, Mapping)):
        raise ModelError(f"diff: {side} must be a path, a ckptviz.Checkpoint, an nn.Module or a state dict "
                         f"(a mapping of tensors); got {type(x).__name__}")
    return as_checkpoint(x)


def _rows(table_a: TensorTable, table_b: TensorTable, al: Alignment) -> tuple[list[list], list[tuple[int, str, str]]]:
    """The frame's rows (values still NaN) and the jobs: (row, key in a, key in b) whose values are compared."""
    by_a = {m: c for c, m in al.pairs.items()}
    rows, jobs = [], []
    names_b = dict(zip(table_b.keys_list, zip(table_b.shape, table_b.dtype, table_b.numel().tolist())))
    for key, shape_a, dt_a, numel in zip(table_a.keys_list, table_a.shape, table_a.dtype, table_a.numel().tolist()):
        dtype_a = dtype_name(dt_a)
        c = by_a.get(key)
        if c is None:
            rows.append([key, None, "only_a", shape_a, None, dtype_a, None, numel, *[math.nan] * 4, None])
            continue
        shape_b, dt_b, _ = names_b[c]
        status = "shape_differs" if shape_a != shape_b else "both" if dt_a == dt_b else "dtype_differs"
        rule = "; ".join(str(r) for r in al.rule_of.get(c, [])) or None
        if status != "shape_differs":
            jobs.append((len(rows), key, c))
        rows.append([key, c, status, shape_a, shape_b, dtype_a, dtype_name(dt_b), numel, *[math.nan] * 4, rule])
    for c, (shape_b, dt_b, numel) in names_b.items():
        if c not in al.pairs:
            rows.append([None, c, "only_b", None, shape_b, None, dtype_name(dt_b), numel, *[math.nan] * 4, None])
    return rows, jobs


def _values(ck_a: Checkpoint, na: str, ck_b: Checkpoint, nb: str, jobs: list[tuple[int, str, str]],
            progress: bool | None, executor: Any) -> list[dict[str, float]]:
    """``DIFF_KEYS`` of each job's pair of tensors."""
    table_a, table_b = ck_a._section(na), ck_b._section(nb)
    size_a = dict(zip(table_a.keys_list, _data_bytes(table_a)))
    size_b = dict(zip(table_b.keys_list, _data_bytes(table_b)))
    if executor is not None:
        from .parallel import plan, run

        pair_of = {ka: kb for _, ka, kb in jobs}
        tasks = [[(ka, pair_of[ka]) for ka in keys] for keys in plan(table_a, list(pair_of))]
        parts = run(_diff_task, [(ck_a, na, ck_b, nb, t) for t in tasks], executor=executor, progress=progress,
                    sizes=[sum(size_a[ka] + size_b[kb] for ka, kb in t) for t in tasks], desc="diff",
                    progress_bytes=PROGRESS_BYTES)
        by_key = {ka: v for t, part in zip(tasks, parts) for (ka, _), v in zip(t, part)}
        return [by_key[ka] for _, ka, _ in jobs]
    total = sum(size_a[ka] + size_b[kb] for _, ka, kb in jobs)
    bar = None
    if progress or (progress is None and total > PROGRESS_BYTES):
        from tqdm.auto import tqdm  # imported only when shown: in a notebook it brings its own widget

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="diff")
    try:
        out: list[dict[str, float]] = []
        streamed = {ka for _, ka, kb in jobs if size_a[ka] + size_b[kb] > STREAM_BYTES}
        held = [0 if ka in streamed else size_a[ka] + size_b[kb] for _, ka, kb in jobs]
        for group in _groups(jobs, held):
            pairs = _inputs(ck_a, na, ck_b, nb, [(ka, kb) for _, ka, kb in group], streamed)
            out += _compare(pairs, BLOCK_ELEMENTS, bar.update if bar else None)
            del pairs  # this group's owned copies go before the next group is read
        return out
    finally:
        if bar is not None:
            bar.close()


def _groups(jobs: list, sizes: list[int], limit: int | None = None) -> Iterator[list]:
    """``jobs`` in order, cut into runs of at most ``limit`` bytes (default ``GROUP_BYTES``; a larger job
    runs alone): the values are owned copies, so memory holds one group at a time, not both checkpoints."""
    limit = GROUP_BYTES if limit is None else limit
    group, held = [], 0
    for job, n in zip(jobs, sizes):
        if group and held + n > limit:
            yield group
            group, held = [], 0
        group.append(job)
        held += n
    if group:
        yield group


def _data_bytes(table: TensorTable) -> list[int]:
    return [0 if d == "meta" else n for d, n in zip(table.device, table.nbytes().tolist())]


def _diff_task(ck_a: Checkpoint, na: str, ck_b: Checkpoint, nb: str, pairs: list[tuple[str, str]]) -> list[dict]:
    size_a = dict(zip(ck_a._section(na).keys_list, _data_bytes(ck_a._section(na))))
    size_b = dict(zip(ck_b._section(nb).keys_list, _data_bytes(ck_b._section(nb))))
    streamed = {ka for ka, kb in pairs if size_a[ka] + size_b[kb] > STREAM_BYTES}
    return _compare(_inputs(ck_a, na, ck_b, nb, pairs, streamed), BLOCK_ELEMENTS, None, workers=1)


def _inputs(ck_a: Checkpoint, na: str, ck_b: Checkpoint, nb: str, pairs: list[tuple[str, str]],
            streamed: set[str]) -> list[tuple[Any, Any]]:
    """The values of ``pairs``: those whose key in ``a`` is in ``streamed`` as ``ElementStream`` s where
    stored dense (read block by block into per-thread buffers, never whole), the others read together."""
    rest = [(ka, kb) for ka, kb in pairs if ka not in streamed]
    va, vb = ck_a.values([ka for ka, _ in rest], na), ck_b.values([kb for _, kb in rest], nb)
    ea, eb = ck_a._section(na), ck_b._section(nb)
    return [(ck_a._summary_input(ea[ka], Reads(True)), ck_b._summary_input(eb[kb], Reads(True)))
            if ka in streamed else (va[ka], vb[kb]) for ka, kb in pairs]


# ---- the streaming pass -------------------------------------------------------------------------
def diff_tensors(a: torch.Tensor, b: torch.Tensor, *, block_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """``DIFF_KEYS`` of two tensors of the same shape (any dtypes), in one streaming pass.

    ``max_abs_diff`` is max |b - a|; ``rel_l2`` is ||b - a|| / ||a|| (0 when no element changed, inf when
    only ``a`` is all zeros); ``cosine`` is a·b / (||a|| ||b||) (exactly 1 when no element changed, NaN
    when only one side is all zeros); ``changed_frac`` is the fraction of elements whose value differs
    (0 for empty tensors). Each block of ``block_elements`` is cast into float64 buffers and folded into
    sum a², sum b², sum a·b, sum (b-a)², max |b-a| and a changed count. float64 rather than float32:
    products of values of 16 bits or fewer are exact in it, squared bf16/fp16/fp32 values cannot
    overflow it, the sums stay accurate to ~1e-15 relative whatever the block size, and the pass still
    costs less than one ``sum(dtype=float32)`` over the same bytes. NaN-aware: two NaNs at the same
    place are equal and left out of the sums, equal infinities are equal, and a NaN against a number is
    a change whose difference is undefined, so ``max_abs_diff``, ``rel_l2`` and ``cosine`` are NaN.
    Integers and bool compare as numbers (changes of int64/uint64 beyond 2**53 are still counted
    exactly). Complex tensors compare through their real view (re, im pairs), which gives the complex
    norms and Re⟨a, b⟩; ``max_abs_diff`` is then the largest modulus |b - a| and an element counts as
    changed when either part changed. Meta tensors and dtypes without float values (quantized, packed)
    give NaN throughout.
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"diff_tensors needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if block_elements < 1:
        raise ValueError(f"block_elements must be positive, got {block_elements}")
    got = _compare([(a, b)], block_elements, None)[0]
    return {k: got[k] for k in DIFF_KEYS}


def _compare(pairs: list[tuple[torch.Tensor, torch.Tensor]], block: int, tick: Tick | None,
             workers: int | None = None) -> list[dict[str, float]]:
    """``DIFF_KEYS`` of each pair of equal-shaped tensors, reading each byte once.

    The work is cut into tasks of up to ``TASK_BLOCKS`` blocks, run on worker threads (up to
    ``MAX_WORKERS`` above ``PARALLEL_ELEMENTS``, else one), each with its own buffers and ONE intra-op
    thread: a block's dozen small ops would otherwise each open a parallel region, and on a busy
    machine every region waits for a descheduled thread (5-10x slower). Partial sums merge in task
    order, so results do not depend on the number of threads or their timing, bit for bit."""
    pairs = [_prepare(a, b) for a, b in pairs]
    tasks = [t for i, (a, b) in enumerate(pairs) if a is not None and not _same_memory(a, b)
             for t in _tasks(i, a, b, block)]
    sums = [_Sums() for _ in pairs]
    local = threading.local()

    def run(task: tuple[int, int, int | None]) -> _Sums:
        i, lo, hi = task
        if not hasattr(local, "buffers"):
            local.buffers = [torch.empty(block, dtype=torch.float64) for _ in range(3)]
        part = _Sums()
        a, b = pairs[i]
        if isinstance(a, ElementStream) or isinstance(b, ElementStream):  # this range, read into reused buffers
            if not hasattr(local, "raw"):
                local.raw = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
            a, b = _range(a, lo, hi, local.raw, 0), _range(b, lo, hi, local.raw, 1)
            lo, hi = 0, hi - lo
        pieces = _block_pairs(a, b, block) if hi is None else _flat_pieces(a, b, lo, hi, block)
        for pa, pb in pieces:
            _fold_block(pa, pb, local.buffers, part)
        return part

    if workers is None:
        workers = max(1, min(MAX_WORKERS, torch.get_num_threads(), len(tasks)))
        if sum(pairs[i][0].numel() for i in {t[0] for t in tasks}) < PARALLEL_ELEMENTS:
            workers = 1
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        _merge(tasks, pool.map(run, tasks), pairs, sums, tick)
    finally:  # on an interrupt, drop the tasks not started yet instead of finishing the whole pass
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch.get_num_threads())  # resets the process-wide pools the workers resized
    return [s.result(a.numel()) if a is not None else dict.fromkeys(DIFF_KEYS, math.nan)
            for s, (a, _) in zip(sums, pairs)]


def _merge(tasks: list, parts: Iterable[_Sums], pairs: list, sums: list[_Sums], tick: Tick | None) -> None:
    for (i, lo, hi), part in zip(tasks, parts):
        sums[i].merge(part)
        if tick:
            a, b = pairs[i]
            n = (a.numel() if hi is None else hi - lo)
            tick(n * (a.element_size() + b.element_size()))


def _prepare(a: Any, b: Any) -> tuple[Any, Any]:
    """The pair as plain tensors (or ``ElementStream`` s beside contiguous tensors), or (None, None)
    when it holds no comparable values."""
    if not (_has_values(a.dtype) and _has_values(b.dtype)):
        return None, None
    a, b = (x if isinstance(x, ElementStream) else _plain(x) for x in (a, b))
    if "meta" in (a.device.type, b.device.type):
        return None, None
    if isinstance(a, ElementStream) != isinstance(b, ElementStream) and not (a.is_contiguous() and b.is_contiguous()):
        a, b = (x.read() if isinstance(x, ElementStream) else x for x in (a, b))  # a strided side: cut by rows
    return a, b


def _plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    t = t.resolve_neg() if t.is_neg() else t
    return t.resolve_conj() if t.is_conj() else t


def _range(x: Any, lo: int, hi: int, raw: list[torch.Tensor], side: int) -> torch.Tensor:
    """Elements ``[lo, hi)`` of ``x`` flat: a view of a tensor, or a stream's read into ``raw[side]``."""
    if not isinstance(x, ElementStream):
        return x.view(-1)[lo:hi]
    size = (hi - lo) * x.element_size()
    if raw[side].numel() < size:
        raw[side] = torch.empty(size, dtype=torch.uint8)
    out = raw[side][:size].view(x.dtype)
    x.fill(lo, out)
    return out


def _same_memory(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` view the very same elements (tied weights, a model diffed with itself)."""
    if isinstance(a, ElementStream) or isinstance(b, ElementStream):
        return False
    return (a.dtype == b.dtype and a.device == b.device and a.data_ptr() == b.data_ptr()
            and a.stride() == b.stride())


def _tasks(i: int, a: torch.Tensor, b: torch.Tensor, block: int) -> list[tuple[int, int, int | None]]:
    """(pair, first, end) element ranges of ``TASK_BLOCKS`` blocks; (pair, 0, None) for a whole pair
    whose layout is not contiguous on both sides (cut along its leading dimensions instead)."""
    n = a.numel()
    if n == 0:
        return []
    if not (a.is_contiguous() and b.is_contiguous()):  # an ElementStream is
        return [(i, 0, None)]
    step = block * TASK_BLOCKS
    return [(i, lo, min(lo + step, n)) for lo in builtins.range(0, n, step)]


def _flat_pieces(a: torch.Tensor, b: torch.Tensor, lo: int, hi: int, n: int) -> Iterator[tuple[torch.Tensor, ...]]:
    fa, fb = a.view(-1), b.view(-1)
    for start in builtins.range(lo, hi, n):
        yield fa[start:min(start + n, hi)], fb[start:min(start + n, hi)]


def _block_pairs(a: torch.Tensor, b: torch.Tensor, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pieces of ``a`` and ``b`` covering the same elements in row-major order, at most ``n`` elements
    each: (possibly strided) views cut along the leading dimensions, copied by the caller into its
    contiguous buffers."""
    if a.dim() == 0 or (a.is_contiguous() and b.is_contiguous()):
        yield from _flat_pieces(a, b, 0, a.numel(), n)
        return
    row = a[0].numel()
    if row <= n:
        step = max(1, n // row)
        for start in builtins.range(0, a.shape[0], step):
            yield a[start:start + step], b[start:start + step]
    else:
        for i in builtins.range(a.shape[0]):
            yield from _block_pairs(a[i], b[i], n)


class _Sums:
    """Sum a², sum b², sum a·b, sum (b-a)², max |b-a| and the changed count, merged over blocks."""

    def __init__(self):
        self.aa = self.bb = self.ab = self.dd = 0.0
        self.max = 0.0
        self.changed = 0
        self.nonfinite_a = self.nonfinite_b = 0  # NaN/Inf elements on each side (series flags use them)
        self.fin_aa = self.fin_bb = 0.0  # sum a², sum b² over the finite elements only (diff_series' norms)

    def add(self, aa: float, bb: float, ab: float, dd: float, finite: bool = True) -> None:
        self.aa, self.bb, self.ab, self.dd = self.aa + aa, self.bb + bb, self.ab + ab, self.dd + dd
        if finite:
            self.fin_aa, self.fin_bb = self.fin_aa + aa, self.fin_bb + bb

    def add_max(self, m: float) -> None:
        self.max = m if math.isnan(m) or m > self.max else self.max  # NaN sticks

    def merge(self, other: _Sums) -> None:
        self.add(other.aa, other.bb, other.ab, other.dd, finite=False)
        self.fin_aa, self.fin_bb = self.fin_aa + other.fin_aa, self.fin_bb + other.fin_bb
        self.add_max(other.max)
        self.changed += other.changed
        self.nonfinite_a += other.nonfinite_a
        self.nonfinite_b += other.nonfinite_b

    def result(self, numel: int) -> dict[str, float]:
        na, nb, nd = math.sqrt(self.aa), math.sqrt(self.bb), math.sqrt(self.dd)
        if math.isnan(nd) or math.isnan(na):
            rel = math.nan
        else:
            rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
        if self.changed == 0:  # equal tensors (zero or not) point the same way
            cos = 1.0
        elif na > 0 and nb > 0:
            norms = math.sqrt(self.aa * self.bb)
            cos = self.ab / (norms if math.isfinite(norms) else na * nb)
            cos = cos if math.isnan(cos) else max(-1.0, min(1.0, cos))
        else:
            cos = math.nan  # one side is all zeros: no direction to compare
        return {"max_abs_diff": self.max, "rel_l2": rel, "cosine": cos,
                "changed_frac": self.changed / numel if numel else 0.0,
                # beyond DIFF_KEYS, for diff_series: the norms (of the finite values) and the NaN/Inf counts
                "norm_a": math.sqrt(self.fin_aa), "norm_b": math.sqrt(self.fin_bb), "norm_d": nd,
                "nonfinite_a": self.nonfinite_a, "nonfinite_b": self.nonfinite_b}


@functools.cache
def _has_values(dtype: torch.dtype) -> bool:
    """Whether the dtype's elements convert to float64 (not quantized, packed or bit dtypes)."""
    try:
        torch.zeros(1, dtype=dtype).to(torch.complex128 if dtype.is_complex else torch.float64)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _nbytes(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def _fold_block(pa: torch.Tensor, pb: torch.Tensor, buffers: list[torch.Tensor], sums: _Sums) -> None:
    """Fold one block pair (views of a and b, at most a buffer long) into ``sums``."""
    if pa.dtype.is_complex or pb.dtype.is_complex:
        _complex_block(pa, pb, sums)
        return
    n = pa.numel()
    x, y, d = (buf[:n].view(pa.shape) for buf in buffers)
    x.copy_(pa)
    y.copy_(pb)
    x, y, d = x.view(-1), y.view(-1), d.view(-1)
    torch.sub(y, x, out=d)
    aa, bb, ab, dd = torch.stack([torch.dot(x, x), torch.dot(y, y), torch.dot(x, y), torch.dot(d, d)]).tolist()
    if math.isfinite(aa) and math.isfinite(bb):  # no NaN or Inf in the block: the plain sums are right
        sums.add(aa, bb, ab, dd)
        if pa.dtype in _EXACT_INTS or pb.dtype in _EXACT_INTS:  # distinct values may round to one float64
            sums.changed += int(_ne(pa.cpu(), pb.cpu()).sum())
        elif dd == 0:  # an unchanged block (common in a fine-tune): nothing more to find
            return
        else:  # finite x, y: b - a == 0 exactly when a == b. sign(d)·sign(d) counts the nonzeros, branch-free
            # (torch.count_nonzero branches per element: 4-10x slower on a fine-tune's scattered changes)
            sums.changed += int(torch.dot(torch.sign(d, out=x), x))
        lo, hi = torch.aminmax(d)
        sums.add_max(max(-float(lo), float(hi)))
        return
    both_nan = torch.isnan(x) & torch.isnan(y)
    same = torch.eq(x, y) | both_nan
    sums.changed += n - int(same.sum())
    _count_nonfinite(x, y, sums)
    _fold_nonfinite(x, y, both_nan, same, sums)
    sums.add_max(float(torch.where(same, 0.0, y - x).abs().max()))


def _ne(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a != b`` exactly for integer blocks of any two dtypes (torch promotes no uint16/32/64 mix)."""
    if a.dtype != b.dtype:
        a, b = (x.to(torch.int64) if x.dtype in (torch.uint16, torch.uint32) else x for x in (a, b))
    if a.dtype != b.dtype and torch.uint64 in (a.dtype, b.dtype):
        u, other = (a, b) if a.dtype == torch.uint64 else (b, a)
        bits = u.view(torch.int64)  # the value where below 2**63; above, equal to no other dtype's value
        return torch.ne(bits, other) | (bits < 0)
    return torch.ne(a, b)


def _count_nonfinite(x: torch.Tensor, y: torch.Tensor, sums: _Sums) -> None:
    """Count the elements (a complex one once) holding NaN or Inf on each side of a block."""
    bad_x, bad_y = ~torch.isfinite(x), ~torch.isfinite(y)
    fx, fy = torch.where(bad_x, 0.0, x).reshape(-1), torch.where(bad_y, 0.0, y).reshape(-1)
    sums.fin_aa, sums.fin_bb = sums.fin_aa + float(torch.dot(fx, fx)), sums.fin_bb + float(torch.dot(fy, fy))
    if x.dim() == 2:  # complex, as (re, im) rows
        bad_x, bad_y = bad_x.any(1), bad_y.any(1)
    sums.nonfinite_a += int(bad_x.sum())
    sums.nonfinite_b += int(bad_y.sum())


def _fold_nonfinite(x: torch.Tensor, y: torch.Tensor, both_nan: torch.Tensor, same: torch.Tensor,
                    sums: _Sums) -> None:
    """The sums of a block holding NaN or Inf: both-NaN places are left out, equal places differ by 0."""
    x0, y0 = torch.where(both_nan, 0.0, x), torch.where(both_nan, 0.0, y)
    d = torch.where(same, 0.0, y - x)
    sums.add(*torch.stack([torch.dot(x0, x0), torch.dot(y0, y0), torch.dot(x0, y0), torch.dot(d, d)]).tolist(),
             finite=False)


def _complex_block(pa: torch.Tensor, pb: torch.Tensor, sums: _Sums) -> None:
    """One block of complex values, through the real view: (n, 2) float64 pairs (re, im)."""
    x = torch.view_as_real(pa.to("cpu", torch.complex128)).reshape(-1, 2)
    y = torch.view_as_real(pb.to("cpu", torch.complex128)).reshape(-1, 2)
    both_nan = torch.isnan(x) & torch.isnan(y)
    same = torch.eq(x, y) | both_nan
    sums.changed += x.shape[0] - int(same.all(1).sum())
    _count_nonfinite(x, y, sums)
    _fold_nonfinite(x.reshape(-1), y.reshape(-1), both_nan.reshape(-1), same.reshape(-1), sums)
    d = torch.where(same, 0.0, y - x)
    sums.add_max(float(torch.linalg.vector_norm(d, dim=1).max()))
