"""Checkpoint-vs-checkpoint diff on real models and real files, every number checked against a plain
float64 reference computed from whole tensors."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
import torchvision
from ckpt_files import ConvNet, randomize_buffers, state_of
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv
from ckptviz.diff import COLUMNS, DIFF_KEYS, STATUSES, DiffReport, diff, diff_tensors

diff_module = importlib.import_module("ckptviz.diff")  # the module (``ckptviz.diff`` may name the function)


# ---- the reference -------------------------------------------------------------------------------
def reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The four numbers, straight from whole float64 copies (complex: (re, im) pairs)."""
    if a.is_complex() or b.is_complex():
        x = torch.view_as_real(a.to(torch.complex128)).reshape(-1, 2)
        y = torch.view_as_real(b.to(torch.complex128)).reshape(-1, 2)
    else:
        x, y = a.double().reshape(-1, 1), b.double().reshape(-1, 1)
    both_nan = x.isnan() & y.isnan()
    if a.is_complex() or b.is_complex():
        same = (x == y) | both_nan
    else:  # compared natively: int64 values beyond 2**53 that round to one float64 still differ
        same = (a == b).reshape(-1, 1) | both_nan
    changed = int((~same.all(1)).sum())
    x0, y0 = torch.where(both_nan, 0.0, x), torch.where(both_nan, 0.0, y)
    d = torch.where(same, 0.0, y - x)
    na, nb, nd = x0.norm().item(), y0.norm().item(), d.norm().item()
    numel = a.numel()
    if numel == 0:
        return {"max_abs_diff": 0.0, "rel_l2": 0.0, "cosine": 1.0, "changed_frac": 0.0}
    if math.isnan(nd) or math.isnan(na):
        rel = math.nan
    else:
        rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
    if changed == 0:
        cos = 1.0
    elif na > 0 and nb > 0:
        cos = ((x0 * y0).sum() / (na * nb)).clamp(-1, 1).item()
    else:
        cos = math.nan
    return {"max_abs_diff": d.norm(dim=1).max().item(), "rel_l2": rel, "cosine": cos,
            "changed_frac": changed / numel}


def assert_numbers(got: dict | pd.Series, want: dict[str, float], rtol: float = 1e-10) -> None:
    for k in DIFF_KEYS:
        g, w = float(got[k]), want[k]
        if math.isnan(w):
            assert math.isnan(g), (k, g, w)
        elif k in ("changed_frac", "max_abs_diff") or math.isinf(w):
            assert g == w, (k, g, w)
        else:
            assert g == pytest.approx(w, rel=rtol, abs=1e-12), (k, g, w)


# ---- a base and its fine-tuned, DataParallel-saved copy -------------------------------------------
PERTURBED = ("layer4.1.conv2.weight", "fc.weight", "layer3.0.conv1.weight")


