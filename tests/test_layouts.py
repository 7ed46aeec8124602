"""Many-to-one layouts on real modules: per-expert MoE weights stacked into a fused experts tensor
(suggested when the shapes fit exactly, applied only when asked), a fused qkv split into q, k, v; loads
checked value by value, atomic with the rest, undone, and written by torch_code."""

import pytest
import torch
from torch import nn

import ckptviz as cv
from ckptviz.errors import AdaptError


class PerExpert(nn.Module):
    """The old layout: one Linear per expert (``experts.{i}.w1.weight``)."""

    def __init__(self, experts=12):
        super().__init__()
        self.router = nn.Linear(4, experts, bias=False)
        self.experts = nn.ModuleList(nn.Module() for _ in range(experts))
        for e in self.experts:
            e.w1 = nn.Linear(4, 6, bias=False)


class Fused(nn.Module):
    """The new layout: one stacked (experts, 6, 4) parameter."""

    def __init__(self, experts=12):
        super().__init__()
        self.router = nn.Linear(4, experts, bias=False)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.zeros(experts, 6, 4))


def test_per_expert_weights_are_suggested_as_a_stack_and_load_when_combined(tmp_path):
    torch.manual_seed(0)
    old = PerExpert()
    path = tmp_path / "moe.pt"
    torch.save(dict(sorted(old.state_dict().items())), path)  # keys sorted as text: experts.10 before experts.2
    new = Fused()
    rep = cv.compare(new, path)
    assert rep.summary["missing"] == 1 and rep.summary["unexpected"] == 12
    sugg = rep.stack_suggestions()
    assert sugg["key"].tolist() == ["experts.w1"]
    keys = sugg.iloc[0]["ckpt_keys"]
    assert keys == [f"experts.{i}.w1.weight" for i in range(12)]  # index order, not the file's text order
    assert "12 tensors experts.{0-11}.w1.weight stack into (12, 6, 4)" in sugg.iloc[0]["reason"]
    assert cv.load_partial(new, rep).loaded == ["router.weight"]  # a suggestion loads nothing by itself

    combined = rep.combine("experts.w1", keys)
    row = combined.frame.set_index("key").loc["experts.w1"]
    assert row["status"] == "adapted" and row["rule"].startswith("adapted: stack 12 × (6, 4) along dim 0")
    assert combined.summary["unexpected"] == 0 and combined.summary["missing"] == 0
    res = cv.load_partial(new, combined)
    assert sorted(res.loaded) == ["experts.w1", "router.weight"]
    for i in range(12):
        assert torch.equal(new.experts.w1[i], old.experts[i].w1.weight)
    code = cv.torch_code(combined)
    other = Fused()
    scope = {"model": other}
    exec(code, scope)
    assert torch.equal(other.experts.w1, new.experts.w1)
    res.undo()
    assert torch.equal(new.experts.w1, torch.zeros(12, 6, 4))


def test_a_stack_that_does_not_fit_is_refused_before_anything_is_read(tmp_path):
    old, new = PerExpert(), Fused()
    rep = cv.compare(new, old.state_dict())
    with pytest.raises(AdaptError, match=r"stack 11 × \(6, 4\) along dim 0 gives \(11, 6, 4\)"):
        rep.combine("experts.w1", [f"experts.{i}.w1.weight" for i in range(11)])
    with pytest.raises(AdaptError, match="already paired"):
        rep.combine("experts.w1", ["router.weight"] + [f"experts.{i}.w1.weight" for i in range(11)])


class Attention(nn.Module):
    def __init__(self, fused: bool, dim=8):
        super().__init__()
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


