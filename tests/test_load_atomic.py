"""load_partial() survives interrupts and aliasing: a KeyboardInterrupt mid-load, Parameters sharing one
storage, tied weights and buffers that view a weight all come back bit-identical; meta and lazy models
are never reported as loaded when nothing was written; uninitialized lazy modules load like torch's
load_state_dict (they take the checkpoint's shapes) and undo makes them lazy again."""

import pytest
import torch
from models import InterruptOnCopy, bit_identical, randomized, snapshot
from torch import nn

import ckptviz
import ckptviz as cv


# ---- interrupts from the checkpoint side (a wrapped Checkpoint) -----------------------------------
class _InterruptingCheckpoint:
    """A real Checkpoint whose tensors interrupt the load on the Nth copy."""

    def __init__(self, ck, n):
        self._ck = ck
        InterruptOnCopy.countdown = n

    def __getattr__(self, name):
        return getattr(self._ck, name)

    def values(self, keys, section, **kw):
        return {k: t.as_subclass(InterruptOnCopy) for k, t in self._ck.values(keys, section, **kw).items()}


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


def _lazy_cnn() -> nn.Module:
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))


def _real_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.fixture
def lazy_file(tmp_path):
    torch.manual_seed(0)
    src = _real_cnn()
    with torch.no_grad():  # running statistics that a default-initialised model would not have
        src[1].running_mean.normal_()
        src[1].running_var.uniform_(0.5, 2.0)
        src[1].weight.normal_()
    path = tmp_path / "cnn.pt"
    torch.save(src.state_dict(), path)
    return path


@pytest.mark.parametrize("assign", [False, True])
def test_lazy_modules_load_like_torchs_load_state_dict(lazy_file, assign):
    """LazyLinear / LazyConv2d / LazyBatchNorm2d take the checkpoint's shapes, as torch's load hook gives them."""
    reference = _lazy_cnn()
    reference.load_state_dict(torch.load(lazy_file, weights_only=True))  # torch materializes them in its hook
    model = _lazy_cnn()
    report = cv.compare(model, lazy_file)
    frame = report.frame.set_index("key")
    assert report.summary["match"] == 9 and report.summary["shape_mismatch"] == 0
    assert frame.at["4.weight", "model_lazy"] is True and frame.at["4.weight", "model_shape"] is None
    assert frame.at["1.num_batches_tracked", "model_lazy"] is False  # a real buffer of the lazy module
    res = cv.load_partial(model, report, assign=assign)
    assert len(res.loaded) == 9 and "4.weight" in res.lazy and "1.num_batches_tracked" not in res.lazy
    assert not any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in model.state_dict().values())
    x = torch.randn(2, 3, 8, 8)
    model.eval(), reference.eval()
    assert torch.isfinite(reference(x)).all()
    assert torch.equal(model(x), reference(x))
    assert type(model[4]) is nn.Linear  # the first forward turned it into a Linear, as torch's own path does


def test_undo_makes_lazy_tensors_uninitialized_again(lazy_file):
    model = _lazy_cnn()
    res = cv.load_partial(model, cv.compare(model, lazy_file))
    assert model[4].weight.shape == (5, 144)
    res.undo()
    assert type(model[4].weight) is nn.parameter.UninitializedParameter and model[4].has_uninitialized_params()
    assert type(model[1].running_mean) is nn.parameter.UninitializedBuffer
    model(torch.zeros(1, 3, 8, 8))  # still a working lazy module: a forward initializes it as usual
    assert model[4].weight.shape == (5, 144)


def test_an_interrupted_load_leaves_lazy_tensors_uninitialized(lazy_file):
    model = _lazy_cnn()
    model[4].register_buffer("trip", torch.zeros(2).as_subclass(Tripwire))
    path = lazy_file.parent / "trip.pt"
    torch.save({**torch.load(lazy_file, weights_only=True), "4.trip": torch.ones(2)}, path)
    report = cv.compare(model, path)
    Tripwire.armed = True
    with pytest.raises(KeyboardInterrupt):
        cv.load_partial(model, report)
    assert not Tripwire.armed, "the interrupt never fired: the test did not test anything"
    assert model[0].has_uninitialized_params() and model[4].has_uninitialized_params()
    assert type(model[0].weight) is nn.parameter.UninitializedParameter


