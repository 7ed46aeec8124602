"""Streaming statistics and histograms of tensors: one pass over a tensor's memory in bounded blocks,
never a whole-tensor float copy, so a multi-GB memory-mapped tensor costs only a block of working
memory. Dtypes of one or two bytes (bf16, fp16, float8, int8/16, uint8/16, bool) are reduced to a
table counting each of their 256 or 65536 bit patterns (``torch.bincount`` over the raw bits); every
statistic and any histogram then follow exactly from that table. Wider dtypes are read in float64
blocks (sum, centred sum of squares merged across blocks, min, max, zeros), and their histogram takes
one more pass once the range is known. NaN and ±Inf are counted apart and excluded from everything
else. This module takes tensors and never opens files; ``StatsCache`` remembers results per file."""

from __future__ import annotations

import builtins
import functools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

CHUNK_BYTES = 64 * 2**20  # default cap on the bytes of a tensor processed at once
PROGRESS_BYTES = 256 * 2**20  # stats_frame shows a progress bar above this total, unless told
STATS_KEYS = ("numel", "mean", "std", "min", "max", "abs_max", "l2", "zero_frac", "nan", "inf")
_TABLE_BLOCK = 1 << 20  # elements per bincount call (its int32 index buffer: 4 MiB, one per thread)
_FLOAT_BLOCK_BYTES = 2 * 2**20  # bytes per block on the float64 path (two float64 buffers of it)
_SMALL = 1 << 14  # tensors of at most this many elements are summarised from one float64 copy
_WIDE = {torch.float32, torch.float64, torch.int32, torch.int64, torch.uint32, torch.uint64,
         torch.complex32, torch.complex64, torch.complex128}

Tick = Callable[[int], None]
STREAM_BYTES = 8 * 2**20  # bytes an ElementStream reads at once into its one reused buffer


class ElementStream:
    """A dense tensor's elements, read on demand into one reused buffer: ``fill(start, out)`` writes
    ``out.numel()`` elements from flat index ``start`` into ``out``. Summarising one costs a buffer of
    ``STREAM_BYTES`` (not the whole tensor, and no fresh pages per tensor); a pass may read it twice."""

    device = torch.device("cpu")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], fill: Callable[[int, torch.Tensor], None]):
        self.dtype, self.shape, self.fill = dtype, tuple(shape), fill
        self._numel = math.prod(self.shape)

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_contiguous(self) -> bool:  # the elements come in row-major order
        return True

    @property
    def nbytes(self) -> int:
        return self._numel * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        """The whole tensor, in memory of its own."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if self._numel:
            self.fill(0, out.view(-1))
        return out

    def blocks(self, n: int) -> Iterator[torch.Tensor]:
        """1-D blocks of ``n`` elements (the last may be shorter), views of the reused buffer: each is
        valid until the next is asked for, except that a last short block stays valid."""
        piece = max(n, (STREAM_BYTES // self.dtype.itemsize) // n * n)
        size = min(piece, self._numel) * self.dtype.itemsize
        held = getattr(_STREAM_BUFFER, "free", None)  # this thread's buffer, unless a stream holds it
        raw = held if held is not None and held.numel() >= size else torch.empty(size, dtype=torch.uint8)
        _STREAM_BUFFER.free = None
        try:
            buf = raw[:size].view(self.dtype)
            for start in builtins.range(0, self._numel, piece):
                k = min(piece, self._numel - start)
                self.fill(start, buf[:k])
                for lo in builtins.range(0, k, n):
                    yield buf[lo:min(lo + n, k)]
        finally:
            if held is None or raw is held or raw.numel() > held.numel():
                _STREAM_BUFFER.free = raw
            else:
                _STREAM_BUFFER.free = held


_STREAM_BUFFER = threading.local()  # .free: the buffer ElementStream.blocks reuses on this thread


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of the finite values in ``len(counts)`` bins bounded by ``edges`` (numpy's convention:
    half-open bins, the last one closed). NaN, ±Inf and finite values outside the edges are counted
    apart and never binned."""

    counts: np.ndarray  # int64, (bins,)
    edges: np.ndarray  # float64, (bins + 1,)
    nan: int = 0
    inf: int = 0
    outside: int = 0  # finite values outside [edges[0], edges[-1]] (only with an explicit range)

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        """Number of values in the bins."""
        return int(self.counts.sum())

    @property
    def centers(self) -> np.ndarray:
        return self.edges[:-1] / 2 + self.edges[1:] / 2  # no overflow near the largest float

    @property
    def mode(self) -> float:
        """Centre of the fullest bin (NaN when the histogram is empty)."""
        return float(self.centers[int(self.counts.argmax())]) if self.total else math.nan

    def __repr__(self) -> str:
        return (f"Histogram(bins={self.bins}, range=({self.edges[0]:.4g}, {self.edges[-1]:.4g}), "
                f"total={self.total}, nan={self.nan}, inf={self.inf}, outside={self.outside})")


