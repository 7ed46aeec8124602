"""Reader limits (issue 8, points 1, 3, 4, 5, 9): crafted files that declare more than can be built
(nesting, elements, allocations, inflated bytes, storage views) are refused before anything is built
or allocated, with a CheckpointError naming the file and the limit; crashes are looked for in child
processes, so that a SIGSEGV fails the test instead of killing pytest."""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_files import assert_clean_error, rewrite_zip, write
from test_security import _global, _long, _storage, _str, _strided  # pickle opcode builders

import ckptviz as cv
from ckptviz.errors import CheckpointLimitError

P = pickle
HEAD = P.PROTO + b"\x02"








def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(cv.__file__))
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------
# the pickle containers, with extra opcodes spliced in before the top-level dict's STOP
# ---------------------------------------------------------------------------------------------


def _zip_with(extra: bytes, path: Path) -> Path:
    """A real torch.save zip whose data.pkl also sets one more entry of its top-level dict."""
    src = write("torch-zip", {"w": torch.ones(3)}, path.with_suffix(".base.pt"))
    return rewrite_zip(src, path, lambda n, d: d[:-1] + extra + P.STOP if n.endswith("/data.pkl") else d)


def _legacy_pickle_span(data: bytes) -> tuple[int, int]:
    """Where the object pickle of a legacy torch.save file starts and ends (the 4th pickle)."""
    f = io.BytesIO(data)
    for _ in range(3):
        pickle.load(f)
    start = f.tell()
    stop = [pos for op, _, pos in pickletools.genops(data[start:]) if op.name == "STOP"][0]
    return start, start + stop + 1


def _legacy_with(extra: bytes, path: Path, weights: dict | None = None) -> Path:
    """A real legacy torch.save file whose object pickle also sets one more entry of its top-level dict."""
    data = write("torch-legacy", weights or {"w": torch.ones(3)}, path.with_suffix(".base.pt")).read_bytes()
    start, end = _legacy_pickle_span(data)
    path.write_bytes(data[:start] + data[start:end - 1] + extra + P.STOP + data[end:])
    return path


def _pickle_with(extra: bytes, path: Path) -> Path:
    path.write_bytes(HEAD + P.EMPTY_DICT + extra + P.STOP)
    return path


CONTAINERS = {"torch-zip": _zip_with, "torch-legacy": _legacy_with, "pickle": _pickle_with}


def _deep(kind: str, depth: int) -> bytes:
    """One more dict entry holding (or keyed by) containers nested ``depth`` deep."""
    return {
        # the key is hashed by SETITEM, which recurses in C through every level
        "tuple-as-dict-key": P.NONE + P.TUPLE1 * depth + P.NONE + P.SETITEM,
        "list": _str("deep") + P.EMPTY_LIST * depth + P.APPEND * (depth - 1) + P.SETITEM,
        "dict": _str("deep") + (P.EMPTY_DICT + _str("k")) * depth + P.NONE + P.SETITEM * depth + P.SETITEM,
        "tuple": _str("deep") + P.NONE + P.TUPLE1 * depth + P.SETITEM,
    }[kind]


KINDS = ["tuple-as-dict-key", "list", "dict", "tuple"]

_OPEN_ALL = """
import sys, ckptviz as cv
for path in sys.argv[1:]:
    try:
        cv.open_checkpoint(path, trust=True).tensors()
        print("opened")
    except cv.CheckpointLimitError as e:
        print("limit", "ckptviz.readers.pickle_reader.MAX_NESTING" in str(e) and path in str(e))
    except BaseException as e:
        print("other", type(e).__name__, str(e)[:200].replace("\\n", " "))
"""


@pytest.mark.parametrize("depth", [10**3, 10**5, 10**6])
def test_deep_nesting_in_every_pickle_container_is_a_limit_error(depth, tmp_path):
    """Containers nested 10**3 to 10**6 deep, anywhere in a torch zip's data.pkl, a legacy file's
    pickle or a plain pickle (a tuple key hashed by SETITEM included) never crash the process and
    never raise RecursionError: CheckpointLimitError naming MAX_NESTING. In a child process."""
    paths = [str(make(_deep(kind, depth), tmp_path / f"{name}-{kind}.pt"))
             for name, make in CONTAINERS.items() for kind in KINDS]
    out = _run(_OPEN_ALL, *paths)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split("\n")[: len(paths)] == ["limit True"] * len(paths), out.stdout


