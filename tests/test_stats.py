"""Streaming statistics and histograms, checked against plain float64 references on real tensors."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ckptviz as cv
from ckptviz.stats import STATS_KEYS, Histogram, StatsCache, histogram, stats_frame, summarize, tensor_stats

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
EXACT = ("numel", "min", "max", "abs_max", "zero_frac", "nan", "inf")


def values64(t: torch.Tensor) -> torch.Tensor:
    """The reference's view of ``t``: every element as float64 (magnitudes for complex)."""
    if t.dtype == torch.complex32:
        t = t.to(torch.complex64)
    if t.is_complex():
        t = t.abs()
    return t.to(torch.float64).reshape(-1)


def reference(t: torch.Tensor) -> dict[str, float]:
    x = values64(t)
    f = x[torch.isfinite(x)]
    nan = math.nan
    return {
        "numel": float(x.numel()),
        "mean": f.mean().item() if f.numel() else nan,
        "std": f.std(correction=0).item() if f.numel() else nan,
        "min": f.min().item() if f.numel() else nan,
        "max": f.max().item() if f.numel() else nan,
        "abs_max": f.abs().max().item() if f.numel() else nan,
        "l2": f.norm().item() if f.numel() else nan,
        "zero_frac": (x == 0).sum().item() / x.numel() if x.numel() else nan,
        "nan": float(torch.isnan(x).sum()),
        "inf": float(torch.isinf(x).sum()),
    }


def assert_stats_match(got: dict, want: dict) -> None:
    assert list(got) == list(STATS_KEYS)
    scale = want["abs_max"] if math.isfinite(want["abs_max"]) else 1.0
    for k in STATS_KEYS:
        g, w = got[k], want[k]
        assert isinstance(g, float), k
        if math.isnan(w):
            assert math.isnan(g), (k, g, w)
        elif k in EXACT:
            assert g == w, (k, g, w)
        else:
            assert math.isclose(g, w, rel_tol=1e-12, abs_tol=1e-12 * scale), (k, g, w)


def assert_hist_matches(h: Histogram, t: torch.Tensor, bins: int) -> None:
    x = values64(t)
    f = x[torch.isfinite(x)].numpy()
    assert h.counts.dtype == np.int64 and h.edges.dtype == np.float64
    assert len(h.counts) == bins and len(h.edges) == bins + 1
    assert h.total == f.size and h.outside == 0
    assert h.nan == int(np.isnan(x.numpy()).sum()) and h.inf == int(np.isinf(x.numpy()).sum())
    np.testing.assert_array_equal(h.counts, np.histogram(f, bins=h.edges)[0])
    if f.size and f.min() < f.max():
        assert h.edges[0] == f.min() and h.edges[-1] == f.max()


def sample(dtype: torch.dtype, n: int = 5000, *, specials: bool = True) -> torch.Tensor:
    """Random values of ``dtype`` with zeros and, where the dtype has them, NaN and ±Inf."""
    gen = torch.Generator().manual_seed(hash(str(dtype)) % 2**31)
    if dtype == torch.bool:
        return torch.rand(n, generator=gen) > 0.3
    if dtype.is_complex:
        base = torch.randn(n, generator=gen, dtype=torch.complex64) * 3
    elif dtype.is_floating_point:
        base = torch.randn(n, generator=gen) * 3
    else:
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
        return torch.randint(lo, hi, (n,), generator=gen, dtype=torch.int64).to(dtype)
    base[:50] = 0
    if specials:
        base[100:103] = float("nan")
        base[200] = float("inf")
        base[201:203] = -float("inf")
    return base.to(dtype)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, *FLOAT8, torch.int8, torch.uint8,
          torch.int16, torch.uint16, torch.int32, torch.int64, torch.uint32, torch.uint64, torch.bool,
          torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats_and_histogram_match_the_float64_reference(dtype):
    t = sample(dtype).reshape(50, 100)
    stats, h = summarize(t, bins=33)
    assert_stats_match(stats, reference(t))
    assert_stats_match(tensor_stats(t), reference(t))
    assert_hist_matches(h, t, 33)
    h2 = histogram(t, bins=33)
    np.testing.assert_array_equal(h2.counts, h.counts)
    np.testing.assert_array_equal(h2.edges, h.edges)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int16, *FLOAT8, torch.uint8, torch.int8],
                         ids=str)
