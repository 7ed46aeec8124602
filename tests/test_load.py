"""load_partial() and load_optimizer() on real models and real files: in place, atomic, undoable."""

import pytest
import torch
import torchvision
from models import LSTMTagger, SmallCNN, bit_identical, randomized, snapshot
from torch import nn

import ckptviz as cv


def save(obj, path):
    torch.save(obj, path)
    return path


def test_loads_into_the_same_parameter_objects_and_optimizer_stays_valid(tmp_path):
    src = randomized(SmallCNN(num_classes=10), seed=1)
    path = save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "dp.pt")
    model = SmallCNN(num_classes=5)
    params_before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    head_before = model.head.weight.detach().clone()
    res = cv.load_partial(model, cv.compare(model, path))
    assert sorted(res.skipped) == ["head.bias", "head.weight"]
    assert "(10, 16)" in res.skipped["head.weight"] and "(5, 16)" in res.skipped["head.weight"]
    assert set(res.loaded) == set(model.state_dict()) - {"head.weight", "head.bias"}
    assert res.missing_keys == [] and res.unexpected_keys == []
    for n, p in model.named_parameters():
        assert p is params_before[n]  # same objects: the optimizer still points at them
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    assert torch.equal(model.features[1].running_var, src.features[1].running_var)
    assert torch.equal(model.head.weight, head_before)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()  # still trains the loaded parameters in place
    assert not torch.equal(model.features[0].weight, src.features[0].weight)


def test_fp16_checkpoint_into_fp32_model(tmp_path):
    src = randomized(LSTMTagger(), seed=2)
    path = save({k: v.half() for k, v in src.state_dict().items()}, tmp_path / "half.pt")
    model = LSTMTagger()
    rep = cv.compare(model, path)
    assert rep.summary["dtype_mismatch"] == len(model.state_dict())
    res = cv.load_partial(model, rep)
    assert len(res.loaded) == len(model.state_dict())
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, src.state_dict()[k].half().float())


def test_undo_restores_exactly_what_was_overwritten(tmp_path):
    model = randomized(torchvision.models.resnet18(weights=None), seed=3)
    before = snapshot(model)
    path = save(randomized(torchvision.models.resnet18(weights=None), seed=4).state_dict(), tmp_path / "r.pt")
    res = cv.load_partial(model, cv.compare(model, path))
    assert not bit_identical(model, before)
    res.undo()
    assert bit_identical(model, before)
    with pytest.raises(cv.LoadError, match="already undone"):
        res.undo()


def test_only_the_selected_keys_load(tmp_path):
    src = randomized(SmallCNN(), seed=5)
    model = randomized(SmallCNN(), seed=6)
    before = snapshot(model)
    rep = cv.compare(model, save(src.state_dict(), tmp_path / "m.pt"))
    res = cv.load_partial(model, rep, keys=["head.weight", "head.bias"])
    assert res.loaded == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, src.head.weight)
    assert torch.equal(model.features[0].weight, before["features.0.weight"])
    outcomes = res.frame.set_index("key")["outcome"]
    assert outcomes["head.bias"] == "loaded" and outcomes["features.0.weight"] == "not_selected"


def test_selected_shape_mismatch_is_skipped_with_reason_and_unknown_keys_raise(tmp_path):
    model = SmallCNN(num_classes=3)
    rep = cv.compare(model, save(SmallCNN(num_classes=4).state_dict(), tmp_path / "m.pt"))
    before = snapshot(model)
    res = cv.load_partial(model, rep, keys=["head.weight"])
    assert res.loaded == [] and "shape" in res.skipped["head.weight"]
    with pytest.raises(cv.LoadError, match="not in the model"):
        cv.load_partial(model, rep, keys=["head.weights"])
    assert bit_identical(model, before)


def test_missing_and_unexpected_keys_in_torch_sense(tmp_path):
    sd = SmallCNN().state_dict()
    del sd["features.1.num_batches_tracked"]
    sd["extra.scale"] = torch.ones(1)
    model = SmallCNN()
    res = cv.load_partial(model, cv.compare(model, save(sd, tmp_path / "old.pt")))
    expected = model.load_state_dict(sd, strict=False)
    assert res.missing_keys == expected.missing_keys
    assert res.unexpected_keys == expected.unexpected_keys