def fine_tuned(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base`` loaded into resnet18, some layers moved (one sparsely), saved through nn.DataParallel."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.layer4[1].conv2.weight.add_(torch.randn(model.layer4[1].conv2.weight.shape, generator=g) * 1e-3)
        model.fc.weight.mul_(1.5)
        w = model.layer3[0].conv1.weight.view(-1)
        w[::10] += 0.01  # 10% of the elements
    return state_of(nn.DataParallel(model))


@pytest.fixture(scope="module")
def base_and_tuned(resnet18_state, tmp_path_factory):
    """Files: the base minus one key (torch.save), and the fine-tuned copy plus an extra key, with one
    shape and one dtype changed (safetensors)."""
    tmp = tmp_path_factory.mktemp("diff")
    a = {k: v for k, v in resnet18_state.items() if k != "layer1.0.bn1.bias"}
    b = fine_tuned(resnet18_state)
    b["module.extra_head.weight"] = torch.randn(4, 4)
    b["module.fc.bias"] = torch.zeros(5)
    b["module.conv1.weight"] = b["module.conv1.weight"].half()
    torch.save(a, tmp / "base.pt")
    save_file(b, str(tmp / "tuned.safetensors"))
    return a, b, tmp / "base.pt", tmp / "tuned.safetensors"


def test_fine_tuned_copy_lines_up_with_its_base(base_and_tuned):
    a, b, path_a, path_b = base_and_tuned
    rep = diff(path_a, path_b)
    assert isinstance(rep, DiffReport)
    assert rep.rules == [("^module\\.", "")]
    assert list(rep.frame.columns) == COLUMNS
    assert rep.summary == {"both": len(a) - 2, "only_a": 0, "only_b": 2, "shape_differs": 1, "dtype_differs": 1}
    assert set(rep.summary) == set(STATUSES)
    assert rep.frame["key"].tolist()[: len(a)] == list(a)  # a's order, then the keys only in b
    only_b = rep.frame[rep.frame["status"] == "only_b"]
    assert only_b["key"].isna().all()
    in_b = {"module.layer1.0.bn1.bias", "module.extra_head.weight"}
    assert only_b["key_b"].tolist() == [k for k in cv.open_checkpoint(path_b).tensors().index if k in in_b]
    row = rep.frame.set_index(rep.frame["key"].fillna(rep.frame["key_b"])).loc
    assert row["fc.bias"]["status"] == "shape_differs" and math.isnan(row["fc.bias"]["rel_l2"])
    assert (row["fc.bias"]["shape_a"], row["fc.bias"]["shape_b"]) == ((1000,), (5,))
    assert row["conv1.weight"]["status"] == "dtype_differs"
    assert (row["conv1.weight"]["dtype_a"], row["conv1.weight"]["dtype_b"]) == ("float32", "float16")
    assert row["layer1.0.conv1.weight"]["key_b"] == "module.layer1.0.conv1.weight"
    assert row["layer1.0.conv1.weight"]["rule"] == "^module\\. -> ''"
    assert row["module.extra_head.weight"]["numel"] == 16

    compared = rep.frame[rep.frame["status"].isin(["both", "dtype_differs"])]
    for _, r in compared.iterrows():
        assert_numbers(r, reference(a[r["key"]], b[r["key_b"]]))
    changed = set(compared.loc[compared["changed_frac"] > 0, "key"])
    assert changed == {*PERTURBED, "conv1.weight"}  # fp16 rounding moves most of conv1
    assert row["layer3.0.conv1.weight"]["changed_frac"] == pytest.approx(0.1, abs=1e-3)
    assert row["fc.weight"]["rel_l2"] == pytest.approx(0.5)
    assert row["fc.weight"]["cosine"] == pytest.approx(1.0)
    untouched = compared[~compared["key"].isin(changed)]
    assert (untouched["rel_l2"] == 0).all() and (untouched["cosine"] == 1).all()
    assert (untouched["max_abs_diff"] == 0).all()

    ordered = rep.by_change()
    assert ordered["key"].tolist()[0] == "fc.weight"
    assert ordered["status"].iloc[-3:].tolist() == ["shape_differs", "only_b", "only_b"]  # NaN rel_l2 last
    ta, tb = rep.pair("fc.weight")
    assert torch.equal(ta, a["fc.weight"]) and torch.equal(tb, b["module.fc.weight"])
    ta, tb = rep.pair("module.extra_head.weight")
    assert ta is None and torch.equal(tb, b["module.extra_head.weight"])
    with pytest.raises(cv.SectionError, match="no row for key 'nope'"):
        rep.pair("nope")


def test_identical_checkpoints(resnet18_state, tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(resnet18_state, path)
    for rep in (diff(path, path), diff(path, state_of_copy(resnet18_state)), diff(resnet18_state, resnet18_state)):
        assert rep.summary["both"] == len(resnet18_state) and rep.rules == []
        assert (rep.frame["rel_l2"] == 0).all()
        assert (rep.frame["cosine"] == 1).all()
        assert (rep.frame["changed_frac"] == 0).all()
        assert (rep.frame["max_abs_diff"] == 0).all()


def state_of_copy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd.items()}


# ---- the numbers on small tensors ----------------------------------------------------------------
def _pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 29, generator=g)
    y = x + (torch.rand(37, 29, generator=g) < 0.3) * torch.randn(37, 29, generator=g)
    ints = torch.randint(-1000, 1000, (300,), generator=g)
    z = torch.randn(50, dtype=torch.complex64, generator=g)
    return [
        ("float32", x, y),
        ("float64", x.double(), y.double()),
        ("bfloat16", x.bfloat16(), y.bfloat16()),
        ("float16", x.half(), y.half()),
        ("float32 vs float16", x, y.half()),
        ("transposed vs contiguous", x.t(), y.t().contiguous()),
        ("strided both", x[:, ::2], y[:, ::2]),
        ("int64", ints, ints.where(ints % 7 != 0, ints + 1)),
        ("int64 beyond 2**53", torch.tensor([2**60, 5]), torch.tensor([2**60 + 1, 5])),
        ("int32", ints.int(), (ints * 2).int()),
        ("uint8", ints.abs().clamp(max=255).to(torch.uint8), ints.abs().clamp(max=254).to(torch.uint8)),
        ("bool", ints > 0, ints > 10),
        ("complex64", z, z + (torch.arange(50) % 3 == 0) * 0.1j),
        ("complex vs its real part", z, z.real.to(torch.complex64)),
        ("scalar", torch.tensor(3.0), torch.tensor(4.0)),
        ("empty", torch.zeros(0, 3), torch.zeros(0, 3)),
        ("zeros vs zeros", torch.zeros(5), torch.zeros(5)),
        ("zeros vs ones", torch.zeros(5), torch.ones(5)),
        ("ones vs zeros", torch.ones(5), torch.zeros(5)),
        ("opposite", x, -x),
        ("signed zeros", torch.tensor([0.0, -0.0, 1.0]), torch.tensor([-0.0, 0.0, 1.0])),
    ]


