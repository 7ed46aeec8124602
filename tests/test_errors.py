"""Every bad input surfaces as a CheckpointError subclass that names the file, never as a raw
torch / zipfile / pickle traceback: missing paths, directories, empty, truncated and corrupted
files of every container, foreign bytes, files without weights, hand-made bad tensor records."""

from __future__ import annotations

import collections
import io
import pickle
import random
import struct
import zipfile

import pytest
import torch
from ckpt_files import FORMATS, assert_clean_error, rewrite_zip, state_of, write, write_torchscript
from torch._utils import _rebuild_tensor_v2

import ckptviz as cv


def open_error(path, **kw) -> cv.CheckpointError:
    with pytest.raises(cv.CheckpointError) as err:
        cv.open_checkpoint(path, **kw)
    assert_clean_error(err.value, path)
    return err.value


@pytest.fixture
def small_sd(small_cnn):
    return state_of(small_cnn)


# ---------------------------------------------------------------------------------------------
# paths that are not checkpoint files
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "model.pt"
    err = open_error(path)
    assert isinstance(err, cv.CheckpointNotFoundError)
    assert isinstance(err, FileNotFoundError)


def test_missing_path_as_str(tmp_path):
    path = str(tmp_path / "model.pt")
    assert isinstance(open_error(path), cv.CheckpointNotFoundError)


def test_directory(tmp_path):
    (tmp_path / "model.pt").mkdir()
    err = open_error(tmp_path / "model.pt")
    assert "directory" in str(err)


def test_empty_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    err = open_error(path)
    assert "empty" in str(err)


def test_random_bytes(tmp_path):
    data = random.Random(1234).randbytes(4096)
    # Precondition: these bytes do not start like any container by chance.
    assert data[:2] != b"PK" and data[0] != 0x80 and data[8:9] != b"{"
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert isinstance(open_error(path), cv.UnknownFormatError)


@pytest.mark.parametrize(
    "text",
    [
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n",
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 46830571\n",
        '{"error": "rate limited"}\n',
    ],
    ids=["html", "lfs-pointer", "json"],
)
def test_text_files(text, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_text(text)
    assert isinstance(open_error(path), cv.UnknownFormatError)


def test_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", "not a checkpoint")
    open_error(path)


# ---------------------------------------------------------------------------------------------
# truncated files of every container
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.5, 0.9, -1], ids=["half", "90pc", "last-byte-missing"])
def test_truncated_file(fmt, keep, small_sd, tmp_path):
    path = write(fmt, small_sd, tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    err = open_error(path)
    assert isinstance(err, cv.CorruptCheckpointError)


def test_truncated_torchscript(small_cnn, tmp_path):
    path = write_torchscript(small_cnn, torch.randn(1, 3, 8, 8), tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert isinstance(open_error(path), cv.CorruptCheckpointError)


@pytest.mark.parametrize("keep", [200, 60])
def test_legacy_cut_inside_its_pickles(keep, small_sd, tmp_path):
    path = write("torch-legacy", small_sd, tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:keep])
    assert isinstance(open_error(path), cv.CorruptCheckpointError)


@pytest.mark.parametrize("keep", [9, 30])
def test_safetensors_header_cut_off(keep, small_sd, tmp_path):
    path = write("safetensors", small_sd, tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:keep])
    err = open_error(path)
    assert isinstance(err, cv.CorruptCheckpointError)
    assert "header" in str(err)


def test_safetensors_header_is_not_json(small_sd, tmp_path):
    path = write("safetensors", small_sd, tmp_path / "model.safetensors")
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n // 2 : 8 + n // 2 + 4] = b"\xff\xfe\x00}"
    path.write_bytes(bytes(data))
    assert isinstance(open_error(path), cv.CorruptCheckpointError)


# ---------------------------------------------------------------------------------------------
# corrupted zip members
# ---------------------------------------------------------------------------------------------