def test_plain_pickle_crashes_on_the_deep_tuple_key(tmp_path):
    """Control: the deep tuple key really kills a plain unpickler (SIGSEGV), so the test above tests something."""
    path = _pickle_with(_deep("tuple-as-dict-key", 10**6), tmp_path / "deep.pkl")
    crash = _run("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())", str(path))
    assert crash.returncode == -11, (crash.returncode, crash.stderr[-500:])


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_the_limit_error_says_how_to_raise_it(container, tmp_path, monkeypatch):
    from ckptviz.readers import pickle_reader

    path = CONTAINERS[container](_deep("list", pickle_reader.MAX_NESTING + 50), tmp_path / "deep.pt")
    with pytest.raises(CheckpointLimitError) as err:
        cv.open_checkpoint(path, trust=True)
    assert_clean_error(err.value, path)
    assert isinstance(err.value, cv.CorruptCheckpointError)
    assert "ckptviz.readers.pickle_reader.MAX_NESTING = 200" in str(err.value)
    assert "If you trust the file, raise it" in str(err.value)
    monkeypatch.setattr(pickle_reader, "MAX_NESTING", 250)
    if container == "pickle":  # opens now; a plain pickle of no tensors is then refused for that
        with pytest.raises(cv.NoTensorsError):
            cv.open_checkpoint(path, trust=True)
    else:
        assert cv.open_checkpoint(path, trust=True).tensors().index.tolist() == ["w"]


@pytest.mark.parametrize("kind", KINDS)
def test_trees_as_deep_as_the_ceiling_go_through_every_verb(kind, tmp_path, monkeypatch):
    """Nesting allowed by the limit (raised to its ceiling) is safe for what every verb then does
    with the tree: section discovery, repr of keys, hashing, tensors, stats, state_dict, materialize."""
    from ckptviz.readers import pickle_reader

    monkeypatch.setattr(pickle_reader, "MAX_NESTING", 10**6)
    depth = pickle_reader.NESTING_CEILING - 5
    for name in ("torch-zip", "torch-legacy"):
        make = CONTAINERS[name]
        path = make(_deep(kind, depth), tmp_path / f"{name}.pt")
        ck = cv.open_checkpoint(path, trust=True)
        repr(ck), ck.sections, ck.tensors(), ck.metadata
        assert ck.stats().loc["w", "mean"] == 1.0
        assert torch.equal(ck.state_dict()["w"], torch.ones(3))
        ck.materialize(ck._root)
        too_deep = make(_deep(kind, pickle_reader.NESTING_CEILING + 5), tmp_path / f"{name}-deeper.pt")
        with pytest.raises(CheckpointLimitError, match="NESTING_CEILING"):
            cv.open_checkpoint(too_deep, trust=True)


def test_too_many_globals_is_a_limit_error(tmp_path, monkeypatch):
    from ckptviz.readers import pickle_reader

    monkeypatch.setattr(pickle_reader, "MAX_GLOBALS", 5)
    extra = b"".join(_str(f"g{i}") + _global("mymod", f"C{i}") + P.SETITEM for i in range(8))
    path = _zip_with(extra, tmp_path / "globals.pt")
    with pytest.raises(CheckpointLimitError, match="MAX_GLOBALS = 5") as err:
        cv.open_checkpoint(path, trust=True)
    assert_clean_error(err.value, path)


# ---------------------------------------------------------------------------------------------
# zero strides and huge element counts (point 3)
# ---------------------------------------------------------------------------------------------






def _record_zip(record: bytes, path: Path) -> Path:
    """A real torch.save zip (storage "0": 3 floats) whose data.pkl holds only ``{"w": record}``."""
    src = write("torch-zip", {"w": torch.tensor([2.0, 3.0, 5.0])}, path.with_suffix(".base.pt"))
    data = HEAD + P.EMPTY_DICT + _str("w") + record + P.SETITEM + P.STOP
    return rewrite_zip(src, path, lambda n, d: data if n.endswith("/data.pkl") else d)