@pytest.mark.parametrize("name,a,b", _pairs(), ids=[p[0] for p in _pairs()])
def test_numbers_match_float64_reference(name, a, b):
    want = reference(a, b)
    for block in (1, 7, 64, diff_module.BLOCK_ELEMENTS):
        assert_numbers(diff_tensors(a, b, block_elements=block), want)


def test_special_cases_read_as_documented():
    pairs = {p[0]: p[1:] for p in _pairs()}
    assert diff_tensors(*pairs["int64 beyond 2**53"])["changed_frac"] == 0.5  # counted exactly
    assert diff_tensors(*pairs["signed zeros"])["changed_frac"] == 0  # -0.0 == 0.0
    assert diff_tensors(*pairs["zeros vs ones"])["rel_l2"] == math.inf
    assert math.isnan(diff_tensors(*pairs["zeros vs ones"])["cosine"])
    assert diff_tensors(*pairs["opposite"])["cosine"] == pytest.approx(-1.0)
    assert diff_tensors(*pairs["opposite"])["rel_l2"] == pytest.approx(2.0)
    assert diff_tensors(*pairs["empty"]) == {"max_abs_diff": 0.0, "rel_l2": 0.0, "cosine": 1.0, "changed_frac": 0.0}
    z, _ = pairs["complex64"]
    got = diff_tensors(z, z + 3 + 4j)
    assert got["max_abs_diff"] == pytest.approx(5.0) and got["changed_frac"] == 1.0
    big = torch.tensor([2**63 + 5, 3, 7, 2**64 - 1], dtype=torch.uint64)  # bits of -(2**63) + 5, 3, 7, -1
    signed = torch.tensor([-(2**63) + 5, 3, 8, -1])
    assert diff_tensors(big, signed)["changed_frac"] == 0.75  # equal bits are not equal values
    assert diff_tensors(signed, big)["changed_frac"] == 0.75
    small = torch.tensor([70000, 3, 2**32 - 1], dtype=torch.uint32)  # no dtype of torch's promotes with int16
    assert diff_tensors(small, torch.tensor([4464, 3, -1], dtype=torch.int16))["changed_frac"] == 2 / 3
    meta = torch.empty(3, device="meta")
    assert all(math.isnan(v) for v in diff_tensors(meta, meta).values())
    with pytest.raises(ValueError, match="equal shapes"):
        diff_tensors(torch.zeros(2), torch.zeros(3))


