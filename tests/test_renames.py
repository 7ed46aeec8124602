"""Rename families, structural renames and suggestions, on real torch modules and their real state
dicts: old vs parametrized weight_norm and spectral_norm, gamma/beta in norm layers only, a block
wrapped in nn.Sequential, a renumbered list; suggestions never loaded until accepted; ambiguous
pairings left unresolved."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import ckptviz as cv
from ckptviz.errors import ModelError


def _old_weight_norm(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old form: people's files still have it
        return torch.nn.utils.weight_norm(m)


def wn_net(new: bool) -> nn.Sequential:
    torch.manual_seed(0 if new else 1)
    wrap = parametrizations.weight_norm if new else _old_weight_norm
    return nn.Sequential(wrap(nn.Conv1d(2, 3, 3)), nn.ReLU(), wrap(nn.Conv1d(3, 4, 3)), nn.Flatten(), nn.Linear(8, 2))


@pytest.mark.parametrize("old_to_new", [True, False])
def test_weight_norm_old_and_parametrized_load_into_each_other(old_to_new):
    src, dst = wn_net(new=not old_to_new), wn_net(new=old_to_new)
    rep = cv.compare(dst, src.state_dict())
    assert rep.summary["match"] == len(dst.state_dict()) and rep.summary["unexpected"] == 0
    way = "old -> parametrized" if old_to_new else "parametrized -> old"
    renamed = rep.frame[rep.frame["rule"].notna()]
    assert len(renamed) == 4 and renamed["rule"].str.startswith(f"weight_norm, {way}").all()
    x = torch.randn(1, 2, 6)
    assert not torch.allclose(dst(x), src(x))
    res = cv.load_partial(dst, rep)
    assert len(res.loaded) == len(dst.state_dict())
    torch.testing.assert_close(dst(x), src(x))  # the same function: g and v went where they belong
    if old_to_new:
        torch.testing.assert_close(dst[0].parametrizations.weight.original0, src[0].weight_g)
        torch.testing.assert_close(dst[0].parametrizations.weight.original1, src[0].weight_v)
    res.undo()
    assert not torch.allclose(dst(x), src(x))


def sn_net(new: bool) -> nn.Sequential:
    torch.manual_seed(2 if new else 3)
    wrap = parametrizations.spectral_norm if new else torch.nn.utils.spectral_norm
    net = nn.Sequential(wrap(nn.Linear(4, 6)), nn.Tanh(), wrap(nn.Linear(6, 3)))
    net.train()
    net(torch.randn(5, 4))  # one power iteration: u and v are no longer their initial values
    return net.eval()


@pytest.mark.parametrize("old_to_new", [True, False])
def test_spectral_norm_old_and_parametrized_load_into_each_other(old_to_new):
    src, dst = sn_net(new=not old_to_new), sn_net(new=old_to_new)
    rep = cv.compare(dst, src.state_dict())
    assert rep.summary["match"] == len(dst.state_dict()), rep.problems()
    assert rep.frame["rule"].dropna().str.startswith("spectral_norm").sum() == 6
    cv.load_partial(dst, rep)
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))  # eval: both use the loaded u, v and the original weight


class LayerScale(nn.Module):
    """Owns a real parameter named gamma (as in ViT's LayerScale): never renamed."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))


class Block(nn.Module):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.LayerNorm = nn.LayerNorm(dim)
        self.ls = LayerScale(dim)


def test_gamma_beta_rename_only_inside_norm_layers():
    model = Block()
    sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in sd.items()}  # the old BERT way of saving a LayerNorm
    rep = cv.compare(model, old)
    f = rep.frame.set_index("key")
    assert rep.summary["match"] == 5
    assert f.loc["LayerNorm.weight", "ckpt_key"] == "LayerNorm.gamma"
    assert f.loc["LayerNorm.weight", "rule"].startswith("norm layers: gamma -> weight")
    assert f.loc["ls.gamma", "ckpt_key"] == "ls.gamma" and f.loc["ls.gamma", "rule"] is None  # exact wins
    cv.load_partial(model, rep)
    torch.testing.assert_close(model.LayerNorm.weight.detach(), old["LayerNorm.gamma"])
    torch.testing.assert_close(model.ls.gamma.detach(), old["ls.gamma"])

    # a gamma that is not in a norm layer is never taken for a norm's weight by the family rule
    other = {"fc.weight": sd["fc.weight"], "fc.bias": sd["fc.bias"], "ls.weight": sd["ls.gamma"],
             "LayerNorm.weight": sd["LayerNorm.weight"], "LayerNorm.bias": sd["LayerNorm.bias"]}
    rep = cv.compare(model, other)
    row = rep.frame.set_index("key").loc["ls.gamma"]
    assert row["status"] == "suggested" and not row["rule"].startswith("norm layers")


class Prefilter(nn.Module):
    def __init__(self, nested: bool):
        super().__init__()
        conv = nn.Sequential(nn.Conv1d(1, 4, 5), nn.BatchNorm1d(4))
        self.prefilt = nn.Sequential(conv) if nested else conv
        self.out = nn.Linear(4, 2)