def test_a_fused_qkv_splits_into_q_k_v():
    torch.manual_seed(1)
    fused, separate = Attention(True), Attention(False)
    rep = cv.compare(separate, fused.state_dict())
    rep = rep.split("qkv.weight", ["q.weight", "k.weight", "v.weight"]).split(
        "qkv.bias", ["q.bias", "k.bias", "v.bias"])
    f = rep.frame.set_index("key")
    assert f.loc["k.weight", "rule"] == "adapted: split qkv.weight (24, 8): [8:16] along dim 0"
    assert rep.summary["adapted"] == 6 and rep.summary["unexpected"] == 0
    cv.load_partial(separate, rep)
    q, k, v = fused.qkv.weight.detach().split(8)
    assert torch.equal(separate.q.weight, q) and torch.equal(separate.k.weight, k) and torch.equal(separate.v.weight, v)
    assert torch.equal(separate.v.bias, fused.qkv.bias.detach()[16:])
    other = Attention(False)
    scope = {"model": other, "state_dict": fused.state_dict()}
    exec(cv.torch_code(rep), scope)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), separate.state_dict().values()))
    with pytest.raises(AdaptError, match="sum to 16"):
        cv.compare(Attention(False), fused.state_dict()).split("qkv.weight", ["q.weight", "k.weight"])


def test_the_inspector_offers_the_suggested_stacks_and_loads_them(tmp_path):
    torch.manual_seed(2)
    old = PerExpert()
    path = tmp_path / "moe.safetensors"
    from safetensors.torch import save_file

    save_file(old.state_dict(), path)
    new = Fused()
    insp = cv.CheckpointInspector(model=new, path=path)
    panel = insp.suggestion_panel
    assert panel.layout.display == "" and panel.combine_button.layout.display == ""
    assert "1 missing tensor(s) are exactly a stack" in panel.info.value
    insp.combine_suggested()
    assert insp.report.summary["adapted"] == 1 and insp.report.summary["unexpected"] == 0
    assert panel.combine_button.layout.display == "none" and "combined" in insp.message.value
    res = insp.load_all()
    assert "experts.w1" in res.loaded
    assert all(torch.equal(new.experts.w1[i], old.experts[i].w1.weight) for i in range(12))


class GateUp(nn.Module):
    """transformers 5's fused layout: experts.gate_up_proj = per expert cat(w1, w3), stacked."""

    def __init__(self, experts=4):
        super().__init__()
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.zeros(experts, 12, 4))


class PerExpertGateUp(nn.Module):
    def __init__(self, experts=4):
        super().__init__()
        self.experts = nn.ModuleList(nn.Module() for _ in range(experts))
        for e in self.experts:
            e.w1, e.w3 = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)


def test_gate_and_up_concatenated_per_expert_then_stacked():
    torch.manual_seed(3)
    old, new = PerExpertGateUp(), GateUp()
    rep = cv.compare(new, old.state_dict())
    pairs = [[f"experts.{i}.w1.weight", f"experts.{i}.w3.weight"] for i in range(4)]
    rep = rep.combine("experts.gate_up_proj", pairs)
    assert rep.frame.set_index("key").loc["experts.gate_up_proj", "rule"].startswith(
        "adapted: concat 2 along dim 0, then stack 4 × (12, 4) along dim 0")
    cv.load_partial(new, rep)
    for i, e in enumerate(old.experts):
        assert torch.equal(new.experts.gate_up_proj[i], torch.cat([e.w1.weight, e.w3.weight]))
    other = GateUp()
    scope = {"model": other, "state_dict": old.state_dict()}
    exec(cv.torch_code(rep), scope)
    assert torch.equal(other.experts.gate_up_proj, new.experts.gate_up_proj)
    with pytest.raises(AdaptError, match=r"gives \(4, 6, 4\), but 'experts.gate_up_proj' is \(4, 12, 4\)"):
        cv.compare(GateUp(), old.state_dict()).combine("experts.gate_up_proj", [p[0] for p in pairs])