def test_a_huge_zero_stride_tensor_is_summarised_from_its_distinct_elements(tmp_path):
    """A 10**6 x 10**6 float32 tensor with stride (0, 0) over one element (a file of about a kilobyte,
    written by torch.save) lists, summarises and histograms at once, with exact values."""
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.tensor([1.5]).expand(10**6, 10**6)}, path)
    assert path.stat().st_size < 2000
    ck = cv.open_checkpoint(path)
    frame = ck.tensors()
    assert frame.loc["w", "numel"] == 10**12 and frame.loc["w", "nbytes"] == 4 * 10**12
    stats = ck.stats().loc["w"]
    assert stats["numel"] == 1e12 and stats["mean"] == 1.5 and stats["std"] == 0.0
    assert stats["min"] == stats["max"] == 1.5 and stats["l2"] == pytest.approx(1.5e6)
    hist = ck.histogram("w", bins=4)
    assert hist.total == 10**12 and hist.counts.max() == 10**12
    assert ck.tensor("w").stride() == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float64])
def test_zero_stride_statistics_equal_those_of_the_materialised_tensor(dtype):
    from ckptviz.stats import summarize

    base = torch.randn(3, 1, 5, 1, dtype=torch.float64).mul(10).to(dtype)
    base[0, 0, 0, 0] = 0
    if dtype.is_floating_point:
        base[1, 0, 1, 0] = float("nan")
        base[2, 0, 2, 0] = float("inf")
    expanded = base.expand(3, 7, 5, 4)
    got, got_hist = summarize(expanded, 16)
    want, want_hist = summarize(expanded.contiguous(), 16)
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, equal_nan=True, err_msg=k)
    np.testing.assert_array_equal(got_hist.counts, want_hist.counts)
    np.testing.assert_array_equal(got_hist.edges, want_hist.edges)
    assert (got_hist.nan, got_hist.inf) == (want_hist.nan, want_hist.inf)


@pytest.mark.parametrize("size, stride", [((2**30, 2**30), (0, 0)), ((2**60,), (0,)), ((2**40, 2**40), (0, 0)),
                                          ((2**62, 2**62, 1), (0, 0, 1))])
def test_element_counts_beyond_max_numel_are_refused_at_open(size, stride, tmp_path, monkeypatch):
    """Zero strides let a record pass the extent check with any shape; more than MAX_NUMEL elements
    (2**48) is refused at open, before any frame or statistic is sized by it."""
    path = _record_zip(_strided(_storage("0", 3), 0, size, stride), tmp_path / "huge.pt")
    with pytest.raises(CheckpointLimitError, match=r"ckptviz\.readers\.limits\.MAX_NUMEL") as err:
        cv.open_checkpoint(path)
    assert_clean_error(err.value, path)
    from ckptviz.readers import limits

    monkeypatch.setattr(limits, "MAX_NUMEL", 2**62)  # raised: honoured up to NUMEL_CEILING (2**58)
    if np.prod(size, dtype=object) <= limits.NUMEL_CEILING:
        assert cv.open_checkpoint(path).tensors().loc["w", "numel"] == np.prod(size, dtype=object)
    else:
        with pytest.raises(CheckpointLimitError, match="NUMEL_CEILING"):
            cv.open_checkpoint(path)


def test_a_meta_record_beyond_max_numel_is_refused(tmp_path):
    record = (_global("torch._utils", "_rebuild_meta_tensor_no_storage") + P.MARK + _global("torch", "float32")
              + P.MARK + _long(2**40) + _long(2**40) + P.TUPLE + P.MARK + _long(2**40) + _long(1) + P.TUPLE
              + P.NEWFALSE + P.TUPLE + P.REDUCE)
    path = _record_zip(record, tmp_path / "meta.pt")
    with pytest.raises(CheckpointLimitError, match="MAX_NUMEL"):
        cv.open_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# memory bombs (point 4): measured in a child, peak resident set
# ---------------------------------------------------------------------------------------------

