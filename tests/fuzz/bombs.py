"""Hand-built hostile files, one per class of issue 8. Each is built from a real ``torch.save`` /
``save_file`` output, with the hostile part spliced into its pickle or header.

``BOMBS`` maps a name to (builder, expectation): "refuse" (the reference reader rejects it; ckptviz must
raise a CheckpointError) or "either" (a valid or borderline file: a clean result or a CheckpointError,
within the time and memory limits)."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .mutators import join_safetensors, ops_of, pickle_int, pickle_str, split_safetensors, write_zip


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _splice_zip(obj, placeholders: dict[str, bytes]) -> bytes:
    """``torch.save(obj)`` with each placeholder string's opcode in data.pkl replaced by raw pickle ops."""
    with zipfile.ZipFile(io.BytesIO(_saved(obj))) as z:
        entries = [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]
    for n, (name, content, method) in enumerate(entries):
        if name.endswith("/data.pkl"):
            for s, e, op, arg in reversed(ops_of(content)):
                if isinstance(arg, str) and arg in placeholders and op.endswith("UNICODE"):
                    content = content[:s] + placeholders[arg] + content[e:]
            entries[n] = (name, content, method)
    return write_zip(entries)


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "b": torch.randn(4)}


def laughs(depth: int = 30, width: int = 10, base: int = 1_000_000) -> bytes:
    """Pickle ops leaving one tuple on the stack, of lists whose contents are shared through the memo:
    width**depth leaves in ~ depth * width * 5 bytes (no POP: torch.load and ckptviz refuse it)."""
    out = b"(" + b"]" + b"r" + struct.pack("<I", base) + b"(" + b"K\x01" * width + b"e"
    for d in range(1, depth + 1):
        out += b"]" + b"r" + struct.pack("<I", base + d) + b"("
        out += (b"j" + struct.pack("<I", base + d - 1)) * width + b"e"
    return out + b"t"


def deep_tuple_key(root: Path) -> Path:
    p = root / "deep_tuple_key.pt"
    p.write_bytes(_splice_zip({**_weights(), "KEY": 1}, {"KEY": b")" + b"\x85" * 200_000}))
    return p


def memo_laughs_metadata(root: Path) -> Path:
    p = root / "memo_laughs_metadata.pt"
    p.write_bytes(_splice_zip({"state_dict": _weights(), "meta": "LAUGHS"}, {"LAUGHS": laughs()}))
    return p


def memo_laughs_optimizer(root: Path) -> Path:
    from . import seeds

    m, opt = seeds.trained()
    sd = opt.state_dict()
    sd["state"][0]["extra"] = "LAUGHS"
    p = root / "memo_laughs_optimizer.pt"
    p.write_bytes(_splice_zip({"state_dict": m.state_dict(), "optimizer": sd}, {"LAUGHS": laughs()}))
    return p


def bytearray_3e9(root: Path) -> Path:
    p = root / "bytearray_3e9.pt"
    ops = b"cbuiltins\nbytearray\n" + pickle_int(3_000_000_000) + b"\x85R"
    p.write_bytes(_splice_zip({**_weights(), "blob": "BLOB"}, {"BLOB": ops}))
    return p