def test_every_bit_pattern_of_narrow_dtypes_is_counted_exactly(dtype):
    # All 65536 (or 256) bit patterns: subnormals, -0, NaNs, ±Inf, the largest finite values.
    size = dtype.itemsize
    bits = torch.arange(1 << (8 * size), dtype=torch.int32).to(torch.int16 if size == 2 else torch.uint8)
    t = bits.view(dtype)
    stats, h = summarize(t, bins=128)
    assert_stats_match(stats, reference(t))
    assert_hist_matches(h, t, 128)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_uses_magnitudes():
    z = torch.tensor([3 + 4j, 0, -1j, 6 - 8j], dtype=torch.complex64).to(torch.complex32)
    stats = tensor_stats(z)
    assert (stats["min"], stats["max"], stats["mean"], stats["zero_frac"]) == (0.0, 10.0, 4.0, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_empty_tensors(dtype):
    t = torch.empty(0, 7, dtype=dtype)
    stats, h = summarize(t, bins=8)
    assert stats["numel"] == 0 and stats["nan"] == 0 and stats["inf"] == 0
    assert all(math.isnan(stats[k]) for k in ("mean", "std", "min", "max", "abs_max", "l2", "zero_frac"))
    assert h.total == 0 and len(h.edges) == 9 and (h.edges[0], h.edges[-1]) == (0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_only_nan_and_inf(dtype):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")], dtype=dtype)
    stats, h = summarize(t, bins=4)
    assert (stats["numel"], stats["nan"], stats["inf"], stats["zero_frac"]) == (4.0, 2.0, 2.0, 0.0)
    assert math.isnan(stats["mean"]) and math.isnan(stats["max"])
    assert h.total == 0 and (h.nan, h.inf) == (2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_constant_tensors_have_zero_std_and_numpy_edges(dtype):
    t = torch.full((1000,), 0.1, dtype=dtype)
    stats, h = summarize(t, bins=10)
    assert stats["std"] == 0.0 and stats["min"] == stats["max"] == stats["mean"]
    assert h.total == 1000 and h.edges[0] == stats["min"] - 0.5 and h.edges[-1] == stats["max"] + 0.5
    assert_hist_matches(h, t, 10)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_scalar_meta_and_unsupported_dtypes_do_not_crash():
    assert tensor_stats(torch.tensor(-2.5))["abs_max"] == 2.5
    meta = tensor_stats(torch.empty(3, 4, device="meta"))
    assert meta["numel"] == 12 and all(math.isnan(meta[k]) for k in STATS_KEYS if k != "numel")
    q = torch.quantize_per_tensor(torch.randn(8), 0.1, 0, torch.qint8)
    stats, h = summarize(q)
    assert stats["numel"] == 8 and math.isnan(stats["mean"]) and h.total == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_explicit_range_bins_in_one_pass_and_counts_outside(dtype):
    t = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 1.0, 2.0, float("nan")], dtype=dtype)
    stats, h = summarize(t, bins=4, range=(-1.0, 1.0))
    assert stats["min"] == -3.0 and stats["max"] == 2.0  # statistics ignore the range
    np.testing.assert_array_equal(h.edges, np.linspace(-1, 1, 5))
    np.testing.assert_array_equal(h.counts, [1, 0, 1, 3])  # the upper edge is in the last bin, as numpy does
    assert (h.outside, h.nan, h.total) == (2, 1, 5)
    assert h.mode == 0.75


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.int32], ids=str)
def test_results_do_not_depend_on_chunking_or_layout(dtype):
    base = sample(dtype, 60_000).reshape(120, 500)
    want_stats, want_h = summarize(base.contiguous(), bins=50, chunk_bytes=2**40)
    views = {
        "tiny chunks": (base, 1000),
        "transposed": (base.t(), 4096),
        "strided rows": (base[::3, 1::2], 777),
        "expanded": (base[0].expand(120, 500), 3000),
    }
    for name, (t, chunk) in views.items():
        ref_stats, ref_h = summarize(t.contiguous(), bins=50, chunk_bytes=2**40)
        got_stats, got_h = summarize(t, bins=50, chunk_bytes=chunk)
        assert_stats_match(got_stats, ref_stats)
        np.testing.assert_array_equal(got_h.counts, ref_h.counts, err_msg=name)
        np.testing.assert_array_equal(got_h.edges, ref_h.edges, err_msg=name)
    if dtype.itemsize <= 2:  # the bit-pattern table: every number identical, whatever the chunking
        assert summarize(base, bins=50, chunk_bytes=1000)[0] == want_stats
        part = base[:40, ::2]
        assert summarize(part, chunk_bytes=1)[0] == summarize(part.contiguous(), chunk_bytes=2**40)[0]


