"""ckptviz is at least as strict as the safetensors library on a file's structure: every malformed
header below is written by hand, the library's own reader (``safe_open``) rejects it, and ckptviz
raises a CheckpointError that names the file and says what is wrong. Files the library accepts that
differ from what it writes (tensors out of order, unknown fields, null metadata) open in both."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckptviz as cv

DATA = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes
A = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def write(path, header=None, data=DATA, raw: bytes | None = None, length: int | None = None):
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def library_rejects(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
            f.metadata()
    except Exception:  # noqa: BLE001 - the library raises its own SafetensorError or an OSError
        return True
    return False


def ckptviz_error(path) -> cv.CheckpointError:
    with pytest.raises(cv.CheckpointError) as info:
        ck = cv.open_checkpoint(path)
        ck.stats()
    assert str(path) in str(info.value)
    return info.value


half = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CASES = {
    "f32-relabelled-f16": ({"a": {**A, "dtype": "F16"}}, "16 bytes where shape [4] of F16 needs 8"),  # 16 vs 8
    "shape-does-not-fill": ({"a": {**A, "shape": [3]}}, "16 bytes where shape [3] of F32 needs 12"),
    "shape-too-big": ({"a": {**A, "shape": [5]}}, "needs 20"),
    "negative-offset": ({"a": {**A, "data_offsets": [-8, 8]}}, "negative offset"),
    "end-before-start": ({"a": {**A, "shape": [0], "data_offsets": [16, 0]}}, "end before its start"),
    "overlap": ({"a": A, "b": {**half, "data_offsets": [8, 16]}}, "overlaps another tensor"),
    "duplicate-range": ({"a": half, "b": half, "c": {**half, "data_offsets": [8, 16]}}, "overlaps"),
    "hole-at-start": ({"a": {**half, "data_offsets": [8, 16]}}, "leaves a hole"),
    "hole-between": ({"a": {**A, "shape": [1], "data_offsets": [0, 4]},
                      "b": {**half, "data_offsets": [8, 16]}}, "leaves a hole"),
    "bytes-after-last": ({"a": half}, "belong to none"),
    "past-end-of-file": ({"a": {**A, "shape": [8], "data_offsets": [0, 32]}}, "file ends 16 bytes before"),
    "huge-shape": ({"a": {**A, "shape": [2**40, 2**40]}}, "beyond 2**63"),
    "huge-numel-wraps-int64": ({"a": {**A, "dtype": "F64", "shape": [2**61], "data_offsets": [0, 0]}}, "a"),
    "huge-offsets": ({"a": {**A, "data_offsets": [2**70, 2**70 + 16]}}, "beyond 2**63"),
    "float-shape": ({"a": {**A, "shape": [4.0]}}, "malformed"),
    "bool-shape": ({"a": {**A, "shape": [True, 4]}}, "malformed"),
    "three-offsets": ({"a": {**A, "data_offsets": [0, 8, 16]}}, "malformed"),
    "missing-shape": ({"a": {"dtype": "F32", "data_offsets": [0, 16]}}, "malformed"),
    "scalar-shape-as-map": ({"a": {**A, "dtype": "I64", "shape": {}, "data_offsets": [0, 8]},
                             "b": {**half, "data_offsets": [8, 16]}}, "malformed"),
    "scalar-shape-as-string": ({"a": {**A, "dtype": "I64", "shape": "", "data_offsets": [0, 8]},
                                "b": {**half, "data_offsets": [8, 16]}}, "malformed"),
    "unknown-dtype": ({"a": {**A, "dtype": "X32"}}, "not a safetensors dtype"),
    "lowercase-dtype": ({"a": {**A, "dtype": "f32"}}, "not a safetensors dtype"),
    "metadata-int-value": ({"__metadata__": {"format": 1}, "a": A}, "'__metadata__' entry 'format' is a int"),
    "metadata-nested": ({"__metadata__": {"x": {"y": "z"}}, "a": A}, "is a dict, not a string"),
    "metadata-list": ({"__metadata__": ["pt"], "a": A}, "'__metadata__' is a list"),
    "metadata-string": ({"__metadata__": "pt", "a": A}, "'__metadata__' is a str"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_header(case, tmp_path):
    header, expected = CASES[case]
    path = write(tmp_path / "model.safetensors", header, DATA)
    assert library_rejects(path), "precondition: the safetensors library refuses this file"
    err = ckptviz_error(path)
    assert expected in str(err)


@pytest.mark.parametrize("raw, expected", [
    (b'{"a\xff": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "not valid UTF-8"),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}\x00\x00', "not valid JSON"),
    (b'[1, 2]', ""),
    (b'{"__metadata__": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nests 100002 levels deep"),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": ' + b"[" * 500 + b"]" * 500 + b"}}",
     "the limit is 128"),
], ids=["non-utf8", "nul-padding", "not-an-object", "deep-json", "deep-extra-field"])
def test_malformed_json(raw, expected, tmp_path):
    path = write(tmp_path / "model.safetensors", raw=raw)
    assert library_rejects(path)
    assert expected in str(ckptviz_error(path))


def test_header_longer_than_the_file(tmp_path):
    path = write(tmp_path / "model.safetensors", {"a": A}, length=10_000)
    assert library_rejects(path)
    assert "file ends after" in str(ckptviz_error(path))


def test_header_larger_than_the_library_allows(tmp_path):
    path = write(tmp_path / "model.safetensors", {"a": A}, length=100_000_001)
    assert library_rejects(path)
    ckptviz_error(path)  # not recognised as safetensors at all


def test_duplicate_key_is_refused(tmp_path):
    """The library silently keeps the last of two entries with one name; ckptviz refuses the
    ambiguity (stricter than the library, never looser)."""
    entry = json.dumps(A)
    path = write(tmp_path / "model.safetensors", raw=f'{{"a": {entry}, "a": {entry}}}'.encode())
    assert not library_rejects(path)
    assert "names 'a' twice" in str(ckptviz_error(path))


@pytest.mark.parametrize("header", [
    {"b": {**half, "data_offsets": [8, 16]}, "a": half},  # out of order
    {"a": {**A, "extra": {"nested": [1, 2]}}},  # unknown fields are ignored
    {"__metadata__": None, "a": A},
    {"__metadata__": {"format": "pt"}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": A},
], ids=["out-of-order", "extra-field", "null-metadata", "empty-tensor"])
def test_files_the_library_accepts_open(header, tmp_path):
    path = write(tmp_path / "model.safetensors", header)
    assert not library_rejects(path)
    ck = cv.open_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            assert torch.equal(ck.tensor(k), f.get_tensor(k))


def test_library_written_file_opens(tmp_path):
    sd = {"w": torch.randn(3, 5), "b": torch.zeros(5, dtype=torch.bfloat16), "e": torch.empty(0, 7)}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ck = cv.open_checkpoint(tmp_path / "model.safetensors")
    assert ck.metadata["format"] == "pt"
    for k, v in sd.items():
        assert torch.equal(ck.tensor(k), v)


# ---- hub sharded folders: each shard is held to the same rules -----------------------------------
def _sharded(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": {"a": torch.randn(4)},
              "model-00002-of-00002.safetensors": {"b": torch.randn(4)}}
    for name, sd in shards.items():
        save_file(sd, folder / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 32}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, folder / "model-00002-of-00002.safetensors"


def _relabel(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("damage, expected", [
    (lambda p: _relabel(p, b'"F32"', b'"F16"'), "needs 8"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8), "belong to none"),
    (lambda p: _relabel(p, b'"format":"pt"', b'"format":[11]'), "'__metadata__' entry 'format'"),
], ids=["relabelled", "padded", "metadata"])
def test_sharded_folder_shard_is_checked(damage, expected, tmp_path):
    folder, shard = _sharded(tmp_path)
    assert cv.open_checkpoint(folder).tensor("b").shape == (4,)
    damage(shard)
    assert library_rejects(shard)
    with pytest.raises(cv.CheckpointError) as info:
        cv.open_checkpoint(folder)
    assert str(shard) in str(info.value) and expected in str(info.value)
