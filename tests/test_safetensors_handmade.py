"""Malformed safetensors files, written by hand (8-byte little-endian header length, JSON header,
data bytes): each is rejected by the safetensors library itself and becomes a CorruptCheckpointError
naming the file and what is wrong, never a raw OverflowError, TypeError or RecursionError."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckptviz as cv


def write(path, header: dict | None = None, data: bytes = b"", raw: bytes | None = None):
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def f32(n: int, begin: int = 0) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


DEEP = 100_000
CASES = {  # name: (header or raw JSON bytes, data, words the error must contain)
    "huge_shape": ({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, 16, "beyond 2**63"),
    "huge_offset": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**70]}}, 16, "beyond 2**63"),
    "huge_shape_times_zero": ({"w": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}, 0,
                              "beyond 2**63"),
    "metadata_list": ({"__metadata__": ["a"], "w": f32(4)}, 16, "'__metadata__' is a list"),
    "metadata_str": ({"__metadata__": "a", "w": f32(4)}, 16, "'__metadata__' is a str"),
    "metadata_int_value": ({"__metadata__": {"a": 1}, "w": f32(4)}, 16, "entry 'a' is a int"),
    "metadata_dict_value": ({"__metadata__": {"a": {"b": "c"}}, "w": f32(4)}, 16, "entry 'a' is a dict"),
    "deep_list": (b"[" * DEEP + b"]" * DEEP, 0, "nests"),
    "deep_in_entry": (b'{"w":' + b"[" * DEEP + b"]" * DEEP + b"}", 0, "nests"),
    "deep_in_metadata": (b'{"__metadata__":{"a":' + b"[" * DEEP + b"]" * DEEP + b"}}", 0, "nests"),
    # structure (point 3): as strict as the library
    "f32_relabelled_f16": ({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, 16, "needs 8"),
    "negative_offset": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, 16, "malformed"),
    "end_before_start": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, 16, "end before its start"),
    "overlap": ({"a": f32(4), "b": f32(4, 8)}, 24, "overlaps"),
    "hole": ({"a": f32(2), "b": f32(2, 16)}, 24, "hole"),
    "bytes_after_last": ({"a": f32(4)}, 24, "belong to none"),
    "past_end": ({"a": f32(8)}, 16, "truncated"),
    "negative_dim": ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "malformed"),
    "float_dim": ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, 16, "malformed"),
    "str_dim_times_big": ({"a": {"dtype": "F32", "shape": [10**9, "x"], "data_offsets": [0, 16]}}, 16, "malformed"),
    "unknown_dtype": ({"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, 16, "not a safetensors dtype"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_header_is_corrupt_checkpoint_error(tmp_path, name):
    header, n, words = CASES[name]
    path = write(tmp_path / f"{name}.safetensors", None if isinstance(header, bytes) else header, bytes(n),
                 raw=header if isinstance(header, bytes) else None)
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type varies by version
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    with pytest.raises(cv.CorruptCheckpointError) as e:
        ck = cv.open_checkpoint(path)
        ck.tensors()
        ck.state_dict()
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_a_valid_hand_written_file_is_read_the_same_as_the_library(tmp_path):
    """The writer above is right: a well-formed header opens in both, with the same values."""
    values = torch.arange(6, dtype=torch.float32)
    path = write(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, "a": f32(2), "b": f32(4, 8)},
                 values.numpy().tobytes())
    with safe_open(str(path), "pt") as f:
        lib = {k: f.get_tensor(k) for k in f.keys()}
    ck = cv.open_checkpoint(path)
    assert lib.keys() == ck.state_dict().keys()
    for k, t in lib.items():
        assert torch.equal(ck.tensor(k), t)
    save_file({"x": torch.ones(3)}, str(tmp_path / "lib.safetensors"))
    assert torch.equal(cv.open_checkpoint(tmp_path / "lib.safetensors").tensor("x"), torch.ones(3))