def deflate_bomb(root: Path, size: int = 5 << 29) -> Path:
    """data.pkl deflated: a 2.5 GiB run of zeros inside a BINBYTES8 value, a few MB on disk."""
    p = root / "deflate_bomb.pt"
    with zipfile.ZipFile(io.BytesIO(_saved(_weights()))) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(p, "w") as out:
        for name, content in entries:
            if not name.endswith("/data.pkl"):
                out.writestr(name, content)
                continue
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with out.open(info, "w", force_zip64=True) as f:
                f.write(content[:-1] + pickle_str("pad") + b"\x8e" + struct.pack("<Q", size))
                zeros = bytes(1 << 24)
                for _ in range(size // len(zeros)):
                    f.write(zeros)
                f.write(b"s.")
    return p


def zero_stride_huge(root: Path) -> Path:
    p = root / "zero_stride_huge.pt"
    torch.save({"w": torch.ones(1).expand(10**6, 10**6), "b": torch.zeros(3)}, p)
    return p


def legacy_view_past_eof(root: Path) -> Path:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    pos = 0
    for k in range(5):
        ops = ops_of(data[pos:])
        if k == 3:
            for (s, e, op, _), (_, _, nxt, _) in zip(ops, ops[1:]):
                if op == "NONE" and nxt == "TUPLE":
                    key = next(a for _, _, o, a in ops if o == "BINUNICODE" and a.isdigit())
                    view = pickle_str(key) + pickle_int(10**6) + pickle_int(4) + b"\x87"
                    data = data[:pos + s] + view + data[pos + e:]
                    break
            break
        pos += ops[-1][1]
    p = root / "legacy_view_past_eof.pt"
    p.write_bytes(data)
    return p


def _st(root: Path, name: str, edit: Callable[[dict], None]) -> Path:
    p = root / name
    save_file({"a": torch.arange(4.0), "b": torch.arange(4.0) + 10, "c": torch.arange(2.0)}, p)
    header, body = split_safetensors(p.read_bytes())
    edit(header)
    p.write_bytes(join_safetensors(header, body))
    return p


def st_relabel_f16(root: Path) -> Path:
    return _st(root, "st_relabel_f16.safetensors", lambda h: h["a"].update(dtype="F16"))


def st_negative_offset(root: Path) -> Path:
    return _st(root, "st_negative_offset.safetensors", lambda h: h["a"].update(data_offsets=[-16, 0]))


def st_overlap(root: Path) -> Path:
    return _st(root, "st_overlap.safetensors", lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"]))


def st_hole(root: Path) -> Path:
    return _st(root, "st_hole.safetensors", lambda h: h.pop("b"))


def st_short_shape(root: Path) -> Path:
    return _st(root, "st_short_shape.safetensors", lambda h: h["a"].update(shape=[2]))


def st_huge_shape(root: Path) -> Path:
    return _st(root, "st_huge_shape.safetensors", lambda h: h["a"].update(shape=[2**62, 2**62]))


def st_bad_metadata(root: Path) -> Path:
    return _st(root, "st_bad_metadata.safetensors", lambda h: h.update(__metadata__={"a": 1, "b": {"c": []}}))


def st_deep_json(root: Path) -> Path:
    p = root / "st_deep_json.safetensors"
    save_file({"a": torch.arange(4.0)}, p)
    header, body = split_safetensors(p.read_bytes())
    raw = json.dumps(header).encode()
    deep = b'{"__metadata__": {"x": "y"}, "z": ' + b"[" * 100_000 + b"]" * 100_000 + b", " + raw[1:]
    deep += b" " * (-len(deep) % 8)
    p.write_bytes(struct.pack("<Q", len(deep)) + deep + body)
    return p


def quantized(root: Path) -> Path:
    p = root / "quantized.pt"
    torch.save({"q": torch.quantize_per_tensor(torch.randn(6), 0.1, 0, torch.qint8),
                "qc": torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]),
                                                 torch.tensor([0, 1]), 0, torch.quint8),
                "w": torch.randn(3)}, p)
    return p


def method_patched(root: Path) -> Path:
    """zip.pt with data.pkl's method field set to deflate while its bytes stay stored."""
    data = bytearray(_saved(_weights()))
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        j = data.find(sig)
        data[j + off:j + off + 2] = struct.pack("<H", 8)
    p = root / "method_patched.pt"
    p.write_bytes(bytes(data))
    return p


def _odd_state(state_ops: bytes) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        ops = b"cevil.mod\nThing\n)\x81" + state_ops + b"b"
        p = root / f"odd_state_{abs(hash(state_ops)) % 10**6}.pt"
        p.write_bytes(_splice_zip({**_weights(), "obj": "OBJ", "lst": ["OBJ"]}, {"OBJ": ops}))
        return p

    return build


def _odd_reduce(args_ops: bytes) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        ops = b"cevil.mod\nmake\n" + args_ops + b"R"
        p = root / f"odd_reduce_{abs(hash(args_ops)) % 10**6}.pt"
        p.write_bytes(_splice_zip({**_weights(), "obj": "OBJ"}, {"OBJ": ops}))
        return p

    return build


def _valid(name: str, values: dict[str, torch.Tensor]) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        p = root / name
        torch.save(values, p)
        return p

    return build