# ---- public verbs --------------------------------------------------------------------------------
def tensor_stats(t: torch.Tensor, *, chunk_bytes: int = CHUNK_BYTES) -> dict[str, float]:
    """Statistics of ``t`` in one streaming pass: ``STATS_KEYS`` mapped to floats.

    ``mean``, ``std`` (population, ddof=0), ``min``, ``max``, ``abs_max`` and ``l2`` are over the
    finite values only; ``nan`` and ``inf`` (either sign) count the rest; ``zero_frac`` is zeros over
    ``numel``. Undefined values (empty tensor, no finite value, meta tensor, unsupported dtype such as
    quantized or packed float4) are NaN. Complex tensors are summarised by their magnitudes ``|z|``;
    bool as 0/1; uint64 beyond 2**53 is rounded to float64.
    """
    return _summarize(t, None, None, chunk_bytes, None)[0]


def histogram(t: torch.Tensor, bins: int = 64, range: tuple[float, float] | None = None, *,
              chunk_bytes: int = CHUNK_BYTES) -> Histogram:
    """Histogram of the finite values of ``t``; ``range`` defaults to their (min, max).

    Counts equal ``numpy.histogram(finite_values_as_float64, bins=h.edges)``.
    """
    return _summarize(t, bins, range, chunk_bytes, None)[1]


def summarize(t: torch.Tensor, bins: int = 64, *, range: tuple[float, float] | None = None,
              chunk_bytes: int = CHUNK_BYTES) -> tuple[dict[str, float], Histogram]:
    """``(tensor_stats(t), histogram(t, bins, range))`` in the fewest passes: one for dtypes of one or
    two bytes or when ``range`` is given, otherwise two (the second bins with the range found)."""
    return _summarize(t, bins, range, chunk_bytes, None)


def stats_frame(tensors: Mapping[str, torch.Tensor], *, progress: bool | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> pd.DataFrame:
    """One row of ``tensor_stats`` per key (index ``key``, columns ``STATS_KEYS``).

    A ``tqdm.auto`` bar over bytes is shown when ``progress`` is True, or when it is None and the
    tensors hold more than 256 MiB.
    """
    total = sum(_nbytes(t) for t in tensors.values())
    bar = None
    if progress or (progress is None and total > PROGRESS_BYTES):
        from tqdm.auto import tqdm  # imported only when shown: in a notebook it brings its own widget

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="statistics")
    try:
        rows = [_summarize(t, None, None, chunk_bytes, bar.update if bar else None)[0] for t in tensors.values()]
    finally:
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows, columns=list(STATS_KEYS), index=pd.Index(list(tensors), name="key"), dtype="float64")


