"""load_partial stays all-or-nothing under interrupts and with tensors that share memory; lazy models are
refused clearly (issue 8, items 7 and 8)."""

import pytest
import torch
from torch import nn

import ckptviz
from ckptviz.errors import CheckpointError


class Tripwire(torch.Tensor):
    """A real buffer whose next in-place ``copy_`` raises KeyboardInterrupt once (as a Ctrl-C would)."""

    armed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and cls.armed:
            cls.armed = False
            raise KeyboardInterrupt
        return super().__torch_function__(func, types, args, kwargs or {})


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


def test_keyboard_interrupt_mid_load_restores_every_tensor(tmp_path):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(150)])  # 300 tensors
    model[75].register_buffer("trip", torch.zeros(4).as_subclass(Tripwire))
    path = tmp_path / "ck.pt"
    torch.save({k: torch.randn(v.shape) for k, v in model.state_dict().items()}, path)
    before = _snapshot(model)
    report = ckptviz.compare(model, path)
    Tripwire.armed = True
    with pytest.raises(KeyboardInterrupt) as info:
        ckptviz.load_partial(model, report)
    assert not Tripwire.armed, "the interrupt never fired: the test did not test anything"
    assert any("restored" in n for n in getattr(info.value, "__notes__", []))
    assert _same(model, before)
    # the model is still usable: a second load goes through and can be undone
    res = ckptviz.load_partial(model, report)
    assert len(res.loaded) == 301 and not _same(model, before)
    res.undo()
    assert _same(model, before)


def test_keyboard_interrupt_without_undo_says_what_was_written(tmp_path):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    model[5].register_buffer("trip", torch.zeros(2).as_subclass(Tripwire))
    path = tmp_path / "ck.pt"
    torch.save({k: torch.randn(v.shape) for k, v in model.state_dict().items()}, path)
    report = ckptviz.compare(model, path)
    Tripwire.armed = True
    with pytest.raises(KeyboardInterrupt) as info:
        ckptviz.load_partial(model, report, undo=False)
    assert any("were loaded" in n for n in info.value.__notes__)


class Shared(nn.Module):
    """Two Parameters over one storage and a buffer that views part of a weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.b.weight = nn.Parameter(self.a.weight.data)  # a second Parameter over the same memory
        self.register_buffer("row", self.a.weight.data[1])  # a view of a weight


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_undo_and_rollback_restore_tensors_that_share_memory(tmp_path, order):
    model = Shared()
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    if order == "reversed":
        state = dict(reversed(state.items()))
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    before = _snapshot(model)
    res = ckptviz.load_partial(model, ckptviz.compare(model, path))
    assert len(res.loaded) == 5 and not _same(model, before)
    res.undo()
    assert _same(model, before)
    assert model.b.weight.data_ptr() == model.a.weight.data_ptr()  # still sharing


def test_rollback_after_a_failure_restores_shared_memory(tmp_path):
    model = Shared()
    model.register_buffer("trip", torch.zeros(3).as_subclass(Tripwire))
    path = tmp_path / "ck.pt"
    torch.save({k: torch.randn(v.shape) for k, v in model.state_dict().items()}, path)
    before = _snapshot(model)
    report = ckptviz.compare(model, path)
    Tripwire.armed = True
    with pytest.raises(KeyboardInterrupt):
        ckptviz.load_partial(model, report)
    assert _same(model, before)


def test_meta_model_copy_load_reports_nothing_loaded(tmp_path):
    path = tmp_path / "lin.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    res = ckptviz.load_partial(model, ckptviz.compare(model, path))
    assert res.loaded == [] and set(res.skipped) == {"weight", "bias"}
    assert res.still_meta == ["weight", "bias"]


def test_lazy_module_is_refused_with_a_clear_message_then_loads_after_a_forward(tmp_path):
    src = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    path = tmp_path / "mlp.pt"
    torch.save(src.state_dict(), path)
    lazy = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyLinear(2))
    with pytest.raises(CheckpointError, match="uninitialized lazy parameter.*forward pass"):
        ckptviz.compare(lazy, path)
    lazy(torch.zeros(1, 3))  # materializes the shapes
    res = ckptviz.load_partial(lazy, ckptviz.compare(lazy, path))
    assert len(res.loaded) == 4
    x = torch.randn(2, 3)
    assert torch.equal(lazy(x), src(x))