# ---- TorchScript: module records pointing at one child many times ------------------------------------
def script_shared_child(root: Path, depth: int = 30, width: int = 10) -> Path:
    """A real TorchScript archive (``torch.jit.script`` of a module holding one Linear) whose data.pkl is
    rewritten so that every level's module record names ONE child record (memo) under ``width`` names,
    ``depth`` levels deep: width**depth module paths in a few KB."""
    from torch import nn

    parent = nn.Module()
    parent.add_module("c0", nn.Linear(2, 2))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(parent), buf)
    leaf_buf = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), leaf_buf)
    with zipfile.ZipFile(io.BytesIO(leaf_buf.getvalue())) as z:
        leaf = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    ops = leaf[2:-1]  # the Linear record: PROTO and STOP cut off; its memo indices stay below 100
    put = lambda i: b"r" + struct.pack("<I", 1000 + i)  # noqa: E731  LONG_BINPUT
    get = lambda i: b"j" + struct.pack("<I", 1000 + i)  # noqa: E731  LONG_BINGET
    module = b"c__torch__.torch.nn.modules.module\nModule\n"
    ops += put(0)
    for d in range(1, depth + 1):  # level d's first child is level d-1 itself, built inline (no POP)
        ops = (module + b")\x81}(" + pickle_str("training") + b"\x88" + pickle_str("c0") + ops
               + b"".join(pickle_str(f"c{j}") + get(d - 1) for j in range(1, width)) + b"ub"
               + (put(d) if d < depth else b""))
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        entries = [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]
    entries = [(n, b"\x80\x02" + ops + b"." if n.endswith("/data.pkl") else c, m) for n, c, m in entries]
    p = root / "script_shared_child.pt"
    p.write_bytes(write_zip(entries))
    return p


# ---- hub folders ---------------------------------------------------------------------------------------
def _hub(root: Path, name: str, weight_map: dict[str, str] | None = None, raw_index: bytes | None = None) -> Path:
    """A hub folder: one real safetensors shard and an index (``weight_map`` beside its real entries)."""
    folder = root / name
    folder.mkdir()
    shard = "model-00001-of-00001.safetensors"
    save_file(_weights(), folder / shard)
    index = {"metadata": {"total_size": 64}, "weight_map": {"w": shard, "b": shard, **(weight_map or {})}}
    (folder / "model.safetensors.index.json").write_bytes(raw_index if raw_index is not None
                                                          else json.dumps(index).encode())
    return folder


def hub_index_million(root: Path) -> Path:
    """An index promising 10**6 tensors the shard does not hold."""
    shard = "model-00001-of-00001.safetensors"
    return _hub(root, "hub_index_million", {f"layer.{i}.weight": shard for i in range(10**6)})


def hub_shard_many_spellings(root: Path, n: int = 100_000) -> Path:
    """An index naming its one shard under ``n`` spellings (``./``, ``//``): one file, read once."""
    shard = "model-00001-of-00001.safetensors"
    spell = ["".join(("./", ".//")[(i >> b) & 1] for b in range(17)) + shard for i in range(n)]
    return _hub(root, "hub_shard_many_spellings", {f"x{i}": s for i, s in enumerate(spell)} | {"w": spell[1]})


def hub_shard_many_spellings_valid(root: Path) -> Path:
    """The same shard under two spellings, every key where the index says: a valid folder."""
    shard = "model-00001-of-00001.safetensors"
    return _hub(root, "hub_shard_two_spellings", {"w": "./" + shard})


def hub_deep_index(root: Path) -> Path:
    deep = b'{"weight_map": {"w": "model-00001-of-00001.safetensors"}, "metadata": ' + b"[" * 200_000 + b"]" * 200_000
    return _hub(root, "hub_deep_index", raw_index=deep + b"}")


# ---- DCP folders ---------------------------------------------------------------------------------------
def _dcp(root: Path, name: str, edit: Callable[[Any, Path], None]) -> Path:
    """A real ``torch.distributed.checkpoint.save`` folder whose ``.metadata`` is edited by ``edit(md, folder)``
    and pickled again (DCP's own classes, as DCP pickles them)."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": _weights(), "step": 3, "extra": {"a": [1, 2]}}, checkpoint_id=str(folder))
    md = pickle.loads((folder / ".metadata").read_bytes())
    edit(md, folder)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    return folder


def _deep_list(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


def dcp_deep_planner_path(root: Path) -> Path:
    """planner_data places a byte item 100,000 levels deep (the layout would rebuild a tree that deep)."""
    return _dcp(root, "dcp_deep_planner_path", lambda md, _: md.planner_data.update(step=("a",) * 100_000))


def dcp_deep_nesting(root: Path) -> Path:
    """storage_meta holding lists nested 300 deep (pickle's own nesting, past MAX_NESTING)."""
    return _dcp(root, "dcp_deep_nesting", lambda md, _: setattr(md, "storage_meta", _deep_list(300)))


def _many_empty_chunks(md, _folder) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    entry = md.state_dict_metadata["model.w"]
    empty = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([0, 3]))
    entry.chunks = entry.chunks + [empty] * 2_000_000  # one record, shared through the memo