def _member_span(path, suffix: str) -> tuple[int, int]:
    """(start, size) of the stored bytes of the zip member ending in ``suffix``."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_storage_entry_cut_short(small_sd, tmp_path):
    """The zip is intact but a tensor storage has fewer bytes than the pickle says."""
    src = write("torch-zip", small_sd, tmp_path / "model.pt")
    dst = rewrite_zip(src, tmp_path / "short.pt", lambda name, d: d[: len(d) // 2] if name.endswith("/data/0") else d)
    err = open_error(dst)
    assert isinstance(err, cv.CorruptCheckpointError)


def test_storage_entry_missing(small_sd, tmp_path):
    src = write("torch-zip", small_sd, tmp_path / "model.pt")
    dst = rewrite_zip(src, tmp_path / "gone.pt", lambda name, d: None if name.endswith("/data/1") else d)
    assert isinstance(open_error(dst), cv.CorruptCheckpointError)


def test_bytes_flipped_in_data_pkl(small_sd, tmp_path):
    """Damage in place, as a bad disk or download would: the zip CRC no longer matches."""
    path = write("torch-zip", small_sd, tmp_path / "model.pt")
    start, size = _member_span(path, "/data.pkl")
    data = bytearray(path.read_bytes())
    data[start + size // 2 : start + size // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert isinstance(open_error(path), cv.CorruptCheckpointError)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[: len(d) // 2] + b"\xff" * 16 + d[len(d) // 2 + 16 :],
        lambda d: d[: len(d) // 3] + b"\x00" * 8 + d[len(d) // 3 + 8 :],
        lambda d: d[:-1],
        lambda d: b"",
    ],
    ids=["cut-half", "ff-middle", "zeros-third", "no-stop", "empty"],
)
def test_data_pkl_garbled_with_valid_crc(damage, small_sd, tmp_path):
    """Damage that the zip layer cannot see: the pickle itself is broken."""
    src = write("torch-zip", small_sd, tmp_path / "model.pt")
    dst = rewrite_zip(src, tmp_path / "bad.pt", lambda name, d: damage(d) if name.endswith("/data.pkl") else d)
    open_error(dst)


def test_legacy_storage_bytes_cut(small_sd, tmp_path):
    path = write("torch-legacy", small_sd, tmp_path / "model.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert isinstance(open_error(path), cv.CorruptCheckpointError)


# ---------------------------------------------------------------------------------------------
# files without model weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("obj", [{"a": 1}, {"epoch": 3, "names": ["x", "y"]}, [1, 2, 3]], ids=["dict", "meta", "list"])
def test_pickle_without_tensors(fmt, obj, tmp_path):
    path = write(fmt, obj, tmp_path / "model.pt")
    assert isinstance(open_error(path), cv.NoTensorsError)


def test_optimizer_only_file_given_to_compare(small_cnn, tmp_path):
    opt = torch.optim.SGD(small_cnn.parameters(), lr=0.1, momentum=0.9)
    small_cnn(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    path = write("torch-zip", opt.state_dict(), tmp_path / "model.pt")

    ck = cv.open_checkpoint(path)  # opening it is fine: it holds optimizer state
    assert ck.sections == [] and ck.optimizer_sections == [""]

    with pytest.raises(cv.SectionError) as err:
        cv.compare(small_cnn, path)
    assert_clean_error(err.value, path)
    assert "optimizer" in str(err.value)
    with pytest.raises(cv.SectionError, match="optimizer"):
        ck.tensors()


# ---------------------------------------------------------------------------------------------
# hand-made tensor records that are damaged (only allowlisted globals, so nothing is "unsafe")
# ---------------------------------------------------------------------------------------------


class _Call:
    """Pickles as a call of ``func(*args)`` (what torch's own tensor records look like)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _StorageRecord:
    """Stands for storage "0" (6 float32) in the pickle, the way torch.save refers to storages."""


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRecord):
            return ("storage", torch.FloatStorage, "0", "cpu", 6)
        return None


def _record(storage, offset, size, stride):
    return _Call(_rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict()))


BAD_RECORDS = {
    "storage-is-an-int": _record(5, 0, (2,), (1,)),
    "storage-is-a-string": _record("0", 0, (2,), (1,)),
    "shape-of-strings": _record(_StorageRecord(), 0, ("a",), ("b",)),
    "shape-of-floats": _record(_StorageRecord(), 0, (2.5,), (1,)),
    "negative-offset": _record(_StorageRecord(), -5, (2,), (1,)),
    "negative-size": _record(_StorageRecord(), 0, (-1,), (1,)),
    "size-stride-length-differ": _record(_StorageRecord(), 0, (2, 3), (1,)),
    "past-the-storage": _record(_StorageRecord(), 4, (3,), (1,)),
}


def _zip_with_record(record, tmp_path):
    """A real torch.save archive (one 6-float storage) whose data.pkl is replaced by ours."""
    src = write("torch-zip", {"w": torch.arange(6.0)}, tmp_path / "base.pt")
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump({"w": record, "ok": _record(_StorageRecord(), 0, (6,), (1,))})
    return rewrite_zip(src, tmp_path / "model.pt", lambda n, d: buf.getvalue() if n.endswith("/data.pkl") else d)


def test_hand_made_archive_is_readable(tmp_path):
    """Control for the cases below: the same construction with a good record opens and reads."""
    path = _zip_with_record(_record(_StorageRecord(), 1, (2, 2), (2, 1)), tmp_path)
    ck = cv.open_checkpoint(path)
    assert ck.unsafe_globals == []
    assert torch.equal(ck.state_dict()["w"], torch.arange(6.0)[1:5].view(2, 2))
    assert torch.equal(ck.state_dict()["ok"], torch.arange(6.0))


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_tensor_record_only_raises_checkpoint_errors(case, tmp_path):
    """Whatever step notices the damage, the caller sees a CheckpointError naming the file."""
    path = _zip_with_record(BAD_RECORDS[case], tmp_path)
    try:
        ck = cv.open_checkpoint(path)
        ck.tensors()
        for section in ck.sections:
            ck.state_dict(section)
    except Exception as e:  # the point is what kind of exception escapes
        assert_clean_error(e, path)
    else:
        pytest.fail("a damaged tensor record was read without any error")


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_tensor_record_rejected_at_open(case, tmp_path):
    """The tensor records are checked when the file is opened, so that listing shows no nonsense
    (negative numel, fractional shapes) and reading a tensor can never fault later."""
    path = _zip_with_record(BAD_RECORDS[case], tmp_path)
    assert isinstance(open_error(path), cv.CorruptCheckpointError)


def test_plain_pickle_of_a_state_dict(small_sd, tmp_path):
    """pickle.dump(model.state_dict()) embeds each storage as torch.save bytes behind
    torch.storage._load_from_bytes: refused without trust, and never a raw error with it."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(small_sd, protocol=4))
    err = open_error(path)
    assert isinstance(err, cv.UnsafeCheckpointError)
    assert "torch.storage._load_from_bytes" in err.globals
    try:
        ck = cv.open_checkpoint(path, trust=True)
        got = ck.state_dict()
    except Exception as e:
        assert_clean_error(e, path)
    else:
        assert set(got) == set(small_sd)
        for k, v in small_sd.items():
            assert torch.equal(got[k], v), k
