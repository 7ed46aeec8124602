"""Seeded mutators: raw byte edits, zip-entry rewrites (CRC recomputed), pickle-opcode edits, safetensors
header-JSON edits. Every mutator takes a ``random.Random`` and bytes and returns (bytes, description)."""

from __future__ import annotations

import io
import json
import pickletools
import random
import struct
import zipfile
from collections.abc import Callable

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 255, 256, 2**15 - 1, 2**16, 2**31 - 1, 2**31, 2**32, 2**32 - 1,
                    2**53, 2**62, 2**63 - 1, -(2**31), -(2**63), 10**6, 10**12]
STORAGES = ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "ByteStorage", "CharStorage",
            "LongStorage", "IntStorage", "BoolStorage", "ComplexFloatStorage", "QInt8Storage", "UntypedStorage"]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "C64", "F8_E4M3", "F8_E5M2",
             "U64", "X9", ""]

Mutator = Callable[[random.Random, bytes], tuple[bytes, str]]


# ---- raw bytes ----------------------------------------------------------------------------------
def bit_flips(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    n = rng.choice([1, 1, 2, 4, 16])
    at = [rng.randrange(len(b)) for _ in range(n)] if b else []
    for i in at:
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"flip {n} bit(s) at {at[:4]}"


def overwrite(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "overwrite (empty)"
    v = rng.choice(INTERESTING_INTS)
    width = rng.choice([1, 2, 4, 8])
    raw = (v % (1 << (8 * width))).to_bytes(width, "little")
    i = rng.randrange(len(data))
    return data[:i] + raw + data[i + width:], f"overwrite {width}B={v} at {i}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n = rng.choice([0, 1, 8, rng.randrange(len(data) + 1), max(0, len(data) - rng.randrange(1, 64))])
    return data[:n], f"truncate to {n} of {len(data)}"


def chunk_dup(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if len(data) < 2:
        return data + data, "dup all"
    i = rng.randrange(len(data))
    n = rng.randrange(1, min(256, len(data) - i) + 1)
    return data[:i + n] + data[i:], f"dup {n}B at {i}"


def chunk_delete(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if len(data) < 2:
        return b"", "delete all"
    i = rng.randrange(len(data))
    n = rng.randrange(1, min(256, len(data) - i) + 1)
    return data[:i] + data[i + n:], f"delete {n}B at {i}"


RAW: list[Mutator] = [bit_flips, overwrite, truncate, chunk_dup, chunk_delete]


# ---- pickle opcodes -----------------------------------------------------------------------------
def pickle_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def pickle_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def ops_of(data: bytes) -> list[tuple[int, int, str, object]]:
    """(start, end, opcode name, arg) for every opcode of the first pickle in ``data`` (up to STOP)."""
    out, prev = [], None
    for op, arg, pos in pickletools.genops(data):
        if prev is not None:
            out.append((prev[0], pos, prev[1], prev[2]))
        prev = (pos, op.name, arg)
        if op.name == "STOP":
            out.append((pos, pos + 1, op.name, arg))
            break
    return out


INSERTS = [b")", b"N", b"(", b"t", b"0", b"2", b"}", b"]", b"K\x00", b"h\x00", b"q\x00", b"e", b"s", b"u", b"R",
           b"\x85", b"Q", b"b", b"cbuiltins\nbytearray\n", b"ctorch\nFloatStorage\n", b"\x88"]


def pickle_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One opcode-aware edit of a pickle stream: an int or string argument rewritten, a storage class
    relabelled, an opcode deleted, duplicated or inserted. Bytes after STOP are kept."""
    try:
        ops = ops_of(data)
    except Exception:
        return bit_flips(rng, data)
    if not ops:
        return bit_flips(rng, data)
    end = ops[-1][1]
    ints = [o for o in ops if o[2] in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG")]
    strs = [o for o in ops if o[2] in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE")]
    globs = [o for o in ops if o[2] in ("GLOBAL", "STACK_GLOBAL")]
    choice = rng.choice(["int", "int", "int", "str", "glob", "del", "dup", "ins", "swap"])
    if choice == "int" and ints:
        s, e, name, arg = rng.choice(ints)
        v = rng.choice(INTERESTING_INTS + [arg + 1, arg - 1, arg * 2 if isinstance(arg, int) else 3])
        return data[:s] + pickle_int(int(v)) + data[e:], f"pickle int {arg}->{v} at {s}"
    if choice == "str" and strs:
        s, e, _, arg = rng.choice(strs)
        new = rng.choice(["", "cuda", "meta", "0", "1", "99", "storage", "cpu", str(arg) * 2, "a" * 300,
                          "module." + str(arg), "\ud800", "../etc/passwd"])
        return data[:s] + pickle_str(new) + data[e:], f"pickle str {str(arg)[:40]!r}->{new[:40]!r} at {s}"
    if choice == "glob" and globs:
        s, e, name, arg = rng.choice(globs)
        if name == "GLOBAL":
            new = rng.choice([f"torch {rng.choice(STORAGES)}"] * 3 + ["torch._utils _rebuild_parameter",
                             "collections OrderedDict", "builtins set", "torch._utils _rebuild_qtensor",
                             "torch._utils _rebuild_tensor_v2", "os system", "builtins bytearray", "torch Size",
                             "torch.serialization _get_layout", "evil.mod Thing"])
            mod, _, nm = new.partition(" ")
            return data[:s] + b"c" + mod.encode() + b"\n" + nm.encode() + b"\n" + data[e:], f"global {arg}->{new}"
    if choice == "dup":
        s, e, name, _ = rng.choice(ops[:-1] or ops)
        return data[:e] + data[s:e] + data[e:], f"pickle dup {name} at {s}"
    if choice == "ins":
        s = rng.choice(ops)[0]
        ins = rng.choice(INSERTS)
        return data[:s] + ins + data[s:], f"pickle insert {ins!r} at {s}"
    if choice == "swap" and len(ops) > 3:
        i = rng.randrange(len(ops) - 2)
        (s1, e1, n1, _), (s2, e2, n2, _) = ops[i], ops[i + 1]
        return data[:s1] + data[s2:e2] + data[s1:e1] + data[e2:], f"pickle swap {n1}<->{n2} at {s1}"
    s, e, name, _ = rng.choice(ops[:-1] or ops)
    return data[:s] + data[e:end] + data[end:], f"pickle delete {name} at {s}"


# ---- zip containers -----------------------------------------------------------------------------
def zip_entries(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def write_zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    """A zip of (name, content, compress_type) with correct CRCs (Python's writer)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content, method in entries:
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), content, compress_type=method)
    return buf.getvalue()


def zip_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Rewrite one zip entry (its pickle opcode-aware, others raw), or change an entry's compression
    (really deflated, or only the method field patched), with CRCs recomputed so the zip stays valid."""
    try:
        entries = [(i.filename, c, i.compress_type) for i, c in zip_entries(data)]
    except Exception:
        return rng.choice(RAW)(rng, data)
    if not entries:
        return data, "empty zip"
    what = rng.choice(["pkl", "pkl", "pkl", "pkl", "entry", "deflate", "method", "drop", "rename"])
    pkls = [i for i, (n, _, _) in enumerate(entries) if n.endswith(".pkl")]
    if what == "pkl" and pkls:
        i = rng.choice(pkls)
        new, desc = pickle_edit(rng, entries[i][1])
        if rng.random() < 0.3:
            new, d2 = pickle_edit(rng, new)
            desc += "; " + d2
        entries[i] = (entries[i][0], new, entries[i][2])
        return write_zip(entries), f"zip {entries[i][0]}: {desc}"
    i = rng.randrange(len(entries))
    name, content, method = entries[i]
    if what == "entry":
        new, desc = rng.choice(RAW)(rng, content)
        entries[i] = (name, new, method)
        return write_zip(entries), f"zip {name}: {desc}"
    if what == "deflate":
        entries[i] = (name, content, zipfile.ZIP_DEFLATED)
        return write_zip(entries), f"zip {name}: deflated"
    if what == "drop":
        del entries[i]
        return write_zip(entries), f"zip drop {name}"
    if what == "rename":
        entries[i] = (name + rng.choice(["x", "/", ""]) if rng.random() < 0.5 else "other/" + name, content, method)
        return write_zip(entries), f"zip rename {name}"
    # patch the method field of the local and central headers, leaving the stored bytes as they are
    out = bytearray(data)
    method_value = rng.choice([8, 12, 14, 99, 1])
    n = 0
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        start = 0
        k = 0
        while True:
            j = out.find(sig, start)
            if j < 0:
                break
            if k == i:
                out[j + off:j + off + 2] = struct.pack("<H", method_value)
                n += 1
            k += 1
            start = j + 4
    return bytes(out), f"zip {name}: method field -> {method_value} ({n} headers)"


# ---- legacy torch files -------------------------------------------------------------------------
def legacy_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """An opcode edit of one of the legacy format's five pickles, or an int64 written over a storage's
    element count in the raw tail."""
    bounds, pos = [], 0
    try:
        for _ in range(5):
            ops = ops_of(data[pos:])
            bounds.append((pos, pos + ops[-1][1]))
            pos += ops[-1][1]
    except Exception:
        return rng.choice(RAW)(rng, data)
    if rng.random() < 0.25:  # the first storage's 8-byte element count
        v = rng.choice(INTERESTING_INTS)
        return data[:pos] + struct.pack("<q", v if v < 2**63 else -1) + data[pos + 8:], f"legacy count -> {v}"
    k = rng.choice([3, 3, 3, 4, 0, 1, 2])
    s, e = bounds[k]
    new, desc = pickle_edit(rng, data[s:e])
    return data[:s] + new + data[e:], f"legacy pickle {k}: {desc}"


# ---- safetensors --------------------------------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def safetensors_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """An edit of the JSON header (dtype, shape, offsets, metadata, entries), the header re-serialized with
    a correct length (a header an earlier mutation left without the fields to edit gets a raw edit)."""
    try:
        return _safetensors_edit(rng, data)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        return rng.choice(RAW)(rng, data)


def _safetensors_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    try:
        header, body = split_safetensors(data)
        keys = [k for k in header if k != "__metadata__"]
    except Exception:
        return rng.choice(RAW)(rng, data)
    if not keys:
        return rng.choice(RAW)(rng, data)
    k = rng.choice(keys)
    e = header[k]
    what = rng.choice(["dtype", "shape", "shape", "off", "off", "overlap", "hole", "meta", "extra", "len"])
    if what == "dtype":
        e["dtype"] = rng.choice(ST_DTYPES + [5, None])
        desc = f"{k} dtype -> {e['dtype']}"
    elif what == "shape":
        v = rng.choice(INTERESTING_INTS + [-1])
        shape = list(e["shape"])
        op = rng.choice(["set", "append", "empty", "type"])
        if op == "set" and shape:
            shape[rng.randrange(len(shape))] = v
        elif op == "append":
            shape.append(v)
        elif op == "empty":
            shape = []
        else:
            shape = rng.choice(["4", [1.5], None, [[2]], {"a": 1}])
        e["shape"] = shape
        desc = f"{k} shape -> {shape}"
    elif what == "off":
        off = list(e["data_offsets"])
        j = rng.randrange(2)
        off[j] = rng.choice(INTERESTING_INTS + [-8, off[j] + 1, off[j] - 1, len(body), len(body) + 1])
        if rng.random() < 0.1:
            off = rng.choice([[0], [1, 2, 3], "x", None, [0.5, 4]])
        e["data_offsets"] = off
        desc = f"{k} data_offsets -> {off}"
    elif what == "overlap":
        other = header[rng.choice(keys)]
        if not isinstance(other, dict) or not isinstance(other.get("data_offsets"), list):
            return rng.choice(RAW)(rng, data)  # an earlier mutation left no offsets to copy
        e["data_offsets"] = list(other["data_offsets"])
        desc = f"{k} offsets copied from another entry"
    elif what == "hole":
        del header[k]
        desc = f"{k} deleted (a hole)"
    elif what == "meta":
        header["__metadata__"] = rng.choice([{"a": 1}, {"a": {"b": "c"}}, ["x"], "s", None, {"format": ["pt"]},
                                             {"": ""}, {"k" * 100: "v" * 10000}])
        desc = f"__metadata__ -> {str(header['__metadata__'])[:60]}"
    elif what == "extra":
        e[rng.choice(["extra", "dtype", "shape"])] = rng.choice([1, "x", [], {}])
        header.pop(k) if rng.random() < 0.1 else None
        desc = f"{k} field edit"
    else:
        raw = json.dumps(header).encode()
        n = rng.choice([len(raw) + 1, len(raw) - 1, 0, 2**63 - 1, len(raw) + len(body) + 8, 2**32])
        return struct.pack("<Q", n) + raw + body, f"header length -> {n}"
    return join_safetensors(header, body), desc


def json_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """An edit of a JSON file (an index): a weight_map entry repointed, a value's type changed."""
    try:
        obj = json.loads(data)
        wm = obj["weight_map"]
        k = rng.choice(list(wm))
    except Exception:
        return rng.choice(RAW)(rng, data)
    what = rng.choice(["file", "type", "del", "meta", "spell", "deep", "many"])
    if what == "file":
        wm[k] = rng.choice(["missing.safetensors", "", "../x", wm[rng.choice(list(wm))], "/etc/passwd", "."])
    elif what == "spell":  # the same shard under another spelling
        wm[k] = rng.choice(["./", ".//", "././", "x/../"]) + str(wm[k])
    elif what == "deep":  # nesting past the JSON depth limit, or just under it
        n = rng.choice([100, 129, 10_000])
        return (json.dumps(obj)[:-1] + ', "deep": ' + "[" * n + "]" * n + "}").encode(), f"index nested {n} deep"
    elif what == "many":  # entries the shards do not hold
        wm.update({f"{k}.{i}": wm[k] for i in range(rng.choice([10, 10_000]))})
    elif what == "type":
        wm[k] = rng.choice([1, None, ["a"], {"a": 1}])
    elif what == "del":
        del wm[k]
    else:
        obj["metadata"] = rng.choice([{"total_size": -1}, {"total_size": "x"}, None, [1], {"total_size": 2**70}])
    return json.dumps(obj).encode(), f"index {what} {k}"


LATEST = ["../..", "..", ".", "/", "/etc", "global_step2/..", "global_step999", "", "\x00", "a" * 5000,
          "global_step2\n\n", "mp_rank_00_model_states.pt"]


def latest_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """DeepSpeed's ``latest`` (a tag name) replaced by a path outside the folder, a missing tag, junk."""
    tag = rng.choice(LATEST)
    return tag.encode(), f"latest -> {tag[:40]!r}"


def mutate_file(rng: random.Random, data: bytes, kind: str) -> tuple[bytes, list[str]]:
    """1-3 mutations chosen for the container ``kind`` ("zip", "legacy", "safetensors", "json", "raw")."""
    structured = {"zip": zip_edit, "legacy": legacy_edit, "safetensors": safetensors_edit, "json": json_edit,
                  "pickle": pickle_edit, "latest": latest_edit}.get(kind)
    descs = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        fn = structured if structured is not None and rng.random() < 0.7 else rng.choice(RAW)
        data, d = fn(rng, data)
        descs.append(f"{fn.__name__}: {d}")
    return data, descs


def kind_of(name: str, data: bytes) -> str:
    """Which structured mutator fits a file, from its name and first bytes."""
    if data[:2] == b"PK":
        return "zip"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".metadata"):
        return "pickle"
    if name == "latest":
        return "latest"
    if data[:1] == b"\x80" and name.endswith((".pt", ".bin", ".ckpt")):
        return "legacy"
    return "raw"