def dcp_huge_chunk_list(root: Path) -> Path:
    """A tensor declared as its one real chunk plus 2,000,000 empty ones (one memoized record, ~4 MB)."""
    return _dcp(root, "dcp_huge_chunk_list", _many_empty_chunks)


def _item(md, fqn: str):
    return next(v for k, v in md.storage_data.items() if k.fqn == fqn)


def dcp_offset_past_end(root: Path) -> Path:
    def edit(md, folder):
        _item(md, "model.w").offset = (folder / "__0_0.distcp").stat().st_size + 100

    return _dcp(root, "dcp_offset_past_end", edit)


def dcp_offset_overflow(root: Path) -> Path:
    """An offset and length whose sum overflows int64 (wrapping negative, under the file size)."""
    def edit(md, _folder):
        info = _item(md, "model.w")
        info.offset, info.length = 2**62, 2**62

    return _dcp(root, "dcp_offset_overflow", edit)


def _deflated(zip_bytes: bytes) -> bytes:
    """The same torch.save zip with every entry deflated (torch never writes that)."""
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as z:
        return write_zip([(i.filename, z.read(i), zipfile.ZIP_DEFLATED) for i in z.infolist()])


def dcp_deflated_items(root: Path) -> Path:
    """Every item of the .distcp file re-zipped with deflated entries (offsets and lengths updated)."""
    def edit(md, folder):
        path = folder / "__0_0.distcp"
        data, out = path.read_bytes(), b""
        for info in sorted(md.storage_data.values(), key=lambda i: i.offset):
            item = _deflated(data[info.offset:info.offset + info.length])
            info.offset, info.length = len(out), len(item)
            out += item
        path.write_bytes(out)

    return _dcp(root, "dcp_deflated_items", edit)


# ---- DeepSpeed folders ---------------------------------------------------------------------------------
def _deepspeed(root: Path, name: str) -> Path:
    from tests.deepspeed_fixtures import write_deepspeed_checkpoint

    from . import seeds

    folder = root / name
    write_deepspeed_checkpoint(folder, seeds.model(), stage=2, world_size=2)
    return folder


def deepspeed_latest_outside(root: Path) -> Path:
    """``latest`` names ``../..``; a tag folder of that name is made above too, to be followed if allowed."""
    folder = _deepspeed(root, "ds_latest_outside")
    (folder / "latest").write_text("../..")
    return folder


def deepspeed_latest_absolute(root: Path) -> Path:
    folder = _deepspeed(root, "ds_latest_absolute")
    (folder / "latest").write_text(str(folder / "global_step2"))
    (folder / "global_step2").rename(folder.parent / "elsewhere")
    (folder / "latest").write_text(str(folder.parent / "elsewhere"))
    return folder


def deepspeed_symlink_loop(root: Path) -> Path:
    """``latest`` names a tag that is a loop of symlinks (a -> b -> a); the real tag folder is gone."""
    import os
    import shutil

    folder = _deepspeed(root, "ds_symlink_loop")
    shutil.rmtree(folder / "global_step2")
    os.symlink("loop_b", folder / "loop_a")
    os.symlink("loop_a", folder / "loop_b")
    (folder / "latest").write_text("loop_a")
    return folder


def deepspeed_tag_symlink_to_parent(root: Path) -> Path:
    """A ``global_step9`` symlink pointing at the save folder itself (a cycle for any recursive walk)."""
    import os

    folder = _deepspeed(root, "ds_tag_cycle")
    os.symlink(".", folder / "global_step9")
    (folder / "latest").write_text("global_step9")
    return folder


def deepspeed_deflated_pt(root: Path) -> Path:
    """Every .pt of the tag re-zipped with deflated entries (storages included)."""
    folder = _deepspeed(root, "ds_deflated")
    for p in (folder / "global_step2").glob("*.pt"):
        p.write_bytes(_deflated(p.read_bytes()))
    return folder


