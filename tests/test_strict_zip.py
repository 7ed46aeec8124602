"""ckptviz's torch readers are at least as strict as ``torch.load(weights_only=True)`` (and ``torch.jit.load``
for TorchScript) on file structure (issue 8, item 10): every file here is written by torch.save or
torch.jit.save and then edited (a zip rewritten entry by entry, a header field patched, a pickle replaced);
each test checks that torch refuses the edited file, that ckptviz refuses it with a CheckpointError naming
the file, and that the untouched file opens in both. Edits torch accepts must open in ckptviz too."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptviz as cv
from tests.ckpt_files import assert_clean_error
from tests.fuzz.mutators import ops_of

# ---- helpers -------------------------------------------------------------------------------------


def _torch_refuses(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any refusal of torch's
            return f"{type(e).__name__}: {e}"
    raise AssertionError(f"torch.load read {path}; the edit does not make a file torch refuses")


def _both_read(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=True, map_location="cpu")
    ck = cv.open_checkpoint(path)
    for s in ck.sections:
        ck.state_dict(s, copy=True)


def _both_refuse(path: Path, match: str | None = None, jit: bool = False) -> cv.CheckpointError:
    if jit:
        with pytest.raises(Exception):  # noqa: B017,PT011 - torch.jit.load's errors are RuntimeErrors of every kind
            torch.jit.load(path, map_location="cpu")
    else:
        _torch_refuses(path)
    with pytest.raises(cv.CheckpointError, match=match) as err:
        ck = cv.open_checkpoint(path)
        for s in ck.sections:
            ck.state_dict(s, copy=True)
    assert_clean_error(err.value, path)
    return err.value


def _entries(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _rezip(entries: list[tuple[str, bytes]], dst: Path) -> Path:
    """A zip of ``entries`` in this order (stored, CRCs right, mod time 00:00 as miniz reads it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    dst.write_bytes(buf.getvalue())
    return dst


def _replace(entries, name_end: str, data: bytes | None):
    out = [(n, data if n.endswith(name_end) else d) for n, d in entries]
    return [(n, d) for n, d in out if d is not None]


def _central_entries(raw: bytes) -> list[int]:
    """Offsets of every central directory entry (the archive has no zip64 records)."""
    eocd = raw.rfind(b"PK\x05\x06")
    count, _, at = struct.unpack_from("<10xHLL", raw, eocd)
    starts = []
    for _ in range(count):
        starts.append(at)
        n, m, k = struct.unpack_from("<HHH", raw, at + 28)
        at += 46 + n + m + k
    return starts


def _patch_central(src: Path, dst: Path, entry_name: str, offset: int, fmt: str, value: int) -> Path:
    raw = bytearray(src.read_bytes())
    for at in _central_entries(bytes(raw)):
        n = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46 : at + 46 + n].decode().endswith(entry_name):
            struct.pack_into(fmt, raw, at + offset, value)
            dst.write_bytes(bytes(raw))
            return dst
    raise AssertionError(f"no entry {entry_name}")


WEIGHTS = {"w": torch.arange(12.0).reshape(3, 4), "i": torch.arange(6), "b": torch.ones(2, dtype=torch.bool)}


@pytest.fixture
def saved(tmp_path) -> Path:
    """A real torch.save file (top folder "saved"); it opens in both readers."""
    path = tmp_path / "saved.pt"
    torch.save(WEIGHTS, path)
    _both_read(path)
    return path


class _Storage:
    def __init__(self, cls, key: str, numel: int):
        self.cls, self.key, self.numel = cls, key, numel