def test_a_skipped_lazy_tensor_stays_uninitialized(lazy_file):
    model = _lazy_cnn()
    res = cv.load_partial(model, cv.compare(model, lazy_file), keys=["0.weight", "0.bias"])
    assert sorted(res.loaded) == ["0.bias", "0.weight"] and sorted(res.lazy) == ["0.bias", "0.weight"]
    assert model[0].weight.shape == (4, 3, 3, 3) and model[4].has_uninitialized_params()
    assert torch.equal(model[0].weight, torch.load(lazy_file, weights_only=True)["0.weight"])


def test_lazy_linear_after_a_forward_loads_as_before(tmp_path):
    src = nn.Linear(3, 4).state_dict()
    torch.save(src, tmp_path / "l.pt")
    model = nn.LazyLinear(4)
    model(torch.zeros(1, 3))
    res = cv.load_partial(model, cv.compare(model, tmp_path / "l.pt"))
    assert res.lazy == [] and torch.equal(model.weight, src["weight"])


# ---- interrupts from the model side (a buffer whose copy_ raises) ----------------------------------
class Tripwire(torch.Tensor):
    """A real buffer whose next in-place ``copy_`` raises KeyboardInterrupt once (as a Ctrl-C would)."""

    armed = False
    error: BaseException | type[BaseException] = KeyboardInterrupt

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and cls.armed:
            cls.armed = False
            raise cls.error
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


class SharedRow(nn.Module):
    """Two Parameters over one storage and a buffer that views part of a weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.b.weight = nn.Parameter(self.a.weight.data)  # a second Parameter over the same memory
        self.register_buffer("row", self.a.weight.data[1])  # a view of a weight


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_undo_and_rollback_restore_tensors_that_share_memory(tmp_path, order):
    model = SharedRow()
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
    model = SharedRow()
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


def test_lazy_mlp_loads_without_a_forward_pass(tmp_path):
    src = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    path = tmp_path / "mlp.pt"
    torch.save(src.state_dict(), path)
    lazy = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyLinear(2))
    res = ckptviz.load_partial(lazy, ckptviz.compare(lazy, path))  # earlier: refused, "run a forward pass"
    assert len(res.loaded) == 4
    x = torch.randn(2, 3)
    assert torch.equal(lazy(x), src(x))


class Breaks(Tripwire):
    """A real buffer whose next in-place ``copy_`` fails with a RuntimeError (a device error, say)."""

    armed = False
    error = RuntimeError("the device went away")


@pytest.mark.parametrize("wire", [Breaks, Tripwire])
def test_a_load_without_undo_that_fails_part_way_leaves_lazy_modules_lazy(lazy_file, wire):
    """``undo=False`` keeps no copy, so a failure part-way leaves the tensors written before it; lazy
    tensors it had given the checkpoint's shape are made uninitialized again (as before the call), and
    the error says so. The lazy model still works: a forward initializes it as usual."""
    model = _lazy_cnn()
    model[4].register_buffer("trip", torch.zeros(2).as_subclass(wire))
    path = lazy_file.parent / "trip.pt"
    torch.save({**torch.load(lazy_file, weights_only=True), "4.trip": torch.ones(2)}, path)
    report = cv.compare(model, path)
    assert list(report.frame["key"])[-1] == "4.trip"  # written last: after every lazy tensor
    wire.armed = True
    with pytest.raises((cv.LoadError, KeyboardInterrupt)) as info:
        cv.load_partial(model, report, undo=False)
    assert not wire.armed, "the failure never fired: the test did not test anything"
    said = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert "uninitialized again" in said and "0.weight" in said, said
    for m in (model[0], model[1], model[4]):
        assert m.has_uninitialized_params()
    assert type(model[0].weight) is nn.parameter.UninitializedParameter
    assert type(model[1].running_mean) is nn.parameter.UninitializedBuffer
    assert torch.equal(model[1].num_batches_tracked, torch.load(path, weights_only=True)["1.num_batches_tracked"])
    model(torch.zeros(1, 3, 8, 8))
    assert model[4].weight.shape == (5, 144)