class StatsCache:
    """LRU cache of ``summarize`` results keyed by (file, its mtime and size, section, key, bins, range),
    so a view can show them again at once. Only tensors of an existing file are cached; in-memory
    tensors (a live model's) may change, so they are always recomputed. Thread-safe."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[dict[str, float], Histogram]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def file_key(path: str | os.PathLike | None) -> tuple | None:
        """(real path, mtime, size) of the file, or None when ``path`` names no existing file."""
        try:
            st = os.stat(path) if path is not None else None
        except (OSError, TypeError, ValueError):
            st = None
        return None if st is None else (os.path.realpath(path), st.st_mtime_ns, st.st_size)

    @classmethod
    def key(cls, path: str | os.PathLike | None, section: str | None, key: str, bins: int = 64,
            range: tuple[float, float] | None = None, *, file_key: tuple | None = None) -> tuple | None:
        """The cache key, or None when ``path`` names no existing file (``file_key``: its
        :meth:`file_key`, when the caller has it already)."""
        fk = file_key if file_key is not None else cls.file_key(path)
        if fk is None:
            return None
        return (*fk, section, key, bins, tuple(map(float, range)) if range is not None else None)

    def summarize(self, path: str | os.PathLike | None, section: str | None, key: str,
                  tensor: torch.Tensor | Callable[[], torch.Tensor], bins: int = 64, *,
                  range: tuple[float, float] | None = None,
                  file_key: tuple | None = None) -> tuple[dict[str, float], Histogram]:
        """Cached ``summarize(tensor, bins, range=range)``; ``tensor`` may be a callable giving it,
        so a hit reads nothing."""
        ck = self.key(path, section, key, bins, range, file_key=file_key)
        with self._lock:
            if ck is not None and ck in self._entries:
                self.hits += 1
                self._entries.move_to_end(ck)
                stats, hist = self._entries[ck]
                return dict(stats), hist
            self.misses += 1
        value = summarize(tensor() if callable(tensor) else tensor, bins, range=range)
        if ck is not None:
            with self._lock:
                self._entries[ck] = value
                self._entries.move_to_end(ck)
                while len(self._entries) > self.maxsize:
                    self._entries.popitem(last=False)
        return dict(value[0]), value[1]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


CACHE = StatsCache()  # shared by Checkpoint.histogram and the widgets


# ---- dispatch ------------------------------------------------------------------------------------
def _summarize(t: torch.Tensor | ElementStream, bins: int | None, rng: tuple[float, float] | None,
               chunk_bytes: int, tick: Tick | None) -> tuple[dict[str, float], Histogram | None]:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if isinstance(t, ElementStream):
        if t.nbytes <= STREAM_BYTES or t.numel() <= _SMALL or (_value_table(t.dtype) is None and t.dtype not in _WIDE):
            t = t.read()  # small: one read; unsupported dtypes: their statistics are NaN
    elif not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    else:
        t = t.detach()
        if t.is_neg():
            t = t.resolve_neg()
    numel = t.numel()
    table = _value_table(t.dtype)
    if t.device.type == "meta" or (table is None and t.dtype not in _WIDE):
        return _undefined(numel), _empty_hist(bins, rng) if bins else None
    distinct, repeats = (t, 1) if isinstance(t, ElementStream) else _distinct(t)
    if repeats > 1:  # stride-0 dimensions repeat each element: summarise the distinct ones, scale the counts
        stats, hist = _summarize(distinct, bins, rng, chunk_bytes, (lambda n: tick(n * repeats)) if tick else None)
        return _repeated(stats, repeats), _repeated_hist(hist, repeats)
    if 0 < numel <= _SMALL and t.device.type == "cpu":  # one float64 copy: no per-pass overhead
        if tick:
            tick(numel * t.element_size())
        return _small(t, bins, rng)
    if table is not None:
        counts = _count_bits(t, chunk_bytes, tick)
        return _table_stats(table, counts), _table_hist(table, counts, bins, rng) if bins else None
    if bins is None:
        return _wide_pass(t, chunk_bytes, tick)[0], None
    if rng is not None:  # one pass: statistics and bins together
        stats, counts = _wide_pass(t, chunk_bytes, tick, bins=bins, rng=rng)
    else:  # two passes: the range is the (min, max) of the first
        stats = _wide_pass(t, chunk_bytes, tick)[0]
        if math.isnan(stats["min"]):
            return stats, _empty_hist(bins, None, stats["nan"], stats["inf"])
        rng = (stats["min"], stats["max"])
        counts = _wide_pass(t, chunk_bytes, None, bins=bins, rng=rng, moments=False)[1]
    finite = stats["numel"] - stats["nan"] - stats["inf"]
    return stats, Histogram(counts, _edges(bins, rng), int(stats["nan"]), int(stats["inf"]), int(finite - counts.sum()))


def _small(t: torch.Tensor, bins: int | None, rng: tuple[float, float] | None) -> tuple[dict, Histogram | None]:
    """Statistics and histogram of a small tensor from one float64 copy, by the same formulas (and the
    same edges and binning) as the streaming passes."""
    x = _as_real(t).reshape(-1).to(torch.float64).numpy()
    numel = x.size
    finite = np.isfinite(x)
    f = x[finite] if not finite.all() else x
    n = f.size
    nan = int(np.isnan(x).sum()) if n < numel else 0
    stats = _undefined(numel)
    stats.update(nan=float(nan), inf=float(numel - n - nan), zero_frac=float(n - np.count_nonzero(f)) / numel)
    if n:
        mean = float(f.sum()) / n
        m2 = float(np.dot(f - mean, f - mean))
        lo, hi = float(f.min()), float(f.max())
        stats.update(mean=mean, std=math.sqrt(m2 / n), min=lo, max=hi, abs_max=max(abs(lo), abs(hi)),
                     l2=math.sqrt(m2 + n * mean * mean))
    if not bins:
        return stats, None
    if rng is None:
        if not n:
            return stats, _empty_hist(bins, None, nan, numel - n - nan)
        rng = (stats["min"], stats["max"])
    edges = _edges(bins, rng)
    counts = _bin_counts(f, edges)
    return stats, Histogram(counts, edges, nan, numel - n - nan, int(n - counts.sum()))


def _distinct(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` without its repeating dimensions (stride 0, as ``expand`` makes them), and how many times
    each of its elements stands in ``t``; ``(t, 1)`` if none repeats. A file may declare a 10**6 x 10**6
    tensor over 4 bytes: its statistics follow from its one distinct element."""
    if t.numel() <= 1 or all(s or n <= 1 for n, s in zip(t.shape, t.stride())):
        return t, 1
    index = tuple(slice(0, 1) if s == 0 and n > 1 else slice(None) for n, s in zip(t.shape, t.stride()))
    distinct = t[index]
    return distinct, t.numel() // distinct.numel()


