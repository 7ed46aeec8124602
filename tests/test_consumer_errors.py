"""Malformed structures that the readers accept (they are valid pickles) but that the code walking them
used to meet with raw ``AttributeError`` / ``TypeError`` / torch ``INTERNAL ASSERT FAILED``: module
records with odd state (``trust=True``), malformed optimizer states, and plain tensor records of a
quantized dtype. Every file is written by torch.save (or by rewriting one global name in a real
torch.save archive); each must give a ckptviz ``CheckpointError`` naming the file, or open cleanly."""

from __future__ import annotations

import copy
import warnings
import zipfile

import pytest
import torch
from torch import nn

import ckptviz as cv
from ckptviz.errors import CheckpointError, CorruptCheckpointError, OptimizerMismatchError


class Record:
    """An object pickled as ``Record.__new__`` + BUILD with whatever state a test gives it."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (Record, (None,), self.state)


W = torch.arange(6, dtype=torch.float32).reshape(2, 3)

ODD_STATES = {
    "parameters_a_list": ({"_parameters": [W], "_modules": {}}, []),
    "modules_an_int": ({"_parameters": {"w": W}, "_modules": 5}, ["w"]),
    "modules_a_list": ({"_parameters": {"w": W}, "_modules": [Record({"_parameters": {"x": W}})]}, ["w"]),
    "non_persistent_an_int": ({"_parameters": {}, "_buffers": {"b": W}, "_non_persistent_buffers_set": 7,
                               "_modules": {}}, ["b"]),
    "int_names": ({"_parameters": {1: W}, "_modules": {2: Record({"_parameters": {3: W}})}}, ["1", "2.3"]),
    "slot_state_of_ints": (({"_parameters": 1}, {"_modules": {"a": 1}}), []),
    "three_tuple": ((1, 2, 3), None),
    "none": (None, None),
}


@pytest.mark.parametrize("name", list(ODD_STATES))
def test_module_records_with_odd_state_open_under_trust(tmp_path, name):
    state, keys = ODD_STATES[name]
    path = tmp_path / f"{name}.pt"
    torch.save({"model": Record(state), "w": W}, path)
    with pytest.raises(cv.UnsafeCheckpointError):  # control: the record's class is foreign
        cv.open_checkpoint(path)
    ck = cv.open_checkpoint(path, trust=True)
    assert repr(ck) and ck._repr_html_() and isinstance(ck.metadata, dict)
    copy_ = ck.materialize(ck._root)
    assert torch.equal(copy_["w"], W)
    if keys is not None and keys:
        assert sorted(ck.tensors("model").index) == keys
        for k in keys:
            assert torch.equal(ck.tensor(k, "model"), W)
    for section in ck.sections:
        ck.state_dict(section)


def _adam() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt.state_dict()


def _set(*path_and_value):
    *path, value = path_and_value

    def change(sd):
        target = sd
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value

    return change


MALFORMED = {
    "state_a_list": (_set("state", [1, 2]), "'state' must be a dict"),
    "state_a_tensor": (_set("state", torch.ones(3)), "'state' must be a dict"),
    "entry_a_tensor": (_set("state", 0, torch.ones(2, 3)), "state of parameter 0 must be a dict"),
    "entry_a_list": (_set("state", 0, [1]), "state of parameter 0 must be a dict"),
    "entry_value_a_dict": (_set("state", 0, "exp_avg", {"a": 1}), "state exp_avg of parameter 0"),
    "params_a_string": (_set("param_groups", 0, "params", "ab"), "must be a list of int parameter ids"),
    "params_an_int": (_set("param_groups", 0, "params", 5), "must be a list of int parameter ids"),
    "params_floats": (_set("param_groups", 0, "params", [0.0, 1.0]), "must be a list of int parameter ids"),
    "params_repeated": (_set("param_groups", 0, "params", [0, 0]), "repeats a parameter id"),
    "params_too_few": (_set("param_groups", 0, "params", [0]), "saved parameter groups have [1] parameters"),
    "groups_a_dict": (_set("param_groups", {"params": [0, 1]}), "no usable 'param_groups'"),
    "group_a_tensor": (_set("param_groups", 0, torch.ones(2)), "no usable 'param_groups'"),
    "step_a_string": (_set("state", 0, "step", "x"), "torch refused the optimizer state"),
    "exp_avg_wrong_shape": (_set("state", 0, "exp_avg", torch.ones(5)), "does not fit the parameters"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_optimizer_state_is_refused_and_the_optimizer_untouched(tmp_path, name):
    change, message = MALFORMED[name]
    model, saved = _adam()
    bad = copy.deepcopy(saved)
    change(bad)
    path = tmp_path / f"{name}.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": bad}, path)
    opt = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=0.5)
    before = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OptimizerMismatchError, match="^" + str(path).replace("\\", "\\\\")) as err:
            cv.load_optimizer(opt, path)
    assert message in str(err.value)
    assert opt.state_dict() == before


def test_the_good_optimizer_state_still_loads(tmp_path):
    model, saved = _adam()
    path = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": saved}, path)
    opt = torch.optim.Adam(nn.Linear(3, 2).parameters())
    assert cv.load_optimizer(opt, path) == {"groups": 1, "params": 2, "params_with_state": 2}
    got = opt.state_dict()
    assert torch.equal(got["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def test_lbfgs_lists_of_tensors_still_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), history_size=3)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    saved = opt.state_dict()
    assert isinstance(saved["state"][0]["old_dirs"], list)  # control: LBFGS keeps lists of tensors
    path = tmp_path / "lbfgs.pt"
    torch.save({"optimizer": saved, "state_dict": model.state_dict()}, path)
    fresh = torch.optim.LBFGS(nn.Linear(3, 1).parameters(), history_size=3)
    cv.load_optimizer(fresh, path)
    assert torch.equal(fresh.state_dict()["state"][0]["d"], saved["state"][0]["d"])


def _relabel(src, dst, old: bytes, new: bytes) -> None:
    """Copy the torch.save archive ``src`` to ``dst`` with one global name of its data.pkl replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(info.filename, data)


@pytest.mark.parametrize("storage", ["QInt8Storage", "QUInt8Storage", "QUInt4x2Storage"])
def test_a_plain_record_of_a_quantized_dtype(tmp_path, storage):
    src, bad = tmp_path / "src.pt", tmp_path / f"{storage}.pt"
    torch.save({"w": torch.arange(8, dtype=torch.int8), "v": torch.ones(2)}, src)
    _relabel(src, bad, b"torch\nCharStorage\n", f"torch\n{storage}\n".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = torch.load(bad, weights_only=True)["w"]  # control: torch builds it, and it fails on any use
        with pytest.raises(RuntimeError, match="INTERNAL ASSERT"):
            broken.clone()
    ck = cv.open_checkpoint(bad)  # listing it is fine
    assert ck.tensors().loc["w", "dtype"] == storage.removesuffix("Storage").lower()
    assert torch.equal(ck.tensor("v"), torch.ones(2))
    model = nn.Module()
    model.register_buffer("w", torch.zeros(8, dtype=torch.int8))
    for verb in (lambda: ck.tensor("w"), lambda: ck.materialize(ck._root), ck.stats, lambda: ck.histogram("w"),
                 ck.state_dict, lambda: cv.diff(bad, src), lambda: cv.load_partial(model, cv.compare(model, bad))):
        with pytest.raises(CheckpointError, match="quantized dtype") as err:
            verb()
        assert str(bad) in str(err.value)
        assert isinstance(err.value, CorruptCheckpointError) or "quantized" in str(err.value)
    assert torch.equal(model.w, torch.zeros(8, dtype=torch.int8))
