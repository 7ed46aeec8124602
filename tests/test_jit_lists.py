"""TorchScript's list builders (``torch.jit._pickle.build_intlist`` ...) are data, not code: a scripted
model whose records use them opens without trust, and its tensors are the model's."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.jit._pickle
from ckpt_files import assert_clean_error
from torch import nn

import ckptviz as cv
from ckptviz.readers.pickle_reader import unpickle


def _scripted(module: nn.Module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still real
        scripted = torch.jit.script(module)
    scripted.save(str(path))
    return scripted


def test_scripted_conv_and_maxpool_open_without_trust(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "scripted.pt"
    scripted = _scripted(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)), path)
    ck = cv.open_checkpoint(path)
    assert ck.format == "torchscript"
    got = ck.state_dict()
    want = scripted.state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _jit_call(builder: str, payload) -> bytes:
    """A pickle calling torch's own ``torch.jit._pickle.<builder>`` on ``payload``."""
    fn = getattr(torch.jit._pickle, builder)

    class Call:
        def __reduce__(self):
            return (fn, (payload,))

    return pickle.dumps(Call(), protocol=2)


@pytest.mark.parametrize(("builder", "payload"), [
    ("build_intlist", [1, 2, 3]), ("build_doublelist", [1.5, 2.0]), ("build_boollist", [True, False]),
    ("build_tensorlist", []),
])
def test_list_builders_give_the_list(builder, payload):
    obj, up = unpickle(_jit_call(builder, payload))
    assert obj == payload and type(obj) is list and not up.unsafe


@pytest.mark.parametrize(("builder", "payload"), [
    ("build_intlist", 10**9), ("build_intlist", "abc"), ("build_intlist", ["a"]), ("build_doublelist", (1.0,)),
    ("build_boollist", [b"x"]),
])
def test_list_builders_refuse_other_arguments(builder, payload, tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(_jit_call(builder, payload))
    with pytest.raises(cv.CheckpointError) as err:
        cv.open_checkpoint(path)
    assert_clean_error(err.value, path)