def _repeated(stats: dict[str, float], repeats: int) -> dict[str, float]:
    """Statistics of the distinct elements made those of the tensor repeating each ``repeats`` times:
    counts and the L2 norm scale, the rest (mean, std, extremes, fractions) are unchanged."""
    stats = dict(stats)
    for key in ("numel", "nan", "inf"):
        stats[key] *= repeats
    stats["l2"] *= math.sqrt(repeats)
    return stats


def _repeated_hist(hist: Histogram | None, repeats: int) -> Histogram | None:
    if hist is None:
        return None
    return Histogram(hist.counts * repeats, hist.edges, hist.nan * repeats, hist.inf * repeats, hist.outside * repeats)


def _undefined(numel: int) -> dict[str, float]:
    stats = dict.fromkeys(STATS_KEYS, math.nan)
    stats["numel"] = float(numel)
    return stats


def _edges(bins: int, rng: tuple[float, float] | None) -> np.ndarray:
    """numpy's edges for ``bins`` over ``rng`` ((0, 1) if None), made usable for any finite range:
    an empty or too narrow range (constant or adjacent values, where numpy raises "Too many bins")
    is widened around its centre to ``bins`` steps of a few ulps; a range wider than the largest
    float (``-max .. max``) gets its edges without overflow."""
    if rng is None:
        rng = (0.0, 1.0)
    lo, hi = float(rng[0]), float(rng[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"histogram range must be finite, got {rng!r}")
    if lo > hi:
        raise ValueError(f"histogram range must have min <= max, got {rng!r}")
    if lo == hi:  # numpy's convention for an empty range
        lo, hi = lo - 0.5, hi + 0.5
    mag = max(abs(lo), abs(hi))
    min_width = bins * 8 * float(np.spacing(mag))  # every step spans several ulps: edges stay distinct
    if hi - lo < min_width:
        centre = lo / 2 + hi / 2
        lo, hi = centre - min_width / 2, centre + min_width / 2
        big = float(np.finfo(np.float64).max)
        if hi > big:
            lo, hi = big - min_width, big
        elif lo < -big:
            lo, hi = -big, -big + min_width
    if math.isfinite(hi - lo):
        with np.errstate(all="ignore"):
            edges = np.histogram_bin_edges(np.empty(0), bins=bins, range=(lo, hi)).astype(np.float64)
        if np.all(edges[:-1] < edges[1:]):
            return edges
    f = np.arange(bins + 1, dtype=np.float64) / bins
    edges = lo * (1 - f) + hi * f  # finite even when hi - lo is not
    edges[0], edges[-1] = lo, hi
    return edges


def _bin_counts(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``x`` in ``edges`` (numpy's convention), through numpy's fast uniform path when the
    width is finite, else by the edges themselves."""
    lo, hi = float(edges[0]), float(edges[-1])
    if math.isfinite(hi - lo):
        with np.errstate(all="ignore"):
            try:
                return np.histogram(x, bins=len(edges) - 1, range=(lo, hi))[0]
            except ValueError:
                pass
    return np.histogram(x, bins=edges)[0]


def _empty_hist(bins: int, rng: tuple[float, float] | None, nan: float = 0, inf: float = 0) -> Histogram:
    return Histogram(np.zeros(bins, np.int64), _edges(bins, rng), int(nan), int(inf))


def _nbytes(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def _blocks(t: torch.Tensor, n: int) -> Iterator[torch.Tensor]:
    """Contiguous 1-D pieces of ``t`` in memory order, each of at most ``n`` elements. Views where
    ``t`` is contiguous; otherwise copies of at most ``n`` elements each."""
    if t.numel() == 0:
        return
    if isinstance(t, ElementStream):
        yield from t.blocks(n)
        return
    if t.is_contiguous():
        flat = t.view(-1)
        for start in builtins.range(0, flat.numel(), n):
            yield flat[start:start + n]
        return
    row = t[0].numel()
    if row <= n:
        step = n // row
        for start in builtins.range(0, t.shape[0], step):
            yield t[start:start + step].contiguous().view(-1)
    else:
        for i in builtins.range(t.shape[0]):
            yield from _blocks(t[i], n)


# ---- one and two byte dtypes: count every bit pattern ---------------------------------------------
@functools.cache
def _value_table(dtype: torch.dtype) -> np.ndarray | None:
    """The float64 value of each bit pattern of a 1- or 2-byte dtype, or None for other dtypes."""
    if dtype == torch.bool:
        return (np.arange(256) != 0).astype(np.float64)
    if dtype.is_complex or dtype.itemsize not in (1, 2):
        return None
    size = dtype.itemsize
    bits = torch.arange(1 << (8 * size), dtype=torch.int32).to(torch.int16 if size == 2 else torch.uint8)
    try:
        return bits.view(dtype).to(torch.float64).numpy()
    except (RuntimeError, NotImplementedError, TypeError):  # quantized, packed float4, bits8/16
        return None


def _count_bits(t: torch.Tensor, chunk_bytes: int, tick: Tick | None) -> np.ndarray:
    size = t.element_size()
    bits, k = (torch.uint16, 1 << 16) if size == 2 else (torch.uint8, 256)
    counts = torch.zeros(k, dtype=torch.int64)
    cap = max(1, min(chunk_bytes // size, _TABLE_BLOCK))
    index = _index_buffer(cap) if t.device.type == "cpu" else None
    pending: list[torch.Tensor] = []  # small blocks (tiny chunks, narrow rows), counted together
    held = 0

    def count(raw: torch.Tensor) -> None:
        # torch.bincount over an int32 copy in a reused buffer: ~1 ns an element, GIL released
        # (numpy's bincount first copies every element to an int64 index: ~2.3 ns)
        if index is not None and raw.numel() <= index.numel():  # index: t is on the CPU
            idx = index[:raw.numel()]
            idx.copy_(raw)
        else:
            idx = raw.to(torch.int32)
        counts.add_(torch.bincount(idx, minlength=k).cpu())

    for block in _blocks(t, cap):
        raw = _unsigned(block, bits)
        if raw.numel() * 4 >= _TABLE_BLOCK:
            count(raw)
        else:
            pending.append(raw.clone() if isinstance(t, ElementStream) else raw)  # its buffer is reused
            held += raw.numel()
            if held >= _TABLE_BLOCK // 4:
                count(torch.cat(pending))
                pending, held = [], 0
        if tick:
            tick(block.numel() * size)
    if pending:
        count(torch.cat(pending))
    return counts.numpy()


def _unsigned(block: torch.Tensor, bits: torch.dtype) -> torch.Tensor:
    """The raw bit patterns of a 1-D block as an unsigned integer tensor (the bincount index)."""
    try:
        return block.view(bits)
    except (RuntimeError, TypeError):  # a torch without uint16 views: mask the signed bits
        return block.view(torch.int16).to(torch.int32) & 0xFFFF


def _index_buffer(n: int) -> torch.Tensor:
    """This thread's reused int32 buffer of at least ``n`` elements for bincount indices."""
    buf = getattr(_INDEX_BUFFER, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _INDEX_BUFFER.buf = torch.empty(n, dtype=torch.int32)
    return buf


_INDEX_BUFFER = threading.local()


def _table_stats(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    numel = int(counts.sum())
    stats = _undefined(numel)
    nan_mask = np.isnan(values)
    stats["nan"] = float(counts[nan_mask].sum())
    stats["inf"] = float(counts[np.isinf(values)].sum())
    if numel:
        stats["zero_frac"] = float(counts[values == 0].sum()) / numel
    keep = np.isfinite(values) & (counts > 0)
    v, c = values[keep], counts[keep].astype(np.float64)
    n = c.sum()
    if n == 0:
        return stats
    mean = float((v * c).sum() / n)
    lo, hi = float(v.min()), float(v.max())
    stats.update(mean=mean, std=math.sqrt(float((c * (v - mean) ** 2).sum() / n)), min=lo, max=hi,
                 abs_max=max(abs(lo), abs(hi)), l2=math.sqrt(float((c * v * v).sum())))
    return stats


def _table_hist(values: np.ndarray, counts: np.ndarray, bins: int, rng: tuple[float, float] | None) -> Histogram:
    keep = np.isfinite(values) & (counts > 0)
    v, c = values[keep], counts[keep]
    if rng is None:
        rng = (float(v.min()), float(v.max())) if len(v) else None
    edges = _edges(bins, rng)
    lo, hi = float(edges[0]), float(edges[-1])
    if math.isfinite(hi - lo):
        with np.errstate(all="ignore"):
            binned = np.histogram(v, bins=bins, range=(lo, hi), weights=c.astype(np.float64))[0]
    else:
        binned = np.histogram(v, bins=edges, weights=c.astype(np.float64))[0]
    binned = np.rint(binned).astype(np.int64)
    return Histogram(binned, edges, int(counts[np.isnan(values)].sum()),
                     int(counts[np.isinf(values)].sum()), int(c.sum() - binned.sum()))


# ---- wider dtypes: float64 blocks ----------------------------------------------------------------
class _Moments:
    """Count, mean and centred sum of squares, merged across blocks (Chan et al.), plus extremes."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.zeros = self.nan = self.inf = 0

    def add(self, n: int, mean: float, m2: float) -> None:
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def stats(self, numel: int) -> dict[str, float]:
        stats = _undefined(numel)
        stats.update(nan=float(self.nan), inf=float(self.inf))
        if numel:
            stats["zero_frac"] = self.zeros / numel
        if self.n:
            stats.update(mean=self.mean, std=math.sqrt(max(self.m2, 0.0) / self.n), min=self.lo, max=self.hi,
                         abs_max=max(abs(self.lo), abs(self.hi)),
                         l2=math.sqrt(max(self.m2, 0.0) + self.n * self.mean * self.mean))
        return stats


def _as_real(block: torch.Tensor) -> torch.Tensor:
    """A block in a dtype the reductions support: magnitudes for complex, int64/float64 for uints."""
    if block.dtype == torch.complex32:
        return block.to(torch.complex64).abs()
    if block.dtype.is_complex:
        return block.abs()
    if block.dtype == torch.uint32:
        return block.to(torch.int64)
    if block.dtype == torch.uint64:
        return block.to(torch.float64)
    return block


def _wide_pass(t: torch.Tensor, chunk_bytes: int, tick: Tick | None, *, bins: int | None = None,
               rng: tuple[float, float] | None = None, moments: bool = True) -> tuple[dict | None, np.ndarray | None]:
    """One pass over a float32/64, int32/64, uint32/64 or complex tensor, through two preallocated
    float64 block buffers: statistics when ``moments``, bin counts over ``rng`` when ``bins``."""
    size = t.element_size()
    n_block = max(1, min(chunk_bytes, _FLOAT_BLOCK_BYTES) // size)
    buf = torch.empty(min(n_block, t.numel()), dtype=torch.float64, device=t.device)
    centred = torch.empty_like(buf) if moments else buf
    acc = _Moments()
    counts = np.zeros(bins, np.int64) if bins else None
    edges = _edges(bins, rng) if bins else None
    for block in _blocks(t, n_block):
        if tick:
            tick(block.numel() * size)
        w = _as_real(block)
        n = w.numel()
        x = buf[:n]
        x.copy_(w)
        if moments:
            total = float(x.sum())
            if w.is_floating_point() and not math.isfinite(total):  # NaN or Inf inside: keep the finite
                finite = torch.isfinite(x)
                kept, nans = int(finite.sum()), int(torch.isnan(x).sum())
                acc.nan, acc.inf = acc.nan + nans, acc.inf + n - kept - nans
                w = x = x[finite]
                n = kept
                if n == 0:
                    continue
                total = float(x.sum())
            mean = total / n
            torch.sub(x, mean, out=centred[:n])
            acc.add(n, mean, float(torch.linalg.vector_norm(centred[:n])) ** 2)
            lo, hi = torch.aminmax(w)
            acc.lo, acc.hi = min(acc.lo, float(lo)), max(acc.hi, float(hi))
            acc.zeros += n - int(torch.count_nonzero(w))
        if counts is not None:  # numpy's uniform-bins path; NaN and Inf fall outside any finite range
            counts += _bin_counts(x.cpu().numpy(), edges)
    return (acc.stats(t.numel()) if moments else None), counts