def test_stats_frame_and_progress(tmp_path, capsys):
    sd = {"a.weight": torch.randn(30, 20), "b.bias": torch.zeros(20, dtype=torch.bfloat16),
          "c.count": torch.arange(5)}
    frame = stats_frame(sd)
    assert list(frame.index) == list(sd) and frame.index.name == "key" and list(frame.columns) == list(STATS_KEYS)
    assert frame.loc["b.bias", "zero_frac"] == 1.0 and frame.loc["c.count", "max"] == 4.0
    assert "statistics" not in capsys.readouterr().err  # small: no bar unless asked
    stats_frame(sd, progress=True)
    assert "statistics" in capsys.readouterr().err
    assert stats_frame({}).empty

    # The same numbers from memory-mapped tensors of a saved checkpoint.
    path = tmp_path / "w.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    mapped = stats_frame(cv.open_checkpoint(path).state_dict())
    pd.testing.assert_frame_equal(mapped, frame)


def test_stats_cache_hits_misses_invalidation_and_lru(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(100)}, path)
    loads = []

    def loader():
        loads.append(1)
        return cv.open_checkpoint(path).tensor("w")

    cache = StatsCache(maxsize=2)
    first = cache.summarize(path, "", "w", loader, bins=16)
    second = cache.summarize(str(path), "", "w", loader, bins=16)
    assert len(loads) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert first[0] == second[0] and second[1] is first[1]
    cache.summarize(path, "", "w", loader, bins=32)  # other bins: another entry
    assert len(loads) == 2 and len(cache) == 2

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: recomputed
    cache.summarize(path, "", "w", loader, bins=16)
    assert len(loads) == 3 and len(cache) == 2  # LRU bound kept

    t = torch.ones(4)
    assert StatsCache.key(None, "", "w") is None
    cache.summarize(None, "", "w", t)
    t.mul_(2)  # in-memory tensors are never cached: a live model's weights change
    assert cache.summarize(None, "", "w", t)[0]["mean"] == 2.0
    cache.clear()
    assert len(cache) == 0