class _Tensor:
    """Pickles as torch.save's tensor record, with whatever arguments a test gives."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", obj.cls, obj.key, "cpu", obj.numel) if isinstance(obj, _Storage) else None


def _data_pkl(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


W = _Storage(torch.FloatStorage, "0", 12)  # the storages torch.save wrote for WEIGHTS["w"] and WEIGHTS["i"]
INTS = _Storage(torch.LongStorage, "1", 6)


def _with_records(saved: Path, dst: Path, records: dict) -> Path:
    return _rezip(_replace(_entries(saved), "/data.pkl", _data_pkl(records)), dst)


# ---- the version record --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"0", b"11", b"99", b"abc", b"", b"-1", b"18446744073709551616"])
def test_version_record_torch_does_not_support(saved, tmp_path, value):
    path = _rezip(_replace(_entries(saved), "/version", value), tmp_path / "v.pt")
    _both_refuse(path, "format version")


def test_missing_version_record(saved, tmp_path):
    path = _rezip(_replace(_entries(saved), "/version", None), tmp_path / "v.pt")
    _both_refuse(path, "no saved/version record")


@pytest.mark.parametrize("value", [b"3", b" 3", b"3abc", b"+10", b"00001", b"3\n"])
def test_version_records_torch_reads_still_open(saved, tmp_path, value):
    _both_read(_rezip(_replace(_entries(saved), "/version", value), tmp_path / "v.pt"))


def test_data_version_takes_precedence(saved, tmp_path):
    """Newer torch writes .data/version; torch reads it first, whatever ``version`` says."""
    entries = _entries(saved)
    _both_read(_rezip(_replace(entries, "/version", b"99") + [("saved/.data/version", b"3")], tmp_path / "a.pt"))
    _both_refuse(_rezip(entries + [("saved/.data/version", b"99")], tmp_path / "b.pt"), "format version")


# ---- one top folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["other/x", "x", "other/saved/byteorder"])
def test_entry_outside_the_top_folder(saved, tmp_path, extra):
    path = _rezip(_entries(saved) + [(extra, b"x")], tmp_path / "t.pt")
    _both_refuse(path, "outside the archive's top folder")


def test_first_entry_decides_the_top_folder(saved, tmp_path):
    path = _rezip([("other/x", b"x")] + _entries(saved), tmp_path / "t.pt")
    _both_refuse(path)


@pytest.mark.parametrize("root", ["archive", "model", "a b"])
def test_any_top_folder_name_opens(saved, tmp_path, root):
    entries = [(root + n[len("saved"):], d) for n, d in _entries(saved)]
    _both_read(_rezip(entries + [(f"{root}/extra/notes.txt", b"kept")], tmp_path / "t.pt"))


def test_entry_name_not_utf8(saved, tmp_path):
    path = _rezip(_entries(saved) + [("saved/x~", b"x")], tmp_path / "t.pt")
    path.write_bytes(path.read_bytes().replace(b"saved/x~", b"saved/x\xff"))
    _both_refuse(path, "not UTF-8")


# ---- storage records -----------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["longer", "shorter", "empty"])
def test_storage_record_size_differs_from_its_declaration(saved, tmp_path, edit):
    entries = _entries(saved)
    data = dict(entries)["saved/data/0"]
    new = {"longer": data + bytes(4), "shorter": data[:-4], "empty": b""}[edit]
    path = _rezip(_replace(entries, "/data/0", new), tmp_path / "s.pt")
    _both_refuse(path)


def test_storage_class_relabel_that_changes_the_element_size(saved, tmp_path):
    path = _with_records(saved, tmp_path / "s.pt", {"w": _Tensor(_Storage(torch.DoubleStorage, "0", 12), 0, (3, 4),
                                                                      (4, 1), False, OrderedDict())})
    _both_refuse(path, "declares 12 elements of float64")


def test_storage_numel_near_int64(saved, tmp_path):
    """A storage declaring 2**62 elements (the fuzzer once got a raw TypeError from load_partial here)."""
    huge = _Storage(torch.FloatStorage, "0", 2**62)
    path = _with_records(saved, tmp_path / "s.pt", {"w": _Tensor(huge, 0, (3, 4), (4, 1), False, OrderedDict())})
    _both_refuse(path)
    model = nn.Linear(4, 3)
    with pytest.raises(cv.CheckpointError):
        cv.load_partial(model, cv.compare(model, cv.open_checkpoint(path)))


# ---- tensor records ------------------------------------------------------------------------------


@pytest.mark.parametrize("offset,size,stride", [(0, (4, 4), (4, 1)), (1, (3, 4), (4, 1)), (12, (), ()),
                                                (0, (2, 2), (100, 1))])
def test_view_needs_more_elements_than_its_storage(saved, tmp_path, offset, size, stride):
    path = _with_records(saved, tmp_path / "v.pt", {"w": _Tensor(W, offset, size, stride, False, OrderedDict())})
    _both_refuse(path, "claims more bytes than its storage holds")


@pytest.mark.parametrize("offset,size,stride", [(100, (0, 4), (4, 1)), (11, (), ()), (0, (100, 100), (0, 0)),
                                                (0, (3, 4), (4, 1))])
def test_views_torch_reads_still_open(saved, tmp_path, offset, size, stride):
    _both_read(_with_records(saved, tmp_path / "v.pt", {"w": _Tensor(W, offset, size, stride, False, OrderedDict())}))


@pytest.mark.parametrize("flag", [1, 0, None, "yes", 1.0])
def test_requires_grad_not_a_bool(saved, tmp_path, flag):
    path = _with_records(saved, tmp_path / "g.pt", {"w": _Tensor(W, 0, (3, 4), (4, 1), flag, OrderedDict())})
    _both_refuse(path, "not a bool")


def test_requires_grad_on_an_integer_tensor(saved, tmp_path):
    path = _with_records(saved, tmp_path / "g.pt", {"i": _Tensor(INTS, 0, (6,), (1,), True, OrderedDict())})
    _both_refuse(path, "requires grad")


def test_requires_grad_on_float_and_parameters_still_open(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"w": torch.ones(2, requires_grad=True), "p": nn.Parameter(torch.ones(3)),
                "frozen": nn.Parameter(torch.arange(3), requires_grad=False)}, path)
    _both_read(path)
    assert cv.open_checkpoint(path).state_dict()["w"].dtype == torch.float32


# ---- other records torch.load reads --------------------------------------------------------------


def test_storage_alignment_not_a_number(saved, tmp_path):
    _both_refuse(_rezip(_replace(_entries(saved), "/.storage_alignment", b"6\x14"), tmp_path / "a.pt"),
                 "not a number")
    _both_read(_rezip(_replace(_entries(saved), "/.storage_alignment", b" 64 "), tmp_path / "b.pt"))


@pytest.mark.parametrize("value", [b"\xff" * 40, b"abc\x00\xff"])
def test_serialization_id_not_utf8(saved, tmp_path, value):
    path = _rezip(_replace(_entries(saved), "/.data/serialization_id", value), tmp_path / "s.pt")
    _both_refuse(path, "serialization_id")


def test_serialization_id_with_a_nul_in_utf8_text_opens(saved, tmp_path):
    _both_read(_rezip(_replace(_entries(saved), "/.data/serialization_id", b"abc\x00def"), tmp_path / "s.pt"))


@pytest.mark.parametrize("metadata", [bytearray, (1,), "x"])
def test_tensor_metadata_that_is_no_dict(saved, tmp_path, metadata):
    """torch.load sets a record's metadata only from a dict (an assert otherwise); empty ones are skipped."""
    path = _with_records(saved, tmp_path / "m.pt", {"w": _Tensor(W, 0, (3, 4), (4, 1), False, OrderedDict(), metadata)})
    _both_refuse(path, "metadata that is no dict")
    _both_read(_with_records(saved, tmp_path / "e.pt", {"w": _Tensor(W, 0, (3, 4), (4, 1), False, OrderedDict(), ())}))


