"""compare(): the per-key report between real models and real checkpoint files."""

import pandas as pd
import pytest
import torch
import torchvision
from models import LSTMTagger, SmallCNN, randomized
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import ckptviz as cv
from ckptviz.compare import COLUMNS, STATUSES


def save(obj, path):
    torch.save(obj, path)
    return path


def test_frame_has_documented_columns_and_one_row_per_key(tmp_path):
    model = SmallCNN()
    rep = cv.compare(model, save(model.state_dict(), tmp_path / "m.pt"))
    assert list(rep.frame.columns) == COLUMNS
    assert rep.frame["key"].tolist() == list(model.state_dict())
    assert set(rep.frame["status"]) == {"match"}
    assert rep.summary == {"match": len(model.state_dict()), **{s: 0 for s in STATUSES if s != "match"}}
    row = rep.frame.set_index("key").loc["features.0.weight"]
    assert row["model_shape"] == (8, 1, 3, 3) and row["ckpt_shape"] == (8, 1, 3, 3)
    assert row["model_dtype"] == "float32" and row["ckpt_device"] == "cpu" and row["model_device"] == "cpu"
    assert pd.isna(row["rule"])


def test_every_status_appears_for_a_transfer_learning_checkpoint(tmp_path):
    src = SmallCNN(num_classes=10)
    sd = src.state_dict()
    sd["features.0.weight"] = sd["features.0.weight"].half()
    del sd["features.1.num_batches_tracked"]  # an old checkpoint
    sd["aux.weight"] = torch.zeros(3)
    rep = cv.compare(SmallCNN(num_classes=5), save(sd, tmp_path / "ckpt.bin"))
    by_key = rep.frame.set_index("ckpt_key")
    assert by_key.loc["head.weight", "status"] == "shape_mismatch"
    assert by_key.loc["head.weight", "ckpt_shape"] == (10, 16) and by_key.loc["head.weight", "model_shape"] == (5, 16)
    assert by_key.loc["features.0.weight", "status"] == "dtype_mismatch"
    assert by_key.loc["features.0.weight", "ckpt_dtype"] == "float16"
    assert by_key.loc["aux.weight", "status"] == "unexpected" and pd.isna(by_key.loc["aux.weight", "key"])
    missing = rep.frame[rep.frame["status"] == "missing"]
    assert missing["key"].tolist() == ["features.1.num_batches_tracked"]
    assert rep.summary["match"] == len(sd) - 4
    html = rep._repr_html_()
    assert "shape_mismatch: 2" in html and "unexpected: 1" in html and "missing: 1" in html