MEMORY_CHILD = textwrap.dedent("""
    import importlib.util, json, os, sys, threading, time
    import torch
    spec = importlib.util.spec_from_file_location("stats_alone", sys.argv[1])
    stats = sys.modules["stats_alone"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)  # stats.py on its own: no ckptviz package, no widgets

    def anon_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    out = {"ipywidgets": "ipywidgets" in sys.modules}
    for path, dtype in ((sys.argv[2], torch.bfloat16), (sys.argv[3], torch.float32)):
        numel = os.path.getsize(path) // dtype.itemsize
        t = torch.from_file(path, shared=False, size=numel, dtype=dtype)
        base = anon_kb()
        peak = [base]
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], anon_kb())
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        start = time.perf_counter()
        s, h = stats.summarize(t, bins=64)
        done.set()
        watcher.join()
        peak[0] = max(peak[0], anon_kb())
        out[str(dtype)] = {"seconds": time.perf_counter() - start, "growth_mb": (peak[0] - base) / 1024,
                           "numel": s["numel"], "total": h.total, "nan": s["nan"], "mean": s["mean"]}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
def test_memory_stays_bounded_on_memory_mapped_files(tmp_path):
    # 256 MiB of bf16 and 64 MiB of float32 in files, read through private maps in a fresh process:
    # a whole-tensor float32 / float64 copy would add 512 / 128 MiB of anonymous memory; the blocks
    # and buffers of a streaming pass take about 4 MiB (bf16) and 8 MiB (float32).
    gen = torch.Generator().manual_seed(1)
    block16 = torch.randn(2**20, generator=gen).to(torch.bfloat16)
    block16[7] = float("nan")
    block32 = torch.randn(2**20, generator=gen)
    files = {}
    for name, block, repeats in (("bf16.bin", block16, 128), ("f32.bin", block32, 16)):
        files[name] = tmp_path / name
        raw = block.view(torch.uint8).numpy().tobytes()
        with open(files[name], "wb") as f:
            for _ in range(repeats):
                f.write(raw)
    stats_py = Path(cv.__file__).with_name("stats.py")
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(stats_py), str(files["bf16.bin"]),
                           str(files["f32.bin"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ipywidgets"] is False
    bf16, f32 = out["torch.bfloat16"], out["torch.float32"]
    assert bf16["numel"] == 128 * 2**20 and bf16["nan"] == 128 and bf16["total"] == 128 * (2**20 - 1)
    assert math.isclose(bf16["mean"], tensor_stats(block16)["mean"], rel_tol=1e-9)
    assert f32["numel"] == f32["total"] == 16 * 2**20
    assert math.isclose(f32["mean"], tensor_stats(block32)["mean"], rel_tol=1e-9)
    assert bf16["growth_mb"] < 64, bf16
    assert f32["growth_mb"] < 48, f32


# ---- constant and extremely narrow data (numpy's "Too many bins") --------------------------------
NARROW = {
    "const_1e15": torch.full((6, 5), 1e15),
    "adjacent_f64": torch.tensor([1.0, float(np.nextafter(1.0, 2.0))], dtype=torch.float64),
    "const_bf16_1e20": torch.full((7,), 1e20, dtype=torch.bfloat16),
    "const_1e15_nan_inf": torch.tensor([1e15, 1e15, math.inf, -math.inf, math.nan]),
    "bf16_1e20_nan_inf": torch.tensor([1e20, 1e20, math.inf, math.nan], dtype=torch.bfloat16),
    "adjacent_1e300": torch.tensor([1e300, float(np.nextafter(1e300, 2e300))], dtype=torch.float64),
    "full_f64_range": torch.tensor([-1.7e308, 0.0, 1.7e308], dtype=torch.float64),
    "f32_max": torch.full((3,), float(torch.finfo(torch.float32).max)),
}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_histogram_of_constant_and_adjacent_values_from_real_files(tmp_path, fmt):
    from safetensors.torch import save_file

    from ckptviz.plots import histogram_figure, overlay_and_difference_figure

    path = tmp_path / f"narrow.{fmt}"
    if fmt == "pt":
        torch.save(NARROW, path)
    else:
        save_file(NARROW, str(path))
    ck = cv.open_checkpoint(path)
    for key, t in NARROW.items():
        h = ck.histogram(key)
        ref = values64(t)
        finite = ref[torch.isfinite(ref)].numpy()
        assert h.bins == 64, key
        assert np.all(np.isfinite(h.edges)) and np.all(h.edges[:-1] < h.edges[1:]), key
        assert h.edges[0] <= finite.min() and finite.max() <= h.edges[-1], key
        assert h.total == finite.size and h.outside == 0, key
        assert h.nan == int(torch.isnan(ref).sum()) and h.inf == int(torch.isinf(ref).sum()), key
        assert np.array_equal(h.counts, np.histogram(finite, bins=h.edges)[0]), key
        assert np.all(np.isfinite(h.centers)) and math.isfinite(h.mode), key
        if finite.min() == finite.max():  # a constant: one bin holds every value
            assert np.count_nonzero(h.counts) == 1, key
        # an explicit degenerate range, and the figures that draw them
        assert ck.histogram(key, range=(float(finite[0]), float(finite[0]))).bins == 64
        histogram_figure({"checkpoint": h, "model": histogram(t)}, log=True)
        overlay_and_difference_figure(h, h, histogram(t.to(torch.float64) - t.to(torch.float64)))


def test_histogram_range_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        histogram(torch.ones(3), range=(0.0, math.inf))


def test_stats_then_histogram_of_every_key_reads_each_tensor_once(tmp_path, monkeypatch):
    """The public path a view takes (ck.stats(), then ck.histogram(key) per row) reads every tensor
    once: stats() caches each tensor's default histogram from the same read."""
    from ckptviz.readers.mapped import MappedFile

    torch.manual_seed(0)
    src = {"f32": torch.randn(300, 7), "bf16": torch.randn(64, 9).bfloat16(), "i64": torch.arange(50),
           "const": torch.full((10,), 1e15, dtype=torch.float64)}
    path = tmp_path / "ck.pt"
    torch.save(src, path)
    ck = cv.open_checkpoint(path)
    reads = []
    real = MappedFile.readinto
    monkeypatch.setattr(MappedFile, "readinto", lambda self, at, out: (reads.append(at), real(self, at, out))[1])
    frame = ck.stats(progress=False)
    assert len(reads) == len(src)
    hists = {k: ck.histogram(k) for k in src}
    assert len(reads) == len(src), "histogram() after stats() read the file again"
    for k, t in src.items():
        assert hists[k].counts.sum() == t.numel()
        np.testing.assert_array_equal(hists[k].counts, histogram(t).counts)
        assert frame.loc[k, "mean"] == pytest.approx(tensor_stats(t)["mean"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8, torch.bool, torch.float32,
                                   torch.float64, torch.int64, torch.complex64], ids=str)
def test_streamed_statistics_equal_those_of_the_whole_tensor(tmp_path, monkeypatch, dtype):
    """ck.stats()/ck.histogram() stream a stored tensor through one reused buffer (``ElementStream``):
    with pieces far smaller than the tensor, and a short last piece, every number equals the in-memory
    summary, and 1-2 byte dtypes read each byte exactly once."""
    import ckptviz.stats as st
    from ckptviz.readers.mapped import MappedFile

    monkeypatch.setattr(st, "STREAM_BYTES", 4096)
    monkeypatch.setattr(st, "_TABLE_BLOCK", 512)
    monkeypatch.setattr(st, "_FLOAT_BLOCK_BYTES", 1024)
    t = sample(dtype, 20_011).reshape(1, 20_011)
    if dtype.is_floating_point:
        t[0, 5] = float("nan")
    path = tmp_path / "ck.pt"
    torch.save({"t": t, "tiny": t[0, :3].clone()}, path)
    ck = cv.open_checkpoint(path)
    read = []
    real = MappedFile.readinto
    monkeypatch.setattr(MappedFile, "readinto",
                        lambda self, at, out: (read.append(out.numel() * out.element_size()), real(self, at, out))[1])
    st.CACHE.clear()
    frame = ck.stats(progress=False)
    want_stats, want_h = summarize(t)
    got = frame.loc["t"].to_dict()
    assert_stats_match(got, want_stats)
    if dtype.itemsize <= 2:
        assert sum(read) == t.numel() * t.element_size() + 3 * t.element_size()
    assert len(read) > 3  # it streamed in pieces
    h = ck.histogram("t")
    np.testing.assert_array_equal(h.counts, want_h.counts)
    np.testing.assert_array_equal(h.edges, want_h.edges)
    assert (h.nan, h.inf, h.outside) == (want_h.nan, want_h.inf, want_h.outside)
    h10 = ck.histograms(bins=10)["t"]
    np.testing.assert_array_equal(h10.counts, histogram(t, 10).counts)
    flat = t.reshape(-1)
    stream = st.ElementStream(t.dtype, tuple(t.shape), lambda start, out: out.copy_(flat[start:start + out.numel()]))
    for chunk in (1, 999, 2**40):  # tiny bincount blocks are held across the reused buffer's refills
        assert_stats_match(summarize(stream, chunk_bytes=chunk)[0], want_stats)
        np.testing.assert_array_equal(summarize(stream, chunk_bytes=chunk)[1].counts, want_h.counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8,
                                   torch.bool, torch.complex64, torch.float16], ids=str)
def test_small_tensors_summarised_in_one_copy_match_the_streaming_passes(monkeypatch, dtype):
    """Tensors of at most ``_SMALL`` elements take one float64 copy; numbers, edges and counts are
    those of the streaming passes (which every larger tensor takes)."""
    import ckptviz.stats as st

    t = sample(dtype, 3000)
    small = [summarize(t), summarize(t, 7, range=(-1.0, 2.0)), (tensor_stats(t), histogram(t, 5))]
    monkeypatch.setattr(st, "_SMALL", 0)
    streamed = [summarize(t), summarize(t, 7, range=(-1.0, 2.0)), (tensor_stats(t), histogram(t, 5))]
    for (s1, h1), (s2, h2) in zip(small, streamed):
        assert_stats_match(s1, s2)
        np.testing.assert_array_equal(h1.counts, h2.counts)
        np.testing.assert_array_equal(h1.edges, h2.edges)
        assert (h1.nan, h1.inf, h1.outside) == (h2.nan, h2.inf, h2.outside)
