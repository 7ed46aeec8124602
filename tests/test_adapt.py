"""Shape adaptations on real models: a torchvision head with another class count (slice), a stem with
1 or 4 input channels (channels, checked against timm's adapt_input_conv), a timm ViT at another image
size (pos_embed resampled, checked against timm's resample_abs_pos_embed) and patch size (against
resample_patch_embed); reinit; atomic failure and undo; the same adaptations as plain PyTorch."""

import pytest
import torch
import torchvision
from models import InterruptOnCopy
from torch import nn

import ckptviz as cv
from ckptviz.adapt import applicable
from ckptviz.errors import AdaptError

timm = pytest.importorskip("timm")  # an optional extra; the test suite installs it
from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: E402
from timm.models._manipulate import adapt_input_conv  # noqa: E402


def seeded(fn, seed):
    torch.manual_seed(seed)
    return fn()


def test_a_head_with_fewer_classes_takes_the_first_rows():
    src = seeded(lambda: torchvision.models.resnet18(num_classes=10), 0)
    dst = seeded(lambda: torchvision.models.resnet18(num_classes=5), 1)
    rep = cv.compare(dst, src.state_dict())
    assert rep.summary["shape_mismatch"] == 2
    assert applicable((10, 512), (5, 512)) == ["slice", "reinit"]
    adapted = rep.adapt(["fc.weight", "fc.bias"], "slice")
    assert rep.summary["shape_mismatch"] == 2  # the report itself is unchanged
    row = adapted.frame.set_index("key").loc["fc.weight"]
    assert row["status"] == "adapted" and row["rule"] == "adapted: slice rows 10→5 (first 5 copied)"
    before = dst.fc.weight.detach().clone()
    res = cv.load_partial(dst, adapted)
    assert "fc.weight" in res.loaded and len(res.loaded) == len(dst.state_dict())
    assert torch.equal(dst.fc.weight.detach(), src.fc.weight.detach()[:5])
    assert torch.equal(dst.fc.bias.detach(), src.fc.bias.detach()[:5])
    res.undo()
    assert torch.equal(dst.fc.weight.detach(), before)


def test_a_bigger_head_keeps_its_own_rows_beyond_the_copied_block(tmp_path):
    src, dst = nn.Linear(4, 3), nn.Linear(6, 5)  # more classes and more inputs
    before = dst.weight.detach().clone()
    rep = cv.compare(dst, src.state_dict()).adapt(["weight", "bias"], "slice")
    assert rep.frame.set_index("key").loc["weight", "rule"] == (
        "adapted: slice rows 3→5 (first 3 copied, the rest kept as initialized); "
        "columns 4→6 (first 4 copied, the rest kept as initialized)")
    cv.load_partial(dst, rep)
    w = dst.weight.detach()
    assert torch.equal(w[:3, :4], src.weight.detach())
    assert torch.equal(w[3:], before[3:]) and torch.equal(w[:, 4:], before[:, 4:])


@pytest.mark.parametrize("in_chans", [1, 2, 4, 7])
def test_input_channels_follow_timms_rule(in_chans):
    src = seeded(lambda: torchvision.models.resnet18(), 0)
    dst = seeded(lambda: torchvision.models.resnet18(), 1)
    dst.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    rep = cv.compare(dst, src.state_dict())
    assert "channels" in applicable((64, 3, 7, 7), (64, in_chans, 7, 7))
    rep = rep.adapt("conv1.weight", "channels")
    assert rep.frame.set_index("key").loc["conv1.weight", "rule"].startswith(f"adapted: channels 3→{in_chans}")
    cv.load_partial(dst, rep)
    expected = adapt_input_conv(in_chans, src.conv1.weight.detach().clone())
    torch.testing.assert_close(dst.conv1.weight.detach(), expected, rtol=0, atol=1e-6)
    assert dst.eval()(torch.randn(1, in_chans, 32, 32)).shape == (1, 1000)