def test_dataparallel_checkpoint_lines_up_and_shows_its_rule(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    path = save({"state_dict": nn.DataParallel(model).state_dict(), "epoch": 7}, tmp_path / "dp.pth.tar")
    rep = cv.compare(torchvision.models.resnet18(weights=None, num_classes=10), path)
    assert rep.summary["match"] == len(model.state_dict())
    assert rep.rules == [(r"^module\.", "")]
    assert set(rep.frame["rule"]) == {r"^module\. -> ''"}
    assert rep.section == "state_dict"


def test_compiled_model_checkpoint_into_plain_model_and_back(tmp_path):
    model = SmallCNN()
    compiled = torch.compile(model)
    rep = cv.compare(model, save(compiled.state_dict(), tmp_path / "c.pt"))
    assert rep.summary["match"] == len(model.state_dict())
    rep_back = cv.compare(compiled, save(model.state_dict(), tmp_path / "p.pt"))
    assert rep_back.summary["match"] == len(model.state_dict())
    assert rep_back.rules == [("^", "_orig_mod.")]


def test_lightning_style_ckpt(tmp_path):
    class LitModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = LSTMTagger()

    lit = LitModule()
    opt = torch.optim.Adam(lit.parameters())
    path = save({"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0",
                 "state_dict": lit.state_dict(), "optimizer_states": [opt.state_dict()],
                 "hyper_parameters": {"lr": 1e-3}}, tmp_path / "last.ckpt")
    rep = cv.compare(LSTMTagger(), path)
    assert rep.summary["match"] == len(LSTMTagger().state_dict())
    assert rep.rules == [(r"^model\.", "")]
    assert rep.checkpoint.metadata["global_step"] == 40


def test_checkpoint_wrapper_tokens_align(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    wrapped = nn.Sequential(checkpoint_wrapper(nn.Linear(4, 8)), nn.ReLU(), checkpoint_wrapper(nn.Linear(8, 2)))
    raw = {k: v.detach() for k, v in wrapped.named_parameters()}  # how hand-written saves see the wrapper
    assert "0._checkpoint_wrapped_module.weight" in raw
    rep = cv.compare(net, save(raw, tmp_path / "w.pt"))
    assert rep.summary["match"] == 4
    assert rep.frame.set_index("key").loc["2.bias", "ckpt_key"] == "2._checkpoint_wrapped_module.bias"


def test_renamed_layers_with_equal_shapes_are_only_suggested(tmp_path):
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)

    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

    rep = cv.compare(B(), save(A().state_dict(), tmp_path / "a.pt"))
    assert rep.summary["suggested"] == 2 and rep.summary["match"] == 0 and rep.loadable == []
    assert rep.suggestions.set_index("key")["ckpt_key"].to_dict() == {"body.weight": "encoder.weight",
                                                                      "body.bias": "encoder.bias"}
    assert rep.accept().summary["match"] == 2


def test_best_section_is_chosen_by_matches(tmp_path):
    model = SmallCNN()
    other = LSTMTagger()
    path = save({"model": other.state_dict(), "ema": model.state_dict()}, tmp_path / "two.pt")
    rep = cv.compare(model, path)
    assert rep.section == "ema" and rep.summary["match"] == len(model.state_dict())
    assert cv.compare(model, path, section="model").summary["match"] == 0


def test_source_can_be_a_mapping_or_checkpoint(tmp_path):
    model = randomized(SmallCNN())
    rep = cv.compare(SmallCNN(), model.state_dict())
    assert rep.summary["match"] == len(model.state_dict())
    ck = cv.open_checkpoint(save(model.state_dict(), tmp_path / "m.pt"))
    assert cv.compare(SmallCNN(), ck).checkpoint is ck


def test_user_rules(tmp_path):
    sd = {k.replace("features.", "feat."): v for k, v in SmallCNN().state_dict().items()}
    path = save(sd, tmp_path / "r.pt")
    assert cv.compare(SmallCNN(), path, auto_align=False).summary["match"] == 2
    rep = cv.compare(SmallCNN(), path, rules=[(r"^feat\.", "features.")], auto_align=False)
    assert rep.summary["match"] == len(sd)
    assert rep.rules == [(r"^feat\.", "features.")]


def test_meta_device_model_compares_without_memory(tmp_path):
    with torch.device("meta"):
        model = SmallCNN()
    rep = cv.compare(model, save(SmallCNN().state_dict(), tmp_path / "m.pt"))
    assert set(rep.frame["model_device"]) == {"meta"}
    assert rep.summary["match"] == len(model.state_dict())


def test_non_module_model_is_a_clear_error(tmp_path):
    with pytest.raises(cv.ModelError, match="nn.Module"):
        cv.compare({"a": 1}, save(SmallCNN().state_dict(), tmp_path / "m.pt"))


def test_stats_columns_flag_nonfinite_and_never_loaded_tensors(tmp_path):
    src = randomized(SmallCNN(num_classes=10), seed=11)
    sd = src.state_dict()
    sd["features.0.bias"][1] = float("nan")
    path = save(sd, tmp_path / "s.pt")
    model = SmallCNN(num_classes=5)
    head_before = model.head.weight.detach().clone()
    rep = cv.compare(model, path, stats=True)
    row = rep.frame.set_index("key").loc["features.0.weight"]
    ref = sd["features.0.weight"].double()
    assert abs(row["ckpt_mean"] - ref.mean().item()) < 1e-9
    assert abs(row["ckpt_std"] - ref.std(unbiased=False).item()) < 1e-9
    assert row["model_max"] == model.features[0].weight.max().item()
    assert rep.frame.set_index("key").loc["features.0.bias", "nonfinite"]
    assert rep.frame["nonfinite"].sum() == 1
    assert not rep.frame["still_initial"].any()  # nothing loaded yet: no claim
    cv.load_partial(model, rep)
    after = cv.compare(model, path, stats=True).frame.set_index("key")
    assert after.loc["head.weight", "still_initial"] and after.loc["head.bias", "still_initial"]
    assert not after.loc["features.0.weight", "still_initial"]
    with torch.no_grad():
        model.head.weight.add_(1)  # trained since: no longer initial
    assert not cv.compare(model, path, stats=True).frame.set_index("key").loc["head.weight", "still_initial"]
    assert torch.allclose(model.head.weight - 1, head_before, atol=1e-6)
    assert "font-weight: bold" in rep._repr_html_()


def test_checkpoint_stats_and_histogram(tmp_path):
    t = torch.randn(1000)
    t[3] = float("inf")
    path = save({"w": t, "b": torch.zeros(3, dtype=torch.bfloat16)}, tmp_path / "h.pt")
    ck = cv.open_checkpoint(path)
    st = ck.stats()
    finite = t[torch.isfinite(t)].double()
    assert st.loc["w", "inf"] == 1 and abs(st.loc["w", "mean"] - finite.mean().item()) < 1e-9
    assert st.loc["b", "zero_frac"] == 1.0
    h = ck.histogram("w", bins=16)
    assert h.inf == 1 and h.counts.sum() == 999 and len(h.edges) == 17
    assert ck.stats().equals(st)  # cached, same values
