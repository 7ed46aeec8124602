"""Key alignment on real key lists: inferred prefixes and wrapper tokens, user rules, and refusals."""

import pytest
import torch
import torchvision

from ckptviz import AlignmentError
from ckptviz.align import align


@pytest.fixture(scope="module")
def resnet_keys():
    return list(torchvision.models.resnet18(weights=None).state_dict())


def test_exact_keys_pair_without_rules(resnet_keys):
    al = align(resnet_keys, resnet_keys)
    assert al.pairs == {k: k for k in resnet_keys}
    assert al.rules == []


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "_forward_module.", "backbone.",
                                    "module._orig_mod.", "encoder.student."])
def test_strips_any_common_prefix(resnet_keys, prefix):
    al = align(resnet_keys, [prefix + k for k in resnet_keys])
    assert al.pairs == {prefix + k: k for k in resnet_keys}
    assert len(al.rules) == 1
    assert al.rules[0].apply(prefix + "conv1.weight") == "conv1.weight"


def test_adds_a_prefix_the_checkpoint_lacks(resnet_keys):
    al = align(["backbone." + k for k in resnet_keys], resnet_keys)
    assert al.pairs == {k: "backbone." + k for k in resnet_keys}
    assert [str(r) for r in al.rules] == ["^ -> 'backbone.'"]


@pytest.mark.parametrize("token", ["_fsdp_wrapped_module", "_checkpoint_wrapped_module"])
def test_drops_wrapper_tokens_in_the_middle(resnet_keys, token):
    wrapped = [k.replace("layer1.0.", f"layer1.{token}.0.").replace("layer2.", f"layer2.{token}.") for k in resnet_keys]
    al = align(resnet_keys, wrapped)
    assert set(al.pairs.values()) == set(resnet_keys)
    assert al.pairs[f"layer1.{token}.0.conv1.weight"] == "layer1.0.conv1.weight"


def test_exact_match_wins_over_a_rename():
    model = ["fc.weight", "fc.bias"]
    ckpt = ["fc.weight", "module.fc.weight", "module.fc.bias"]
    al = align(model, ckpt)
    assert al.pairs["fc.weight"] == "fc.weight"
    assert al.pairs["module.fc.bias"] == "fc.bias"
    assert "module.fc.weight" not in al.pairs  # would compete with the exact match


def test_rule_never_makes_two_checkpoint_keys_compete():
    model = ["weight", "bias"]
    ckpt = ["a.weight", "b.weight", "a.bias"]
    al = align(model, ckpt)
    assert al.pairs == {"a.bias": "bias", "a.weight": "weight"}  # strip 'a.' pairs 2; 'b.' is left alone
    al2 = align(["weight"], ["a.weight", "b.weight"])
    assert al2.pairs == {}  # equally good renames disagree: guess neither


def test_same_shapes_under_other_names_are_never_paired():
    al = align(["head.weight", "head.bias"], ["classifier.weight", "classifier.bias"])
    assert al.pairs == {}


def test_user_rules_apply_first_and_are_recorded():
    model = ["encoder.layer.weight", "head.weight"]
    ckpt = ["enc.layer.weight", "module.head.weight"]
    al = align(model, ckpt, rules=[(r"^enc\.", "encoder.")])
    assert al.pairs == {"enc.layer.weight": "encoder.layer.weight", "module.head.weight": "head.weight"}
    assert [r.as_tuple() for r in al.rule_of["enc.layer.weight"]] == [(r"^enc\.", "encoder.")]
    assert al.rules[0].as_tuple() == (r"^enc\.", "encoder.")


def test_auto_align_off_keeps_only_exact_and_user_matches():
    al = align(["fc.weight"], ["module.fc.weight"], auto=False)
    assert al.pairs == {}


def test_user_rules_that_collide_raise():
    with pytest.raises(AlignmentError, match="several checkpoint keys"):
        align(["w"], ["a.w", "b.w"], rules=[(r"^\w+\.", "")])


def test_invalid_regex_raises():
    with pytest.raises(AlignmentError, match="not a valid regular expression"):
        align(["w"], ["w"], rules=[("(", "")])


def test_shape_agreement_breaks_ties():
    model = {"fc.weight": (2, 3)}
    ckpt = {"a.fc.weight": (5, 5), "b.fc.weight": (2, 3)}
    al = align(list(model), list(ckpt), same_shape=lambda c, m: ckpt[c] == model[m])
    assert al.pairs == {"b.fc.weight": "fc.weight"}


def test_real_dataparallel_and_compile_keys_align():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    keys = list(net.state_dict())
    dp = list(torch.nn.DataParallel(net).state_dict())
    compiled = list(torch.compile(net).state_dict())
    assert all(k.startswith("module.") for k in dp) and all(k.startswith("_orig_mod.") for k in compiled)
    assert set(align(keys, dp).pairs.values()) == set(keys)
    assert set(align(keys, compiled).pairs.values()) == set(keys)