_PEAK = """
import sys, ckptviz as cv
cv.open_checkpoint, cv.CheckpointError  # import the readers (and torch) before measuring: the file is measured
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) // 1024
with open("/proc/self/clear_refs", "w") as c:
    c.write("5")
before = rss("VmRSS:")
try:
    cv.open_checkpoint(sys.argv[1], trust=True).tensors()
    print("opened")
except cv.CheckpointError as e:
    print(type(e).__name__, str(e).replace("\\n", " "))
print(rss("VmHWM:") - before)
"""


def _peak(path) -> tuple[str, int]:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    out = _run(_PEAK, str(path))
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    *message, grew = out.stdout.strip().split("\n")
    return " ".join(message), int(grew)


ALLOCATING = {  # allowlisted callables asked for gigabytes by a file of a few hundred bytes
    "bytearray-3e9": _global("builtins", "bytearray") + _long(3_000_000_000) + P.TUPLE1 + P.REDUCE,
    "bytearray-of-size-and-text": _global("builtins", "bytearray") + _long(3_000_000_000) + _str("latin1")
    + P.TUPLE2 + P.REDUCE,
    "set-of-a-range": _global("builtins", "set") + _long(3_000_000_000) + P.TUPLE1 + P.REDUCE,
    "counter-of-an-int": _global("collections", "Counter") + _long(3_000_000_000) + P.TUPLE1 + P.REDUCE,
    "complex-of-a-huge-text": _global("builtins", "complex") + _str("1" * 400) + P.TUPLE1 + P.REDUCE,
    "FloatStorage-3e9": _global("torch", "FloatStorage") + _long(3_000_000_000) + P.TUPLE1 + P.REDUCE,
    "Tensor-3e9": _global("torch", "Tensor") + _long(3_000_000_000) + P.TUPLE1 + P.REDUCE,
    "Size-3e9": _global("torch", "Size") + _long(3_000_000_000) + P.TUPLE1 + P.REDUCE,
}


@pytest.mark.parametrize("case", list(ALLOCATING))
def test_allocating_constructors_are_refused_before_allocating(case, tmp_path):
    """``builtins.bytearray(3_000_000_000)`` from a 700-byte file made the old reader take 3.5 GB;
    every allowlisted callable is called only with the argument shapes picklers write, so nothing
    sized by the file's numbers is allocated (peak RSS growth in a child)."""
    path = _zip_with(_str("x") + ALLOCATING[case] + P.SETITEM, tmp_path / "bomb.pt")
    assert path.stat().st_size < 2000
    message, grew = _peak(path)
    assert grew < 200, (grew, message)
    assert message.startswith("CorruptCheckpointError") or message == "opened", message


def _deflated_zip(path: Path, entries: dict[str, bytes], bomb_name: str, bomb_mb: int, declared: int | None = None):
    """A zip whose entries are stored, except ``bomb_name``: raw deflate of ``bomb_mb`` MiB of zeros
    (independent full-flush blocks of 1 MiB each, so writing it costs no compression time)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    compressed = block * bomb_mb + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    size = bomb_mb << 20 if declared is None else declared
    out, central = io.BytesIO(), []
    for name, data in {**entries, bomb_name: None}.items():
        raw = name.encode()
        method, body, usize = (8, compressed, size) if data is None else (0, data, len(data))
        crc = 0 if data is None else zlib.crc32(data)
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(body), usize, len(raw), 0))
        out.write(raw + body)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(body), usize,
                                   len(raw), 0, 0, 0, 0, 0, offset) + raw)
    cd_at = out.tell()
    out.write(b"".join(central))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - cd_at, cd_at, 0))
    path.write_bytes(out.getvalue())
    return path


def _zip_entries(src: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(src) as z:
        return {n: z.read(n) for n in z.namelist()}


@pytest.mark.parametrize("declared", ["true", "small"])
def test_a_deflate_bomb_data_pkl_is_capped(declared, tmp_path):
    """data.pkl deflated 1000:1 (4 GB from 4 MB, the size stated truthfully or as a lie) is inflated
    at most to the inflate cap: peak RSS stays far below a gigabyte, and the error names the cap."""
    entries = _zip_entries(write("torch-zip", {"w": torch.ones(3)}, tmp_path / "base.pt"))
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    entries.pop(pkl)
    path = _deflated_zip(tmp_path / "bomb.pt", entries, pkl, 4000, None if declared == "true" else 1000)
    assert path.stat().st_size < 5 << 20
    message, grew = _peak(path)
    assert grew < 1024, (grew, message)
    if declared == "true":
        assert message.startswith("CheckpointLimitError") and "INFLATE_RATIO" in message, message
    else:
        assert message.startswith("CorruptCheckpointError") and "declared 1000 bytes" in message, message


# ---------------------------------------------------------------------------------------------
# zip entries whose compression method was altered (point 9)
# ---------------------------------------------------------------------------------------------


def _set_method(path: Path, name_part: str, method: int) -> None:
    """Patch the compression method of the entries whose name contains ``name_part`` (local and central)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if name_part in i.filename]
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        n = struct.unpack_from("<H", data, at + 28)[0]
        name = bytes(data[at + 46 : at + 46 + n]).decode()
        if any(i.filename == name for i in infos):
            struct.pack_into("<H", data, at + 10, method)
            local = struct.unpack_from("<I", data, at + 42)[0]
            struct.pack_into("<H", data, local + 8, method)
        at += 4
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("entry, method", [("data.pkl", 99), ("data.pkl", 8), ("data.pkl", 12), ("/data/0", 8),
                                           ("/data/0", 99), ("byteorder", 8)])
