"""load_partial() survives interrupts and aliasing: a KeyboardInterrupt mid-load, Parameters sharing one
storage, tied weights and buffers that view a weight all come back bit-identical; meta and lazy models
are never reported as loaded when nothing was written."""

import pytest
import torch
from models import bit_identical, randomized, snapshot
from torch import nn

import ckptviz as cv


class _InterruptOnCopy(torch.Tensor):
    """A checkpoint tensor whose copy into the model raises KeyboardInterrupt on the Nth copy: the
    interrupt comes from inside the load's own ``dst.copy_(src)``, through torch's dispatch."""

    countdown = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            cls.countdown -= 1
            if cls.countdown == 0:
                raise KeyboardInterrupt
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class _InterruptingCheckpoint:
    """A real Checkpoint whose tensors interrupt the load on the Nth copy."""

    def __init__(self, ck, n):
        self._ck = ck
        _InterruptOnCopy.countdown = n

    def __getattr__(self, name):
        return getattr(self._ck, name)

    def values(self, keys, section):
        return {k: t.as_subclass(_InterruptOnCopy) for k, t in self._ck.values(keys, section).items()}


def stack(n=30, width=16):
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


@pytest.mark.parametrize("undo", [True, False])
def test_keyboard_interrupt_mid_load_rolls_back_and_reraises(tmp_path, undo):
    model = randomized(stack(), seed=1)
    before = snapshot(model)
    path = tmp_path / "s.pt"
    torch.save(randomized(stack(), seed=2).state_dict(), path)
    rep = cv.compare(model, path)
    rep.checkpoint = _InterruptingCheckpoint(rep.checkpoint, 31)  # 30 tensors written, the 31st interrupted
    with pytest.raises(KeyboardInterrupt):
        cv.load_partial(model, rep, undo=undo)
    if undo:
        assert bit_identical(model, before)
    else:  # no copy kept: the interrupt still goes through, and the first 30 tensors were written
        assert not bit_identical(model, before)


class Shared(nn.Module):
    """Two Parameters over one storage, tied weights, and a persistent buffer viewing a weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = nn.Parameter(self.a.weight.data)  # a second Parameter over a.weight's storage
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight  # tied: one object, two keys
        self.register_buffer("row", self.a.weight.data[1])  # a view into a.weight


def _shared_file(tmp_path, frozen=False):
    src = {k: torch.randn(v.shape) for k, v in Shared().state_dict().items()}
    if frozen:
        with torch.inference_mode():
            src["zz"] = torch.randn(2)
    path = tmp_path / "shared.pt"
    torch.save(src, path)
    return path, src


def test_undo_restores_aliased_storages_exactly(tmp_path):
    model = randomized(Shared(), seed=3)
    before = snapshot(model)
    path, _ = _shared_file(tmp_path)
    res = cv.load_partial(model, cv.compare(model, path))
    assert not bit_identical(model, before)
    assert model.b.weight.data_ptr() == model.a.weight.data_ptr() and model.head.weight is model.embed.weight
    res.undo()
    assert bit_identical(model, before)
    assert model.row.data_ptr() == model.a.weight.data_ptr() + 4 * 4  # still a view


class SharedFragile(Shared):
    def __init__(self):
        super().__init__()
        self.z = nn.Module()
        with torch.inference_mode():
            self.z.register_buffer("frozen", torch.zeros(2))  # refuses writes: the load fails on it, last


def test_failure_after_aliased_writes_rolls_back_exactly(tmp_path):
    model = randomized(SharedFragile(), seed=4)
    before = snapshot(model)
    src = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    torch.save(src, tmp_path / "f.pt")
    with pytest.raises(cv.LoadError, match="restored"):
        cv.load_partial(model, cv.compare(model, tmp_path / "f.pt"))
    assert bit_identical(model, before)


def test_assign_undo_repoints_shared_storages(tmp_path):
    model = randomized(Shared(), seed=5)
    before = snapshot(model)
    ptr = model.a.weight.data_ptr()
    path, _ = _shared_file(tmp_path)
    res = cv.load_partial(model, cv.compare(model, path), assign=True)
    assert model.a.weight.data_ptr() != ptr
    res.undo()
    assert bit_identical(model, before)
    assert model.a.weight.data_ptr() == model.b.weight.data_ptr() == ptr
    assert model.head.weight is model.embed.weight


def test_undo_refuses_when_a_storage_was_replaced(tmp_path):
    model = randomized(stack(2), seed=6)
    torch.save(randomized(stack(2), seed=7).state_dict(), tmp_path / "s.pt")
    res = cv.load_partial(model, cv.compare(model, tmp_path / "s.pt"))
    model[0].weight.data = torch.zeros(16, 16)
    with pytest.raises(cv.LoadError, match="nothing was restored"):
        res.undo()


def test_meta_model_without_assign_reports_nothing_loaded(tmp_path):
    torch.save(nn.Linear(3, 4).state_dict(), tmp_path / "l.pt")
    model = nn.Linear(3, 4, device="meta")
    res = cv.load_partial(model, cv.compare(model, tmp_path / "l.pt"))
    assert res.loaded == [] and set(res.skipped) == {"weight", "bias"}
    assert "assign=True" in res.skipped["weight"]
    res = cv.load_partial(model, cv.compare(model, tmp_path / "l.pt"), assign=True)
    assert sorted(res.loaded) == ["bias", "weight"] and not model.weight.is_meta


def test_lazy_linear_is_refused_clearly_where_torch_needs_its_load_hook(tmp_path):
    src = nn.Linear(3, 4).state_dict()
    torch.save(src, tmp_path / "l.pt")
    reference = nn.LazyLinear(4)
    reference.load_state_dict(src)  # torch materializes lazy parameters in its load hook
    assert torch.equal(reference.weight, src["weight"])
    model = nn.LazyLinear(4)
    with pytest.raises(cv.CheckpointError, match="forward pass"):
        cv.compare(model, tmp_path / "l.pt")
    model(torch.zeros(1, 3))  # after one forward pass the shapes exist and ckptviz loads like torch
    cv.load_partial(model, cv.compare(model, tmp_path / "l.pt"))
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)