def test_nan_and_inf():
    nan, inf = math.nan, math.inf
    a = torch.tensor([1.0, nan, nan, inf, -inf, 2.0, 3.0])
    same_nans = torch.tensor([1.0, nan, nan, inf, -inf, 2.0, 3.5])
    got = diff_tensors(a, same_nans)
    assert got["changed_frac"] == pytest.approx(1 / 7)  # NaN at the same place, equal infinities: unchanged
    assert got["max_abs_diff"] == 0.5
    assert_numbers(got, reference(a, same_nans))
    finite = torch.tensor([1.0, 2.0, 3.0, 4.0])
    one_nan = torch.tensor([1.0, nan, 3.0, 4.0])
    got = diff_tensors(finite, one_nan)
    assert got["changed_frac"] == 0.25  # NaN against a number is a change...
    assert all(math.isnan(got[k]) for k in ("max_abs_diff", "rel_l2", "cosine"))  # ...of undefined size
    only_nans = torch.full((4,), nan)
    assert diff_tensors(only_nans, only_nans.clone()) == {"max_abs_diff": 0.0, "rel_l2": 0.0, "cosine": 1.0,
                                                          "changed_frac": 0.0}
    big = torch.randn(1000, dtype=torch.bfloat16)
    big_b = big.clone()
    big[500] = big_b[500] = nan  # a block holding NaN among many finite blocks
    big_b[900] += 1
    for block in (3, 64, 4096):
        got = diff_tensors(big, big_b, block_elements=block)
        assert got["changed_frac"] == 1 / 1000
        assert_numbers(got, reference(big, big_b))


