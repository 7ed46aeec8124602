"""Folding keys into layer patterns: fold_keys, Report.grouped(), ck.tensors(grouped=True), ck.sizes()."""

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv
from ckptviz.fold import FOLD_THRESHOLD, fold_keys, layer_of, ranges


def test_ranges_show_gaps_exactly():
    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert ranges([3]) == "3"
    assert ranges([2, 0, 1, 1]) == "0-2"


def test_moe_keys_fold_into_one_pattern_per_weight_with_gaps():
    keys = [f"model.layers.{i}.mlp.experts.{e}.{w}.weight"
            for i in range(61) if i != 13 for e in range(256) for w in ("gate_proj", "down_proj")]
    keys += ["model.embed_tokens.weight", "lm_head.weight"]
    f = fold_keys(keys)
    frame = f.frame()
    assert frame["pattern"].tolist() == [
        "model.layers.{0-12,14-60}.mlp.experts.{0-255}.gate_proj.weight",
        "model.layers.{0-12,14-60}.mlp.experts.{0-255}.down_proj.weight",
        "model.embed_tokens.weight", "lm_head.weight"]
    assert frame["keys"].tolist() == [60 * 256, 60 * 256, 1, 1]
    assert frame["grid"].all()
    # members give back exactly the keys of a group, in order
    assert [keys[i] for i in f.members(1)] == [k for k in keys if k.endswith("down_proj.weight")]


def test_a_group_that_is_not_a_full_grid_says_so():
    keys = [f"blocks.{i}.experts.{e}.w" for i in range(3) for e in range(4) if (i, e) != (2, 3)]
    f = fold_keys(keys)
    assert f.patterns == ["blocks.{0-2}.experts.{0-3}.w"]
    assert not f.grid[0]
    assert f.notes[0] == "not a full grid: 11 of 12 index combinations"


def test_fixed_index_shows_literally_and_odd_keys_keep_themselves():
    keys = ["a.3.b.0", "a.3.b.1", "weird{}.0", "weird{}.1", "x.1y.2", "7", "8", "b.01.c", "b.1.c"]
    f = fold_keys(keys)
    assert f.patterns == ["a.3.b.{0-1}", "weird{}.{0-1}", "x.1y.2", "{7-8}", "b.1.c"]
    assert "share 1 index tuples" in f.notes[-1]
    # a key holding the join separator falls back to key-by-key work with the same answer
    g = fold_keys(["l.0.w\x00", "l.1.w\x00", "l.0.b"])
    assert g.patterns == ["l.{0-1}.w\x00", "l.0.b"]


def test_layer_of():
    keys = pd.Series(["model.layers.3.mlp.w", "model.embed.weight", "lm_head.weight", "bias"])
    assert layer_of(keys).tolist() == ["model.layers.3", "model.embed", "lm_head", "bias"]


class Stack(nn.Module):
    def __init__(self, n: int, out: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        self.head = nn.Linear(4, out)


def test_report_grouped_counts_statuses_and_every_distinct_shape(tmp_path):
    sd = Stack(6).state_dict()
    sd["blocks.5.weight"] = torch.zeros(2, 4)  # shape mismatch inside the group
    sd["blocks.7.weight"] = torch.zeros(4, 4)  # unexpected, same pattern
    del sd["blocks.2.bias"]  # missing
    sd["blocks.1.bias"] = sd["blocks.1.bias"].double()
    path = tmp_path / "s.pth"
    torch.save(sd, path)
    rep = cv.compare(Stack(6), str(path))
    g = rep.grouped().set_index("pattern")
    w = g.loc["blocks.{0-5,7}.weight"]
    assert (w["keys"], w["match"], w["shape_mismatch"], w["unexpected"]) == (7, 5, 1, 1)
    assert w["model_shape"] == "(4, 4)" and w["ckpt_shape"] == "(4, 4) | (2, 4)"
    b = g.loc["blocks.{0-5}.bias"]
    assert (b["missing"], b["dtype_mismatch"], b["match"]) == (1, 1, 4)
    assert b["ckpt_dtype"] == "float32 | float64"
    assert g["keys"].sum() == len(rep.frame)


def test_checkpoint_tensors_grouped_and_sizes(tmp_path):
    tensors = {f"layers.{i}.w": torch.zeros(8, 8) for i in range(10)}
    tensors |= {f"layers.{i}.b": torch.zeros(8, dtype=torch.float16) for i in range(10)}
    tensors["embed.weight"] = torch.zeros(100, 8)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    ck = cv.open_checkpoint(str(path))
    g = ck.tensors(grouped=True).set_index("pattern")
    assert g.loc["layers.{0-9}.w", "keys"] == 10
    assert g.loc["layers.{0-9}.w", "nbytes"] == 10 * 8 * 8 * 4
    assert g.loc["layers.{0-9}.b", "dtype"] == "float16"
    assert g.loc["embed.weight", "shape"] == "(100, 8)"
    sizes = ck.sizes()
    assert sizes.index[0] == "embed" and sizes.iloc[0]["nbytes"] == 3200
    assert sizes.loc["layers.3", "tensors"] == 2 and sizes.loc["layers.3", "nbytes"] == 256 + 16
    assert np.isclose(sizes["share"].sum(), 1.0)
    by_dtype = ck.sizes(by="dtype")
    assert by_dtype.loc["float16", "tensors"] == 10
    assert ck.sizes(by="pattern").loc["layers.{0-9}.w", "nbytes"] == 2560
    with pytest.raises(ValueError, match="by must be"):
        ck.sizes(by="colour")


def test_a_huge_report_shows_itself_folded(tmp_path):
    n = FOLD_THRESHOLD + 500
    sd = {f"layers.{i}.scale": torch.zeros(2) for i in range(n)}
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(n):
        m = nn.Module()
        m.scale = nn.Parameter(torch.zeros(2))
        model.layers.append(m)
    sd["layers.4.scale"] = torch.zeros(3)
    rep = cv.compare(model, sd)
    page = rep._repr_html_()
    assert "ckptviz-folded" in page
    assert f"{n} rows folded into 1 layer patterns" in page
    assert "layers.{0-" + str(n - 1) + "}.scale" in page
    assert page.count("<tr") < 10  # not one row per key