def test_a_vit_at_another_image_size_and_patch_size():
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    dst = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, num_classes=10)
    rep = cv.compare(dst, src.state_dict())
    assert rep.problems()["key"].tolist() == ["pos_embed"]
    assert applicable((1, 17, 192), (1, 37, 192), "pos_embed")[0] == "resample"
    rep = rep.adapt("pos_embed", "resample")
    assert rep.frame.set_index("key").loc["pos_embed", "rule"] == (
        "adapted: resample 4×4→6×6 grid, bicubic (1 prefix token kept)")
    res = cv.load_partial(dst, rep)
    assert len(res.loaded) == len(dst.state_dict())
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    assert torch.equal(dst.pos_embed.detach()[:, :1], src.pos_embed.detach()[:, :1])  # the class token's kept
    assert dst(torch.randn(1, 3, 96, 96)).shape == (1, 10)

    # patch size 16 -> 8 on the same image size: the kernel and the grid both change
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, num_classes=10)
    rep = cv.compare(small, src.state_dict())
    assert set(rep.problems()["key"]) == {"pos_embed", "patch_embed.proj.weight"}
    rep = rep.adapt("patch_embed.proj.weight", "resample").adapt("pos_embed", "resample")
    rule = rep.frame.set_index("key").loc["patch_embed.proj.weight", "rule"]
    assert rule.startswith("adapted: resample kernel 16×16→8×8")
    cv.load_partial(small, rep)
    torch.testing.assert_close(small.patch_embed.proj.weight.detach(),
                               resample_patch_embed(src.patch_embed.proj.weight.detach(), [8, 8]),
                               rtol=1e-4, atol=1e-5)


def test_text_position_table_extended_keeps_the_new_rows():
    src, dst = nn.Embedding(8, 4), nn.Embedding(12, 4)
    before = dst.weight.detach().clone()
    rep = cv.compare(dst, src.state_dict()).adapt("weight", "slice")
    cv.load_partial(dst, rep)
    assert torch.equal(dst.weight.detach()[:8], src.weight.detach())
    assert torch.equal(dst.weight.detach()[8:], before[8:])


def test_reinit_loads_nothing_and_says_so():
    src, dst = nn.Linear(4, 3), nn.Linear(4, 5)
    before = dst.weight.detach().clone()
    rep = cv.compare(dst, src.state_dict()).adapt(["weight", "bias"], "reinit")
    assert "weight" not in rep.loadable
    res = cv.load_partial(dst, rep)
    assert res.loaded == [] and res.skipped["weight"] == "reinit: kept as initialized, nothing loaded"
    assert torch.equal(dst.weight.detach(), before)


def test_adaptations_that_do_not_fit_are_refused_with_the_key():
    src, dst = nn.Linear(4, 3), nn.Linear(4, 5)
    rep = cv.compare(dst, src.state_dict())
    with pytest.raises(AdaptError, match=r"'weight' \(weight \(3, 4\) -> \(5, 4\)\): channels needs a convolution"):
        rep.adapt("weight", "channels")
    with pytest.raises(AdaptError, match="not a shape mismatch"):
        cv.compare(nn.Linear(4, 3), src.state_dict()).adapt("weight", "slice")
    with pytest.raises(AdaptError, match="unknown adaptation 'stretch'"):
        rep.adapt("weight", "stretch")


def test_a_failed_load_restores_adapted_rows_too(tmp_path):
    src = nn.Sequential(nn.Linear(4, 3), *[nn.Linear(4, 4) for _ in range(4)])
    dst = nn.Sequential(nn.Linear(4, 5), *[nn.Linear(4, 4) for _ in range(4)])
    path = tmp_path / "s.pt"
    torch.save(src.state_dict(), path)
    rep = cv.compare(dst, path).adapt(["0.weight", "0.bias"], "slice")
    before = {k: v.detach().clone() for k, v in dst.state_dict().items()}
    ck = rep.checkpoint
    values = ck.values

    def interrupting(keys, section, **kw):  # the checkpoint's tensors interrupt the 4th copy into the model
        return {k: t.as_subclass(InterruptOnCopy) for k, t in values(keys, section, **kw).items()}

    ck.values = interrupting
    InterruptOnCopy.countdown = 4
    try:
        with pytest.raises(KeyboardInterrupt):
            cv.load_partial(dst, rep)
    finally:
        del ck.values
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the adapted head included


def test_torch_code_writes_the_same_adaptations(tmp_path):
    src = seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10), 0)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)

    def target():
        return seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96,
                                                num_classes=4, in_chans=1), 1)

    dst = target()
    rep = cv.compare(dst, path)
    assert set(rep.problems()["key"]) == {"pos_embed", "patch_embed.proj.weight", "head.weight", "head.bias"}
    rep = (rep.adapt("pos_embed", "resample").adapt("patch_embed.proj.weight", "channels")
           .adapt(["head.weight", "head.bias"], "slice"))
    cv.load_partial(dst, rep)
    code = cv.torch_code(rep)
    other = target()
    scope = {"model": other}
    exec(code, scope)
    assert scope["missing"] == [] and scope["unexpected"] == []
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, msg=k)