def test_altered_compression_methods_are_corrupt_checkpoint_errors(entry, method, tmp_path):
    path = write("torch-zip", {"w": torch.arange(64.0)}, tmp_path / "model.pt")
    _set_method(path, entry, method)
    with pytest.raises(cv.CorruptCheckpointError) as err:
        cv.open_checkpoint(path).stats()
    assert_clean_error(err.value, path)
    if entry != "/data/0" or method != 8:  # torch reads a storage labelled deflated as stored bytes
        with pytest.raises(Exception):  # noqa: B017 - the reference reader refuses it too
            torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# legacy storages and views (point 5)
# ---------------------------------------------------------------------------------------------


def _legacy_view_file(path: Path, view_offset: int, view_size: int, root_numel: int = 8) -> Path:
    """A real legacy torch.save of one 8-float storage, whose tensor record is rewritten to go
    through a storage view ``(view_key, view_offset, view_size)`` of that root storage."""
    data = write("torch-legacy", {"w": torch.arange(8.0)}, path.with_suffix(".base.pt")).read_bytes()
    start, end = _legacy_pickle_span(data)
    keys = pickle.loads(data[end:])  # the storage key list follows the object pickle
    storage = (P.MARK + _str("storage") + _global("torch", "FloatStorage") + _str(keys[0]) + _str("cpu")
               + _long(root_numel) + P.MARK + _str("view") + _long(view_offset) + _long(view_size) + P.TUPLE
               + P.TUPLE + P.BINPERSID)
    obj = HEAD + P.EMPTY_DICT + _str("w") + _strided(storage, 0, (view_size,), (1,)) + P.SETITEM + P.STOP
    path.write_bytes(data[:start] + obj + data[end:])
    return path


@pytest.mark.parametrize("offset, size, words", [
    (6, 4, "past the end of its root storage"),  # past the root storage (inside the file)
    (10**6, 4, "past the end of its root storage"),  # past the end of the file
    (2**40, 4, "past the end of its root storage"),
])
def test_legacy_storage_views_outside_their_root_are_refused(offset, size, words, tmp_path):
    """A view whose offset lies past its root storage, or past the end of the file, would read the
    process's heap through a storage torch grows silently; torch.load refuses it, and so does ckptviz."""
    path = _legacy_view_file(tmp_path / "view.pt", offset, size)
    with pytest.raises(Exception):  # noqa: B017 - the reference reader's own refusal
        torch.load(path, weights_only=False)
    with pytest.raises(cv.CorruptCheckpointError, match=words) as err:
        cv.open_checkpoint(path).stats()
    assert_clean_error(err.value, path)
    ok = _legacy_view_file(tmp_path / "ok.pt", 2, 4)
    want = torch.load(ok, weights_only=False)["w"]
    assert torch.equal(cv.open_checkpoint(ok).tensor("w"), want) and want.tolist() == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("declared", [4, 16, 2**40])