def test_block_size_and_threads_do_not_change_results(base_and_tuned, monkeypatch, small_cnn):
    _, _, path_a, path_b = base_and_tuned
    default = diff(path_a, path_b).frame
    monkeypatch.setattr(diff_module, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(diff_module, "TASK_BLOCKS", 1)
    monkeypatch.setattr(diff_module, "PARALLEL_ELEMENTS", 0)  # worker threads even for small work
    threaded = diff(path_a, path_b).frame
    pd.testing.assert_frame_equal(threaded, default, check_exact=False, rtol=1e-12)
    monkeypatch.setattr(diff_module, "MAX_WORKERS", 1)
    assert diff(path_a, path_b).frame.equals(threaded)  # same tasks merged in the same order: bit for bit

    tuned = state_of(small_cnn)
    tuned["conv2.weight"] = tuned["conv2.weight"] * 1.01
    small = diff(small_cnn, tuned).frame
    monkeypatch.setattr(diff_module, "BLOCK_ELEMENTS", 3)
    pd.testing.assert_frame_equal(diff(small_cnn, tuned).frame, small, check_exact=False, rtol=1e-12)


def test_values_read_in_bounded_groups(base_and_tuned, monkeypatch):
    """The diff holds one group of owned copies at a time, not both checkpoints: with a tiny group
    size every pair is read on its own, and the numbers do not change."""
    _, _, path_a, path_b = base_and_tuned
    default = diff(path_a, path_b).frame
    reads: list[int] = []
    real = cv.Checkpoint.values

    def counted(self, keys, *args, **kwargs):
        keys = list(keys)
        reads.append(len(keys))
        return real(self, keys, *args, **kwargs)

    monkeypatch.setattr(cv.Checkpoint, "values", counted)
    monkeypatch.setattr(diff_module, "GROUP_BYTES", 1)
    grouped = diff(path_a, path_b).frame
    assert reads and max(reads) == 1 and len(reads) == 2 * int(default["status"].isin(["both", "dtype_differs"]).sum())
    pd.testing.assert_frame_equal(grouped, default)


def test_large_pairs_stream_through_reused_buffers_with_the_same_numbers(base_and_tuned, monkeypatch):
    """Above STREAM_BYTES a pair of stored tensors is read range by range into per-thread buffers
    (memory bounded by a few blocks, not by the largest pair): with the threshold at 0 every pair
    streams, no whole value is read, and the numbers are the same bit for bit; so too with a thread
    pool executor, against tensors in memory (one side streamed) and against strided tensors."""
    from concurrent.futures import ThreadPoolExecutor

    a, _, path_a, path_b = base_and_tuned
    default, in_memory = diff(path_a, path_b).frame, diff(a, path_b).frame
    strided = {k: v.mT.contiguous().mT if v.dim() >= 2 else v for k, v in a.items()}  # same values, other layout
    assert any(not v.is_contiguous() for v in strided.values())
    reads: list[str] = []
    real = cv.Checkpoint.values

    def counted(self, keys, *args, **kwargs):
        keys = list(keys)
        reads.extend(keys)
        return real(self, keys, *args, **kwargs)

    monkeypatch.setattr(cv.Checkpoint, "values", counted)
    monkeypatch.setattr(diff_module, "STREAM_BYTES", 0)
    pd.testing.assert_frame_equal(diff(path_a, path_b).frame, default)
    assert reads == []
    with ThreadPoolExecutor(2) as pool:
        pd.testing.assert_frame_equal(diff(path_a, path_b, executor=pool).frame, default)
    assert reads == []
    pd.testing.assert_frame_equal(diff(a, path_b).frame, in_memory)
    pd.testing.assert_frame_equal(diff(strided, path_b).frame, in_memory)
    monkeypatch.setattr(diff_module, "BLOCK_ELEMENTS", 1000)  # many ranges per tensor: sums merge in order
    pd.testing.assert_frame_equal(diff(path_a, path_b).frame, default, check_exact=False, rtol=1e-12)


# ---- inputs --------------------------------------------------------------------------------------
def test_model_against_path_and_module_against_module(small_cnn, tmp_path):
    tuned = state_of(small_cnn)
    tuned["head.weight"] += 0.5
    path = tmp_path / "tuned.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in tuned.items()}, "epoch": 3}, path)
    rep = diff(small_cnn, path)
    assert rep.section_a == "" and rep.section_b == "state_dict"
    assert rep.summary["both"] == len(tuned)
    assert rep.frame.loc[rep.frame["changed_frac"] > 0, "key"].tolist() == ["head.weight"]
    row = rep.frame.set_index("key").loc["head.weight"]
    assert_numbers(row, reference(small_cnn.head.weight.detach(), tuned["head.weight"]))
    assert repr(rep).startswith("DiffReport('<ConvNet>' [(top level)] vs ")

    other = randomize_buffers(ConvNet())
    rep = diff(small_cnn, other)
    assert rep.summary["both"] == len(tuned)
    for _, r in rep.frame.iterrows():
        assert_numbers(r, reference(small_cnn.state_dict()[r["key"]], other.state_dict()[r["key"]]))
    ck = cv.open_checkpoint(path)
    assert diff(ck, small_cnn).a is ck


def test_section_pair_that_pairs_most_keys(small_cnn, tmp_path):
    sd = state_of(small_cnn)
    path = tmp_path / "two.pt"
    partial = {k: v for k, v in list(sd.items())[:2]}
    torch.save({"state_dict": partial, "ema": {"module." + k: v + 1 for k, v in sd.items()}}, path)
    rep = diff(sd, path)
    assert rep.section_b == "ema" and rep.summary["both"] == len(sd)
    rep = diff(sd, path, section_b="state_dict")
    assert rep.section_b == "state_dict" and rep.summary == {"both": 2, "only_a": len(sd) - 2, "only_b": 0,
                                                             "shape_differs": 0, "dtype_differs": 0}
    rep = diff(path, path, section_a="ema", section_b="state_dict", auto_align=False)
    assert rep.summary["both"] == 0 and rep.summary["only_a"] == len(sd)
    rep = diff(sd, path, rules=[(r"^module\.", "")], section_b="ema")
    assert rep.rules == [("^module\\.", "")] and rep.summary["both"] == len(sd)


def test_bad_inputs_raise_checkpoint_errors(small_cnn, tmp_path):
    with pytest.raises(cv.ModelError, match="must be a path, a ckptviz.Checkpoint, an nn.Module or a state dict"):
        diff(42, small_cnn)
    with pytest.raises(TypeError):  # ModelError is a TypeError too
        diff(small_cnn, [1, 2])
    with pytest.raises(cv.CheckpointNotFoundError):
        diff(small_cnn, tmp_path / "missing.pt")
    with pytest.raises(cv.NoTensorsError, match="ReLU"):
        diff(nn.ReLU(), small_cnn)
    with pytest.raises(cv.NoTensorsError):
        diff({"epoch": 3}, small_cnn)
    path = tmp_path / "w.pt"
    torch.save(state_of(small_cnn), path)
    with pytest.raises(cv.SectionError, match="no section 'nope'"):
        diff(path, small_cnn, section_a="nope")


# ---- display -------------------------------------------------------------------------------------
def test_html_shows_counts_and_problems_first(base_and_tuned):
    _, _, path_a, path_b = base_and_tuned
    rep = diff(path_a, path_b)
    page = rep._repr_html_()
    for status, n in rep.summary.items():
        assert f"{status}: {n}" in page
    assert "values changed in 4 of 120 compared tensors" in page
    assert page.index("module.extra_head.weight") < page.index("fc.weight") < page.index("layer1.0.conv2.weight")
    assert "rename rules applied" in page and "showing" not in page
    assert "both=119" in repr(rep) and "values changed in 4" in repr(rep)

    many = {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(250)}
    page = diff(many, {k: v + (k == "layer7.weight") for k, v in many.items()})._repr_html_()
    assert "showing 200 of 250 rows" in page
    assert page.index("layer7.weight") < page.index("layer0.weight")


def test_progress_bar_and_no_widgets(small_cnn, capsys):
    diff(small_cnn, small_cnn, progress=True)
    assert "diff" in capsys.readouterr().err
    code = textwrap.dedent("""
        import sys, torch, ckptviz
        from ckptviz.diff import diff
        diff({"w": torch.ones(3)}, {"w": torch.zeros(3)})
        assert "ipywidgets" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shared_storages_and_strided_tensors_in_files(tmp_path):
    torch.manual_seed(4)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: one storage under two keys
    flat = torch.randn(20)
    a = {**nn.Sequential(emb, head).state_dict(), "lo": flat[:8], "hi": flat[8:], "t": torch.randn(6, 5).t()}
    torch.save(a, tmp_path / "a.pt")
    b = {k: v.clone() for k, v in a.items()}
    b["1.weight"] = b["1.weight"] + 1  # the tie broken in b
    b["hi"][2] = 0.0
    b["t"] = b["t"].contiguous() * 2
    torch.save(b, tmp_path / "b.pt")
    ck = cv.open_checkpoint(tmp_path / "a.pt")
    sd = ck.state_dict()
    assert sd["0.weight"].data_ptr() == sd["1.weight"].data_ptr() and not sd["t"].is_contiguous()
    for rep in (diff(ck, tmp_path / "b.pt"), diff(ck, ck)):
        assert rep.summary["both"] == len(a)
    rep = diff(ck, tmp_path / "b.pt")
    for _, r in rep.frame.iterrows():
        assert_numbers(r, reference(a[r["key"]], b[r["key_b"]]))
    assert rep.frame.loc[rep.frame["changed_frac"] > 0, "key"].tolist() == ["1.weight", "hi", "t"]