@pytest.mark.parametrize("nested_model", [True, False])
def test_a_block_wrapped_or_unwrapped_in_sequential_pairs_by_structure(nested_model):
    src, dst = Prefilter(nested=not nested_model), Prefilter(nested=nested_model)
    for m in (src, dst):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
    rep = cv.compare(dst, src.state_dict())
    assert rep.summary["match"] == len(dst.state_dict()) and rep.summary["unexpected"] == 0
    f = rep.frame.set_index("key")
    key = "prefilt.0.0.weight" if nested_model else "prefilt.0.weight"
    assert f.loc[key, "ckpt_key"] == ("prefilt.0.weight" if nested_model else "prefilt.0.0.weight")
    assert f.loc[key, "rule"].startswith("structure")
    assert f.loc["prefilt.1.running_var" if not nested_model else "prefilt.0.1.running_var", "status"] == "match"
    cv.load_partial(dst, rep)
    dst.eval(), src.eval()
    x = torch.randn(2, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(dst.prefilt(x), src.prefilt(x))


def test_a_list_renumbered_after_a_layer_was_removed():
    torch.manual_seed(0)
    four = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    saved = {k: v for k, v in four.state_dict().items() if not k.startswith("2.")}  # keys 0, 1, 3: the gap kept
    three = nn.Sequential(*[nn.Linear(3, 3) for _ in range(3)])
    rep = cv.compare(three, saved)
    f = rep.frame.set_index("key")
    assert rep.summary["match"] == 6 and rep.summary["unexpected"] == 0
    assert f.loc["2.weight", "ckpt_key"] == "3.weight" and f.loc["2.weight", "rule"].startswith("structure")
    assert f.loc["1.weight", "ckpt_key"] == "1.weight"  # exact names win
    cv.load_partial(three, rep)
    torch.testing.assert_close(three[2].weight.detach(), four[3].weight.detach())


def test_renumbering_pairs_in_index_order_even_when_the_file_sorts_keys_as_text():
    torch.manual_seed(1)
    twelve = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
    saved = {f"blocks.{i + 1}.{k}": v for i, m in enumerate(twelve) for k, v in m.state_dict().items()}
    saved = dict(sorted(saved.items()))  # blocks.1, blocks.10, blocks.11, blocks.12, blocks.2, ...
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(13))  # blocks.0 is new
    del model.blocks[12]
    rep = cv.compare(model, saved)
    f = rep.frame.set_index("key")
    # blocks.1..11 match exactly; the file's blocks.12 is the model's only free block, blocks.0
    assert f.loc["blocks.0.weight", "ckpt_key"] == "blocks.12.weight"
    assert f.loc["blocks.5.weight", "ckpt_key"] == "blocks.5.weight"


def test_suggestions_are_never_loaded_until_accepted():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("head", nn.Linear(8, 5))
    saved = {"body.weight": torch.randn(8, 8), "body.bias": torch.randn(8),
             "classifier.weight": torch.randn(5, 8), "classifier.bias": torch.randn(5)}
    rep = cv.compare(model, saved)
    assert rep.summary["suggested"] == 2 and rep.summary["unexpected"] == 0 and rep.summary["missing"] == 0
    sugg = rep.suggestions.set_index("key")
    assert sugg.loc["head.weight", "ckpt_key"] == "classifier.weight"
    assert 0 <= sugg.loc["head.weight", "confidence"] <= 1 and "same shape (5, 8)" in sugg.loc["head.weight", "reason"]
    assert "head.weight" not in rep.loadable
    before = model.head.weight.detach().clone()
    res = cv.load_partial(model, rep)
    assert sorted(res.loaded) == ["body.bias", "body.weight"]
    assert "accept" in res.skipped["head.weight"]
    torch.testing.assert_close(model.head.weight.detach(), before)  # untouched
    res = cv.load_partial(model, rep, keys=["head.weight"])  # asked for by name: still not loaded
    assert res.loaded == [] and "only suggested" in res.skipped["head.weight"]

    accepted = rep.accept(["head.weight"])
    assert rep.summary["suggested"] == 2  # the report itself is unchanged
    f = accepted.frame.set_index("key")
    assert f.loc["head.weight", "status"] == "match" and f.loc["head.weight", "rule"].startswith("accepted: same shape")
    assert f.loc["head.bias", "status"] == "suggested" and accepted.suggestions["key"].tolist() == ["head.bias"]
    res = cv.load_partial(model, accepted)
    assert "head.weight" in res.loaded and "head.bias" not in res.loaded
    torch.testing.assert_close(model.head.weight.detach(), saved["classifier.weight"])
    all_in = rep.accept()
    assert all_in.summary["suggested"] == 0 and all_in.summary["match"] == 4
    with pytest.raises(ModelError, match="no suggestion for"):
        rep.accept(["body.weight"])


def test_two_equally_plausible_pairings_stay_unresolved():
    model = nn.Module()
    model.head = nn.Linear(8, 5)
    saved = {"fc_a.weight": torch.randn(5, 8), "fc_b.weight": torch.randn(5, 8), "head.bias": torch.randn(5)}
    rep = cv.compare(model, saved)
    f = rep.frame.set_index(rep.frame["key"].fillna(rep.frame["ckpt_key"]))
    assert f.loc["head.weight", "status"] == "missing" and rep.summary["suggested"] == 0
    assert f.loc["head.weight", "rule"].startswith("ambiguous: 2 checkpoint tensors fit equally")
    amb = rep.ambiguous
    assert amb.loc[amb["key"] == "head.weight", "candidates"].iloc[0] == ["fc_a.weight", "fc_b.weight"]
    assert cv.load_partial(model, rep).loaded == ["head.bias"]


def test_the_closest_name_is_suggested_when_it_is_clearly_closest():
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))
    saved = {f"encoder.layer.{i}.weight": torch.randn(4, 4) for i in range(3)}  # layer vs layers
    rep = cv.compare(model, saved)
    sugg = rep.suggestions.set_index("key")["ckpt_key"].to_dict()
    assert sugg == {f"encoder.layers.{i}.weight": f"encoder.layer.{i}.weight" for i in range(3)}


def test_no_inference_with_auto_align_off():
    src, dst = Prefilter(nested=False), Prefilter(nested=True)
    rep = cv.compare(dst, src.state_dict(), auto_align=False)
    assert rep.summary["match"] == 2 and rep.summary["suggested"] == 0