class Fragile(nn.Module):
    """A model whose last buffer refuses in-place writes (an inference-mode tensor): a real mid-load failure."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Module()  # last in state-dict order
        with torch.inference_mode():
            self.c.register_buffer("frozen", torch.zeros(3, 4))


def test_failure_mid_load_leaves_model_bit_identical(tmp_path):
    model = Fragile()
    randomized(model.a, seed=7), randomized(model.b, seed=8)
    before = snapshot(model)
    src = {"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4), "b.weight": torch.randn(4, 4),
           "b.bias": torch.randn(4), "c.frozen": torch.randn(3, 4)}
    rep = cv.compare(model, save(src, tmp_path / "f.pt"))
    assert rep.summary["match"] == 5
    with pytest.raises(cv.LoadError, match="restored") as err:
        cv.load_partial(model, rep)
    assert "'c.frozen'" in str(err.value)
    assert bit_identical(model, before)


def test_without_undo_a_failure_names_what_was_written(tmp_path):
    model = Fragile()
    src = {"a.weight": torch.randn(4, 4), "c.frozen": torch.randn(3, 4)}
    rep = cv.compare(model, save(src, tmp_path / "f.pt"))
    with pytest.raises(cv.LoadError, match=r"1 tensor\(s\) before it were loaded \(\['a.weight'\]\)"):
        cv.load_partial(model, rep, undo=False)
    assert torch.equal(model.a.weight, src["a.weight"])


def test_fast_load_without_undo(tmp_path):
    src = randomized(SmallCNN(), seed=9)
    model = SmallCNN()
    res = cv.load_partial(model, cv.compare(model, save(src.state_dict(), tmp_path / "m.pt")), undo=False)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(cv.LoadError, match="kept no copy"):
        res.undo()


def test_overlapping_model_tensor_is_skipped_before_any_copy(tmp_path):
    class Expanded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.register_buffer("shared", torch.zeros(2).expand(3, 2))

    model = Expanded()
    rep = cv.compare(model, save({"a.weight": torch.ones(2, 2), "shared": torch.ones(3, 2)}, tmp_path / "e.pt"))
    res = cv.load_partial(model, rep)
    assert res.loaded == ["a.weight"] and "overlapping memory" in res.skipped["shared"]


def test_report_for_another_model_is_refused(tmp_path):
    rep = cv.compare(SmallCNN(), save(SmallCNN().state_dict(), tmp_path / "m.pt"))
    other = LSTMTagger()
    before = snapshot(other)
    with pytest.raises(cv.LoadError, match="different model"):
        cv.load_partial(other, rep)
    assert bit_identical(other, before)


def test_loading_never_writes_to_the_file(tmp_path):
    path = save(randomized(SmallCNN(), seed=8).state_dict(), tmp_path / "m.pt")
    data = path.read_bytes()
    model = SmallCNN()
    cv.load_partial(model, cv.compare(model, path))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert path.read_bytes() == data


def _trained_optimizer(model, cls=torch.optim.Adam, **kw):
    opt = cls(model.parameters(), lr=0.01, **kw)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        opt.step()
    return opt


def test_load_optimizer_restores_state(tmp_path):
    model = SmallCNN()
    opt = _trained_optimizer(model)
    path = save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "full.pt")
    fresh = SmallCNN()
    cv.load_partial(fresh, cv.compare(fresh, path))
    new_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    info = cv.load_optimizer(new_opt, path)
    assert info["params_with_state"] == len(list(fresh.parameters()))
    assert new_opt.param_groups[0]["lr"] == 0.01
    saved = opt.state_dict()["state"]
    for i, p in enumerate(fresh.parameters()):
        assert torch.equal(new_opt.state[p]["exp_avg"], saved[i]["exp_avg"])


def test_load_optimizer_names_group_sizes_that_differ(tmp_path):
    model = SmallCNN()
    path = save({"optimizer": _trained_optimizer(model).state_dict()}, tmp_path / "opt.pt")
    other = SmallCNN()
    opt = torch.optim.Adam([{"params": other.features.parameters()}, {"params": other.head.parameters()}])
    with pytest.raises(cv.OptimizerMismatchError, match=r"\[10\] parameters.*\[8, 2\]"):
        cv.load_optimizer(opt, path)
    assert opt.state_dict()["state"] == {}


def test_load_optimizer_refuses_another_optimizer_class(tmp_path):
    model = SmallCNN()
    path = save({"optimizer": _trained_optimizer(model).state_dict()}, tmp_path / "opt.pt")
    sgd = torch.optim.SGD(SmallCNN().parameters(), lr=0.1)
    with pytest.raises(cv.OptimizerMismatchError, match="another optimizer class"):
        cv.load_optimizer(sgd, path)


def test_load_optimizer_without_optimizer_state(tmp_path):
    path = save(SmallCNN().state_dict(), tmp_path / "m.pt")
    with pytest.raises(cv.SectionError, match="no optimizer state"):
        cv.load_optimizer(torch.optim.SGD(SmallCNN().parameters(), lr=0.1), path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_receives_cpu_checkpoint_and_cuda_file_reads_back(tmp_path):
    src = randomized(SmallCNN(), seed=10)
    path = save(src.state_dict(), tmp_path / "cpu.pt")
    model = SmallCNN().cuda()
    rep = cv.compare(model, path)
    assert set(rep.frame["model_device"]) == {"cuda:0"} and set(rep.frame["ckpt_device"]) == {"cpu"}
    res = cv.load_partial(model, rep)
    assert model.head.weight.device.type == "cuda"
    assert torch.equal(model.head.weight.cpu(), src.head.weight)
    res.undo()
    gpu_path = save(model.state_dict(), tmp_path / "gpu.pt")
    ck = cv.open_checkpoint(gpu_path)
    assert set(ck.tensors()["device"]) == {"cuda:0"}
    assert torch.equal(ck.tensor("head.weight"), model.head.weight.cpu())