def deepspeed_deflated_pickle_only(root: Path) -> Path:
    """The model-states file with only its data.pkl deflated (a valid zip; storages stay stored)."""
    folder = _deepspeed(root, "ds_deflated_pkl")
    p = folder / "global_step2" / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(io.BytesIO(p.read_bytes())) as z:
        entries = [(i.filename, z.read(i), zipfile.ZIP_DEFLATED if i.filename.endswith(".pkl") else i.compress_type)
                   for i in z.infolist()]
    p.write_bytes(write_zip(entries))
    return folder


FOLDERS = ("hub_", "dcp_", "deepspeed_")


def reference_for(name: str, expect: str) -> str | None:
    """The reference reader a bomb's file is checked against: for the refused and the valid ones only (the
    hostile "either" ones would make the reference reader itself blow up)."""
    if name.startswith(FOLDERS):  # folder layouts: no single-file reference reader
        return None
    if expect == "refuse" or name.startswith(("hist_", "quantized", "zero_stride")):
        return "safetensors" if name.startswith("st_") else "torch"
    return None


BOMBS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "deep_tuple_key": (deep_tuple_key, "either"),
    "memo_laughs_metadata": (memo_laughs_metadata, "either"),
    "memo_laughs_optimizer": (memo_laughs_optimizer, "either"),
    "bytearray_3e9": (bytearray_3e9, "either"),
    "deflate_bomb": (deflate_bomb, "either"),
    "zero_stride_huge": (zero_stride_huge, "either"),
    "legacy_view_past_eof": (legacy_view_past_eof, "refuse"),
    "st_relabel_f16": (st_relabel_f16, "refuse"),
    "st_negative_offset": (st_negative_offset, "refuse"),
    "st_overlap": (st_overlap, "refuse"),
    "st_hole": (st_hole, "refuse"),
    "st_short_shape": (st_short_shape, "refuse"),
    "st_huge_shape": (st_huge_shape, "refuse"),
    "st_bad_metadata": (st_bad_metadata, "refuse"),
    "st_deep_json": (st_deep_json, "refuse"),
    "quantized": (quantized, "either"),
    "method_patched": (method_patched, "either"),
    "state_int": (_odd_state(b"K\x05"), "either"),
    "state_list": (_odd_state(b"]K\x01a"), "either"),
    "state_pair_bad": (_odd_state(b"NK\x05\x86"), "either"),
    "state_triple": (_odd_state(b"K\x01K\x02K\x03\x87"), "either"),
    "state_tuple_keys": (_odd_state(b"}K\x01K\x02\x86K\x03s"), "either"),
    "state_slots_bad": (_odd_state(b"}]\x86"), "either"),
    "reduce_not_tuple": (_odd_reduce(b"K\x05\x85"), "either"),
    "hist_const_1e15": (_valid("hist_const_1e15.pt", {"w": torch.full((100,), 1e15)}), "either"),
    "hist_adjacent_f64": (_valid("hist_adjacent_f64.pt", {"w": torch.tensor(
        [1.0, float(np.nextafter(1.0, 2.0))], dtype=torch.float64)}), "either"),
    "hist_const_bf16_1e20": (_valid("hist_const_bf16_1e20.pt", {"w": torch.full((50,), 1e20, dtype=torch.bfloat16)}),
                             "either"),
    "script_shared_child": (script_shared_child, "either"),
    "hub_index_million": (hub_index_million, "refuse"),
    "hub_shard_many_spellings": (hub_shard_many_spellings, "refuse"),
    "hub_shard_two_spellings": (hub_shard_many_spellings_valid, "either"),
    "hub_deep_index": (hub_deep_index, "refuse"),
    "dcp_deep_planner_path": (dcp_deep_planner_path, "either"),
    "dcp_deep_nesting": (dcp_deep_nesting, "refuse"),
    "dcp_huge_chunk_list": (dcp_huge_chunk_list, "either"),
    "dcp_offset_past_end": (dcp_offset_past_end, "refuse"),
    "dcp_offset_overflow": (dcp_offset_overflow, "refuse"),
    "dcp_deflated_items": (dcp_deflated_items, "refuse"),
    "deepspeed_latest_outside": (deepspeed_latest_outside, "refuse"),
    "deepspeed_latest_absolute": (deepspeed_latest_absolute, "refuse"),
    "deepspeed_symlink_loop": (deepspeed_symlink_loop, "refuse"),
    "deepspeed_tag_symlink_to_parent": (deepspeed_tag_symlink_to_parent, "either"),
    "deepspeed_deflated_pt": (deepspeed_deflated_pt, "refuse"),
    "deepspeed_deflated_pickle_only": (deepspeed_deflated_pickle_only, "either"),
}