class _Param:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_parameter, self.args)


@pytest.mark.parametrize("args", [(W, 0, (3, 4), (4, 1)), (W, 0, (3, 4), (4, 1), False),
                                  (W, 0, (3, 4), (4, 1), False, OrderedDict(), {}, 1)])
def test_tensor_record_with_a_field_count_torch_does_not_take(saved, tmp_path, args):
    """torch's _rebuild_tensor_v2 takes six fields and optional metadata: no defaults for the others."""
    _both_refuse(_with_records(saved, tmp_path / "f.pt", {"w": _Tensor(*args)}), "has \\d fields")


def test_parameter_record_with_a_state_it_does_not_take(saved, tmp_path):
    w = _Tensor(W, 0, (3, 4), (4, 1), False, OrderedDict())
    _both_refuse(_with_records(saved, tmp_path / "p.pt", {"w": _Param(w, True, OrderedDict(), {})}))
    _both_read(_with_records(saved, tmp_path / "ok.pt", {"w": _Param(w, True, OrderedDict())}))


def test_optional_records_may_be_missing(saved, tmp_path):
    entries = [(n, d) for n, d in _entries(saved)
               if not n.endswith(("/byteorder", "/.format_version", "/.storage_alignment", "/serialization_id"))]
    _both_read(_rezip(entries, tmp_path / "m.pt"))