def test_legacy_storage_whose_byte_size_disagrees_is_refused(declared, tmp_path):
    """The record declares ``declared`` elements; the file holds 8 after the storage's count field.
    ckptviz refuses any disagreement (torch.save never writes one), torch.load only a record larger
    than the bytes."""
    data = write("torch-legacy", {"w": torch.arange(8.0)}, tmp_path / "base.pt").read_bytes()
    start, end = _legacy_pickle_span(data)
    old = _long(8) if _long(8) in data[start:end] else None
    obj = data[start:end]
    needle = P.BININT1 + b"\x08" + P.NONE + P.TUPLE  # the storage's numel, then no view
    assert obj.count(needle) == 1 or old is not None
    new = obj.replace(needle, _long(declared) + P.NONE + P.TUPLE, 1)
    path = tmp_path / "resized.pt"
    path.write_bytes(data[:start] + new + data[end:])
    if declared > 8:  # torch.load takes the count stored beside the bytes, and refuses a record beyond it
        with pytest.raises(Exception):  # noqa: B017
            torch.load(path, weights_only=False)
    with pytest.raises(cv.CorruptCheckpointError) as err:
        cv.open_checkpoint(path).stats()
    assert_clean_error(err.value, path)


def test_legacy_storage_count_field_disagreeing_with_the_file_is_refused(tmp_path):
    """The 8-byte element count before the storage's bytes claims more than the file holds."""
    data = bytearray(write("torch-legacy", {"w": torch.arange(8.0)}, tmp_path / "base.pt").read_bytes())
    _, end = _legacy_pickle_span(bytes(data))
    keys_end = end + len(pickle.dumps(pickle.loads(data[end:]), protocol=2))
    at = data.find(struct.pack("<q", 8), end)
    assert end < at <= keys_end + 8
    struct.pack_into("<q", data, at, 9)
    path = tmp_path / "count.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):  # noqa: B017
        torch.load(path, weights_only=False)
    with pytest.raises(cv.CorruptCheckpointError) as err:
        cv.open_checkpoint(path)
    assert_clean_error(err.value, path)


# ---------------------------------------------------------------------------------------------
# JSON nesting in hub folders (point 9)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deep_json_in_a_shard_index_is_refused(depth, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    deep = "[" * depth + "]" * depth
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {"x": ' + deep + '}, "weight_map": '
                     + json.dumps({"w": "model-00001-of-00001.safetensors"}) + "}")
    with pytest.raises(cv.CorruptCheckpointError, match="MAX_JSON_DEPTH") as err:
        cv.open_checkpoint(tmp_path)
    assert_clean_error(err.value, index)


@pytest.mark.parametrize("limit, value", [("MAX_INDEX_ENTRIES", 50), ("MAX_INDEX_BYTES", 999)])
def test_a_shard_index_beyond_its_size_limits_is_refused_before_parsing(limit, value, tmp_path, monkeypatch):
    """A real index (huggingface_hub's writer) naming 100 tensors: within the defaults it opens; with a
    limit below it, the error names the limit and how to raise it (the bound that keeps a hostile
    index from parsing for minutes into gigabytes)."""
    from huggingface_hub import save_torch_state_dict

    from ckptviz.readers import hub

    save_torch_state_dict({f"layer.{i}.weight": torch.full((4,), float(i)) for i in range(100)}, str(tmp_path),
                          max_shard_size=400)
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file() and index.stat().st_size > value
    assert len(cv.open_checkpoint(tmp_path).tensors()) == 100
    monkeypatch.setattr(hub, limit, value)
    with pytest.raises(CheckpointLimitError, match=f"ckptviz.readers.hub.{limit} = {value}") as err:
        cv.open_checkpoint(tmp_path)
    assert_clean_error(err.value, index)


def test_dcp_metadata_beyond_its_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from ckptviz.readers import dcp as dcp_reader

    with pytest.warns(UserWarning):
        dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(tmp_path))
    assert cv.open_checkpoint(tmp_path).state_dict()["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    monkeypatch.setattr(dcp_reader, "MAX_METADATA_BYTES", 64)
    with pytest.raises(CheckpointLimitError, match="ckptviz.readers.dcp.MAX_METADATA_BYTES = 64") as err:
        cv.open_checkpoint(tmp_path)
    assert_clean_error(err.value, tmp_path / ".metadata")