class PerExpertMLP(nn.Module):
    """Per-expert MLPs as older checkpoints save them: experts.{i}.gate_proj / up_proj / down_proj."""

    def __init__(self, experts=4, hidden=4, inter=3, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.experts = nn.ModuleList()
        for _ in range(experts):
            e = nn.Module()
            setattr(e, names[0], nn.Linear(hidden, inter, bias=False))
            setattr(e, names[1], nn.Linear(hidden, inter, bias=False))
            setattr(e, names[2], nn.Linear(inter, hidden, bias=False))
            self.experts.append(e)


class FusedMLP(nn.Module):
    """transformers 5's fused experts: gate_up_proj (E, 2I, H) = cat(gate, up) per expert, down_proj (E, H, I)."""

    def __init__(self, experts=4, hidden=4, inter=3, leaf="gate_up_proj"):
        super().__init__()
        self.experts = nn.Module()
        self.experts.register_parameter(leaf, nn.Parameter(torch.zeros(experts, 2 * inter, hidden)))
        self.experts.down_proj = nn.Parameter(torch.zeros(experts, hidden, inter))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_fused_gate_up_is_suggested_two_level_in_the_order_its_name_spells(tmp_path, names):
    torch.manual_seed(0)
    old = PerExpertMLP(names=names)
    path = tmp_path / "moe.pt"
    torch.save(dict(sorted(old.state_dict().items())), path)
    new = FusedMLP()
    rep = cv.compare(new, path)
    sugg = rep.stack_suggestions().set_index("key")
    assert sorted(sugg.index) == ["experts.down_proj", "experts.gate_up_proj"]
    fused = sugg.loc["experts.gate_up_proj"]
    assert fused["ckpt_keys"] == [[f"experts.{i}.{names[0]}.weight", f"experts.{i}.{names[1]}.weight"]
                                  for i in range(4)]  # gate before up, as in the name; experts in index order
    assert (fused["how"], fused["dim"], fused["inner"], fused["inner_dim"]) == ("stack", 0, "concat", 0)
    assert "concatenated along dim 0, stacked into (4, 6, 4)" in fused["reason"]
    assert sugg.loc["experts.down_proj"]["inner"] is None
    assert cv.load_partial(new, rep).loaded == []  # suggestions load nothing by themselves

    for key, r in sugg.iterrows():
        inner = {"inner": r["inner"], "inner_dim": r["inner_dim"]} if r["inner"] is not None else {}
        rep = rep.combine(key, r["ckpt_keys"], r["how"], r["dim"], **inner)
    assert rep.summary["missing"] == 0 and rep.summary["unexpected"] == 0
    res = cv.load_partial(new, rep)
    assert sorted(res.loaded) == ["experts.down_proj", "experts.gate_up_proj"]
    for i, e in enumerate(old.experts):
        gate, up, down = (getattr(e, n).weight for n in names)
        assert torch.equal(new.experts.gate_up_proj[i], torch.cat([gate, up], 0))
        assert torch.equal(new.experts.down_proj[i], down)


def test_fused_layout_stays_unsuggested_when_the_name_does_not_say_the_order(tmp_path):
    old = PerExpertMLP()
    path = tmp_path / "moe.pt"
    torch.save(old.state_dict(), path)
    rep = cv.compare(FusedMLP(leaf="fused"), path)  # gate then up, or up then gate? nothing says
    assert "experts.fused" not in set(rep.stack_suggestions()["key"])


def test_inspector_combines_a_two_level_suggestion(tmp_path):
    old = PerExpertMLP()
    torch.save(old.state_dict(), tmp_path / "moe.pt")
    new = FusedMLP()
    insp = cv.CheckpointInspector(model=new, path=tmp_path / "moe.pt")
    assert "2 missing tensor(s) are exactly a stack" in insp.suggestion_panel.info.value
    insp.suggestion_panel.combine_button.click()
    assert insp.report.summary["adapted"] == 2 and insp.report.summary["unexpected"] == 0
    insp.load_all_button.click()
    assert torch.equal(new.experts.gate_up_proj[2], torch.cat([old.experts[2].gate_proj.weight,
                                                               old.experts[2].up_proj.weight]))