# ---- the zip structure, as torch's zip reader (miniz) checks it ----------------------------------


def test_entry_on_another_disk(saved, tmp_path):
    path = _patch_central(_rezip(_entries(saved), tmp_path / "r.pt"), tmp_path / "d.pt", "/byteorder", 34, "<H", 7)
    _both_refuse(path, "multi-disk")


def test_masked_central_directory(saved, tmp_path):
    path = _patch_central(_rezip(_entries(saved), tmp_path / "r.pt"), tmp_path / "d.pt", "/byteorder", 8, "<H",
                          0x2000)
    _both_refuse(path, "masked")


def test_stored_entry_whose_sizes_disagree(saved, tmp_path):
    """A stored entry ckptviz never reads (.format_version) whose uncompressed size is not its stored size."""
    path = _patch_central(_rezip(_entries(saved), tmp_path / "r.pt"), tmp_path / "d.pt", "/.format_version", 24,
                          "<L", 2)
    _both_refuse(path, "sizes disagree")


def test_encrypted_or_unknown_method_on_a_record_torch_reads(saved, tmp_path):
    rezipped = _rezip(_entries(saved), tmp_path / "r.pt")
    _both_refuse(_patch_central(rezipped, tmp_path / "e.pt", "/.format_version", 8, "<H", 1), "encrypted")
    _both_refuse(_patch_central(rezipped, tmp_path / "m.pt", "/.data/serialization_id", 10, "<H", 12), "method 12")


def test_entry_marked_as_a_directory(saved, tmp_path):
    """miniz takes an entry with the DOS directory attribute for a directory and extracts nothing, so torch.load
    returns uninitialised memory as that record (a storage's "weights", .storage_alignment): ckptviz refuses."""
    for name in ("/data/0", "/.storage_alignment"):
        path = _patch_central(saved, tmp_path / "d.pt", name, 38, "<L", 0x10)
        with pytest.raises(cv.CheckpointError, match=f"{name[1:]} is marked as a directory") as err:
            cv.open_checkpoint(path).state_dict(copy=True)
        assert_clean_error(err.value, path)


def test_entry_pointing_at_another_entrys_local_header(saved, tmp_path):
    """Storage 0 pointed at storage 1's local header (same size): torch.load reads the other tensor's bytes as
    its values; zipfile and ckptviz refuse the disagreeing names."""
    with zipfile.ZipFile(saved) as z:
        other = z.getinfo("saved/data/1").header_offset
    path = _patch_central(saved, tmp_path / "o.pt", "/data/0", 42, "<L", other)
    got = torch.load(path, weights_only=True)["w"]
    assert torch.equal(got.view(torch.int64).reshape(-1), WEIGHTS["i"])  # the wrong value torch accepts
    with pytest.raises(cv.CheckpointError, match="saved/data/0 points at a local header of another name") as err:
        cv.open_checkpoint(path)
    assert_clean_error(err.value, path)


def test_rewritten_archive_opens(saved, tmp_path):
    """Python's zipfile rewriting a torch file (no alignment padding, another writer) is no false alarm."""
    _both_read(_rezip(_entries(saved), tmp_path / "r.pt"))


# ---- files real torch writes still open ----------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 3},
                                    {"_use_new_zipfile_serialization": False, "pickle_protocol": 3},
                                    {"_disable_byteorder_record": True}])
