"""Opening a checkpoint never runs code from it and never changes it.

Each payload here is first shown to be live (plain ``pickle`` really executes it and leaves a
marker file); then ckptviz opens files carrying it, with and without ``trust=True``, and the
marker must never appear."""

from __future__ import annotations

import builtins
import gc
import importlib
import os
import pickle
import shlex
import sys

import pytest
import torch
from ckpt_files import (
    TORCH_FORMATS,
    assert_clean_error,
    assert_same_tensors,
    rewrite_zip,
    sha256,
    state_of,
    write,
    write_torchscript,
)

import ckptviz as cv


class Payload:
    """Unpickles as ``func(*args)``: the classic malicious-pickle construction."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _qualified(func) -> str:
    return f"{func.__module__}.{func.__qualname__}"


# kind -> (build the payload for a marker path, the global the pickle names)
PAYLOADS = {
    "os.system": (lambda m: Payload(os.system, f"touch {shlex.quote(str(m))}"), _qualified(os.system)),
    "exec": (lambda m: Payload(builtins.exec, f"open({str(m)!r}, 'w').close()"), "builtins.exec"),
    "eval": (lambda m: Payload(builtins.eval, f"__import__('pathlib').Path({str(m)!r}).touch()"), "builtins.eval"),
    "open": (lambda m: Payload(builtins.open, str(m), "w"), _qualified(builtins.open)),
}


@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_payloads_are_live(kind, tmp_path):
    """Control: the payloads below really do run under an ordinary unpickler."""
    marker = tmp_path / "control"
    build, _ = PAYLOADS[kind]
    result = pickle.loads(pickle.dumps(build(marker), protocol=2))
    if hasattr(result, "close"):
        result.close()
    assert marker.exists()


def _write_with_payload(container: str, payload, tmp_path):
    """A file carrying ``payload`` beside real tensors (torch containers) or plain data (pickle)."""
    weights = {"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.tensor([0.5, -1.0, 2.0])}
    if container in TORCH_FORMATS:
        return write(container, {**weights, "extra": payload}, tmp_path / "model.pt"), weights
    if container == "nested-lightning":
        ckpt = {"state_dict": weights, "epoch": 1, "hyper_parameters": {"callbacks": [{"cb": payload}]}}
        return write("torch-zip", ckpt, tmp_path / "last.ckpt"), weights
    protocol = int(container.removeprefix("pickle-protocol-"))
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"note": "weights elsewhere", "extra": payload}, protocol=protocol))
    return path, None


CONTAINERS = [*TORCH_FORMATS, "nested-lightning", "pickle-protocol-2", "pickle-protocol-4", "pickle-protocol-5"]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_malicious_global_is_refused_and_never_called(kind, container, tmp_path):
    marker = tmp_path / "pwned"
    build, name = PAYLOADS[kind]
    path, weights = _write_with_payload(container, build(marker), tmp_path)
    assert not marker.exists()
    digest = sha256(path)

    with pytest.raises(cv.UnsafeCheckpointError) as err:
        cv.open_checkpoint(path)
    assert_clean_error(err.value, path)
    assert name in err.value.globals
    assert name in str(err.value)
    assert not marker.exists()

    # trust=True reads tensors and plain data; it still calls nothing the file names.
    if weights is None:
        with pytest.raises(cv.NoTensorsError):
            cv.open_checkpoint(path, trust=True)
    else:
        ck = cv.open_checkpoint(path, trust=True)
        assert name in ck.unsafe_globals
        section = ck.sections[0]
        assert_same_tensors(ck.state_dict(section), weights)
        ck.tensors(section)
        repr(ck)
        ck._repr_html_()
        ck.materialize(ck.metadata)
    assert not marker.exists()
    assert sha256(path) == digest


def test_modules_named_by_the_file_are_never_imported(tmp_path, monkeypatch):
    """A module whose import has a side effect (here: creating a file) is never imported."""
    name = "ckptviz_test_tripwire"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\nclass Config:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    assert marker.exists()  # control: importing it trips the wire
    weights = {"weight": torch.randn(4, 4)}
    path = write("torch-zip", {**weights, "config": module.Config()}, tmp_path / "model.pt")
    marker.unlink()
    monkeypatch.delitem(sys.modules, name)

    with pytest.raises(cv.UnsafeCheckpointError) as err:
        cv.open_checkpoint(path)
    assert f"{name}.Config" in err.value.globals
    ck = cv.open_checkpoint(path, trust=True)
    assert_same_tensors(ck.state_dict(), weights)
    ck.metadata, repr(ck), ck._repr_html_()
    assert name not in sys.modules
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# hand-made opcode sequences: allowlisted names used to reach a call they must not make
# ---------------------------------------------------------------------------------------------

P = pickle


def _global(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    data = text.encode()
    return P.BINUNICODE + len(data).to_bytes(4, "little") + data


def _opcodes(marker) -> dict[str, bytes]:
    cmd = _str(f"touch {shlex.quote(str(marker))}")
    head = P.PROTO + b"\x02"
    return {
        # protocol-0 class calls: INST and OBJ call os.system without any REDUCE
        "inst-os-system": head + P.MARK + cmd + P.INST + b"os\nsystem\n" + P.STOP,
        "obj-os-system": head + P.MARK + _global("os", "system") + cmd + P.OBJ + P.STOP,
        # allowlisted builtins give an instance; REDUCE then tries to call that instance
        "call-a-bytearray": head + _global("builtins", "bytearray") + P.EMPTY_TUPLE + P.REDUCE
        + cmd + P.TUPLE1 + P.REDUCE + P.STOP,
        "call-encoded-bytes": head + _global("_codecs", "encode") + _str("abc") + _str("latin1") + P.TUPLE2
        + P.REDUCE + cmd + P.TUPLE1 + P.REDUCE + P.STOP,
        "call-an-ordereddict": head + _global("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE
        + cmd + P.TUPLE1 + P.REDUCE + P.STOP,
        # REDUCE on plain values
        "call-an-int": head + P.BININT1 + b"\x05" + P.EMPTY_TUPLE + P.REDUCE + P.STOP,
        "call-a-string": head + _str("os.system") + cmd + P.TUPLE1 + P.REDUCE + P.STOP,
        # torch's own allowlisted rebuild function, handed a non-callable "function"
        "rebuild-from-type-non-callable": head + _global("torch._tensor", "_rebuild_from_type_v2") + P.MARK
        + _str("os.system") + _global("torch", "Tensor") + cmd + P.TUPLE1 + P.EMPTY_DICT + P.TUPLE
        + P.REDUCE + P.STOP,
        # BUILD on an allowlisted builtin's instance, trying to swap in a dangerous __class__
        "build-on-a-set": head + _global("builtins", "set") + P.EMPTY_TUPLE + P.REDUCE + P.EMPTY_DICT
        + _str("__class__") + _global("os", "system") + P.SETITEM + P.BUILD + P.STOP,
        # copyreg extension codes
        "extension-code": head + P.EXT1 + b"\x01" + P.STOP,
    }


@pytest.mark.parametrize("case", ["inst-os-system", "obj-os-system"])
def test_opcode_payloads_are_live(case, tmp_path):
    marker = tmp_path / "control"
    pickle.loads(_opcodes(marker)[case])
    assert marker.exists()


@pytest.mark.parametrize("container", ["pickle", "torch-zip"])
@pytest.mark.parametrize("case", list(_opcodes("x")))
@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted"])
def test_opcode_payloads_fail_cleanly_and_run_nothing(case, container, trust, tmp_path):
    marker = tmp_path / "pwned"
    data = _opcodes(marker)[case]
    if container == "pickle":
        path = tmp_path / "model.pkl"
        path.write_bytes(data)
    else:  # a real torch.save archive whose data.pkl is the payload
        src = write("torch-zip", {"w": torch.ones(3)}, tmp_path / "base.pt")
        path = rewrite_zip(src, tmp_path / "model.pt", lambda n, d: data if n.endswith("/data.pkl") else d)
    with pytest.raises(cv.CheckpointError) as err:
        cv.open_checkpoint(path, trust=trust)
    assert_clean_error(err.value, path)
    assert not marker.exists()


def _long(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return P.LONG1 + bytes([len(data)]) + data


# Allowlisted callables (the same ones torch's weights_only unpickler accepts) fed hostile arguments.
HOSTILE_ARGUMENTS = {
    "overflowing-FloatTensor": _global("torch", "FloatTensor") + _long(2**62) + P.TUPLE1 + P.REDUCE,
    "negative-Tensor": _global("torch", "Tensor") + _long(-5) + P.TUPLE1 + P.REDUCE,
    "string-Tensor": _global("torch", "Tensor") + _str("abc") + P.TUPLE1 + P.REDUCE,
    "overflowing-bytearray": _global("builtins", "bytearray") + _long(2**70) + P.TUPLE1 + P.REDUCE,
    "unknown-codec": _global("_codecs", "encode") + _str("a") + _str("no-such-codec") + P.TUPLE2 + P.REDUCE,
    "malformed-complex": _global("builtins", "complex") + _str("zz") + P.TUPLE1 + P.REDUCE,
    "unknown-layout": _global("torch.serialization", "_get_layout") + _str("nope") + P.TUPLE1 + P.REDUCE,
}


@pytest.mark.parametrize("container", ["pickle", "torch-zip"])
@pytest.mark.parametrize("case", list(HOSTILE_ARGUMENTS))
def test_allowlisted_callables_with_hostile_arguments(case, container, tmp_path):
    """Whatever an allowlisted callable raises on the file's arguments reaches the caller as a
    CheckpointError naming the file."""
    data = P.PROTO + b"\x02" + P.EMPTY_DICT + _str("w") + HOSTILE_ARGUMENTS[case] + P.SETITEM + P.STOP
    if container == "pickle":
        path = tmp_path / "model.pkl"
        path.write_bytes(data)
    else:
        src = write("torch-zip", {"w": torch.ones(3)}, tmp_path / "base.pt")
        path = rewrite_zip(src, tmp_path / "model.pt", lambda n, d: data if n.endswith("/data.pkl") else d)
    with pytest.raises(cv.CheckpointError) as err:
        cv.open_checkpoint(path)
    assert_clean_error(err.value, path)


# ---------------------------------------------------------------------------------------------
# the file is never written
# ---------------------------------------------------------------------------------------------


def _scribble(tensors: dict[str, torch.Tensor]) -> None:
    for v in tensors.values():
        if v.dtype == torch.bool:
            v.logical_not_()
        else:
            v.add_(1)


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors", "torchscript"])
def test_writing_to_tensors_never_changes_the_file(fmt, small_cnn, tmp_path):
    original = state_of(small_cnn)
    if fmt == "torchscript":
        path = write_torchscript(small_cnn, torch.randn(1, 3, 8, 8), tmp_path / "model.pt")
    else:
        path = write(fmt, original, tmp_path / "model.pt")
    digest, mtime = sha256(path), os.stat(path).st_mtime_ns

    ck = cv.open_checkpoint(path)
    ck.tensors()
    sd = ck.state_dict()
    assert_same_tensors(sd, original)
    _scribble(sd)
    key = next(iter(original))
    ck.tensor(key).mul_(3)
    del sd, ck
    gc.collect()

    assert sha256(path) == digest
    assert os.stat(path).st_mtime_ns == mtime
    assert_same_tensors(cv.open_checkpoint(path).state_dict(), original)


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_trusted_pickled_module_file_is_not_changed(fmt, small_cnn, tmp_path):
    path = write(fmt, small_cnn, tmp_path / "model.pt")
    digest = sha256(path)
    with pytest.raises(cv.CheckpointError):
        cv.open_checkpoint(path)
    try:
        sd = cv.open_checkpoint(path, trust=True).state_dict()
    except cv.CheckpointError:
        sd = {}  # a reader bug is reported by test_open; here only the file matters
    _scribble(sd)
    del sd
    gc.collect()
    assert sha256(path) == digest