def test_real_torch_save_files_open(tmp_path, kwargs):
    path = tmp_path / "last.ckpt"
    torch.save({"model": WEIGHTS, "step": 3}, path, **kwargs)
    _both_read(path)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols_open_with_their_values(tmp_path, legacy, protocol):
    """torch.save(pickle_protocol=4 or 5) files, which torch.load reads with weights_only=False: not refused
    (the legacy container was once taken for a plain pickle)."""
    path = tmp_path / "p.pt"
    torch.save(WEIGHTS, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    want = torch.load(path, weights_only=False)  # our own file
    ck = cv.open_checkpoint(path)
    assert ck.format == ("torch-legacy" if legacy else "torch-zip")
    got = ck.state_dict(copy=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


class _Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.MaxPool2d(2)
        self.big: int = 2**40

    def forward(self, x):
        return self.pool(self.conv(x)) * float(self.big > 0)


@pytest.fixture
def script_file(tmp_path) -> Path:
    path = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_Scripted()), path)
    torch.jit.load(path)
    assert "conv.weight" in cv.open_checkpoint(path).state_dict()
    return path


def test_traced_and_scripted_modules_open(script_file, tmp_path):
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(nn.Linear(3, 2), torch.randn(1, 3)), path)
    assert set(cv.open_checkpoint(path).state_dict()) == {"weight", "bias"}


def test_torchscript_long1_not_8_bytes(script_file, tmp_path):
    """TorchScript's unpickler reads only 8-byte LONG1; Python's pickler writes the shortest."""
    long8 = b"\x8a\x08" + (2**40).to_bytes(8, "little")
    entries = _entries(script_file)
    pkl = dict(entries)["script/data.pkl"]
    assert long8 in pkl
    path = _rezip(_replace(entries, "/data.pkl", pkl.replace(long8, b"\x8a\x06" + (2**40).to_bytes(6, "little"))),
                  tmp_path / "l.pt")
    _both_refuse(path, "LONG1", jit=True)


def test_torchscript_constants_without_proto(script_file, tmp_path):
    entries = _entries(script_file)
    constants = dict(entries)["script/constants.pkl"]
    assert constants[:1] == b"\x80"
    path = _rezip(_replace(entries, "/constants.pkl", constants[2:]), tmp_path / "c.pt")
    _both_refuse(path, "PROTO", jit=True)


def test_torchscript_leftover_stack(script_file, tmp_path):
    entries = _entries(script_file)
    pkl = dict(entries)["script/data.pkl"]
    path = _rezip(_replace(entries, "/data.pkl", pkl[:2] + b"N" + pkl[2:]), tmp_path / "n.pt")
    _both_refuse(path, "stack", jit=True)


def test_torchscript_tensor_metadata_from_an_ordered_dict(script_file, tmp_path):
    """A seventh field after the hooks' OrderedDict(): TorchScript's unpickler makes OrderedDict() None, and
    asserts that metadata is a dict."""
    entries = _entries(script_file)
    pkl = dict(entries)["script/data.pkl"]
    hooks = b"\x88ccollections\nOrderedDict\n"
    assert hooks in pkl
    path = _rezip(_replace(entries, "/data.pkl", pkl.replace(hooks, b"\x88" + hooks, 1)), tmp_path / "m.pt")
    _both_refuse(path, "metadata that is no dict", jit=True)


# ---- legacy (non-zip) torch.save files -----------------------------------------------------------


@pytest.fixture
def legacy(tmp_path) -> tuple[Path, bytes, list[tuple[int, int]]]:
    """A real legacy torch.save file, its bytes and the (start, end) of each of its five pickles."""
    path = tmp_path / "legacy.pt"
    torch.save(WEIGHTS, path, _use_new_zipfile_serialization=False)
    _both_read(path)
    data, bounds, pos = path.read_bytes(), [], 0
    for _ in range(5):
        end = pos + ops_of(data[pos:])[-1][1]
        bounds.append((pos, end))
        pos = end
    return path, data, bounds


def _legacy_with(legacy, k: int, new: bytes, dst: Path) -> Path:
    _, data, bounds = legacy
    s, e = bounds[k]
    dst.write_bytes(data[:s] + new + data[e:])
    return dst


@pytest.mark.parametrize("version", [1000, 1, 255, 2**31 - 1])
def test_legacy_protocol_version(legacy, tmp_path, version):
    path = _legacy_with(legacy, 1, pickle.dumps(version, protocol=2), tmp_path / "p.pt")
    _both_refuse(path, "protocol version")


def test_legacy_storage_key_the_pickle_does_not_have(legacy, tmp_path):
    _, data, bounds = legacy
    keys = pickle.loads(data[bounds[4][0]:bounds[4][1]])
    path = _legacy_with(legacy, 4, pickle.dumps(["nope", *keys[1:]], protocol=2), tmp_path / "k.pt")
    _both_refuse(path, "no storage of the pickle")


def test_legacy_dup_opcode(legacy, tmp_path):
    """DUP (which no pickler writes) then POP: the same value for Python's unpickler, refused by torch's."""
    _, data, bounds = legacy
    s, e = bounds[2]
    path = _legacy_with(legacy, 2, data[s:e - 1] + b"20" + data[e - 1:e], tmp_path / "d.pt")
    _both_refuse(path, "DUP")


def test_torchscript_setitem_on_a_module_object(script_file, tmp_path):
    """SETITEM on a TorchScript object (Python's unpickler would take it, the object being a dict to ckptviz)."""
    entries = _entries(script_file)
    pkl = dict(entries)["script/data.pkl"]
    at = next(end for _, end, name, _ in ops_of(pkl) if name == "NEWOBJ")
    path = _rezip(_replace(entries, "/data.pkl", pkl[:at] + b"X\x01\x00\x00\x00kNs" + pkl[at:]), tmp_path / "s.pt")
    _both_refuse(path, "not a dict", jit=True)


def test_torchscript_storage_location_not_a_device(script_file, tmp_path):
    entries = _entries(script_file)
    pkl = dict(entries)["script/data.pkl"]
    cpu = b"X\x03\x00\x00\x00cpu"
    assert cpu in pkl
    path = _rezip(_replace(entries, "/data.pkl", pkl.replace(cpu, b"X\x03\x00\x00\x00abc")), tmp_path / "d.pt")
    _both_refuse(path, "not a device", jit=True)


def test_torchscript_damaged_code_entry(script_file, tmp_path):
    """A code/ entry ckptviz never uses, its deflate stream broken: torch.jit.load cannot compile the module."""
    raw = bytearray(script_file.read_bytes())
    with zipfile.ZipFile(script_file) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(".py") and i.compress_type == zipfile.ZIP_DEFLATED)
    n, m = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + n + m] = 0xFF  # block type 3: reserved, no inflater accepts it
    path = tmp_path / "c.pt"
    path.write_bytes(bytes(raw))
    _both_refuse(path, "inflate", jit=True)


def test_zip64_locator_pointing_past_the_end(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    assert raw[eocd - 20 : eocd - 16] == b"PK\x06\x07"  # torch.save always writes the zip64 end records
    struct.pack_into("<Q", raw, eocd - 20 + 8, len(raw))
    path = tmp_path / "z.pt"
    path.write_bytes(bytes(raw))
    _both_refuse(path, "zip64 locator")


def test_a_damaged_format_version_record(saved, tmp_path):
    """torch.load reads .format_version (miniz checks its local header, not its CRC); so does ckptviz."""
    raw = bytearray(saved.read_bytes())
    name = b"saved/.format_version"
    at = next(i for i in range(len(raw)) if raw.startswith(b"PK\x03\x04", i) and raw[i + 30:i + 30 + len(name)] == name)
    data_at = at + 30 + int.from_bytes(raw[at + 26:at + 28], "little") + int.from_bytes(raw[at + 28:at + 30], "little")
    crc = tmp_path / "crc.pt"
    crc.write_bytes(bytes(raw[:data_at]) + bytes([raw[data_at] ^ 1]) + bytes(raw[data_at + 1:]))
    _both_read(crc)  # a wrong CRC there: both read the file
    far = bytearray(raw)
    far[at + 28:at + 30] = (32767).to_bytes(2, "little")  # an extra field running past the end of the file
    (tmp_path / "far.pt").write_bytes(bytes(far))
    _both_refuse(tmp_path / "far.pt", match="local header puts its data past the end")
    raw[at + 3] ^= 0x80
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(raw))
    _both_refuse(path, match="local header")
