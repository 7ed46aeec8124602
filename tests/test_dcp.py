"""Distributed checkpoint (DCP) folders, written by torch's own writers: ``dcp.save`` in one process, a
2-process FSDP2 save (gloo, CPU device mesh), the safetensors serialization and a stream-transform
extension; then damaged and hostile folders. Values are compared exactly with the tensors saved."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint._extension import StreamTransformExtension
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import ckptviz as cv
from ckptviz.readers.dcp import dcp_folder_of, is_dcp_folder, read_dcp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # dcp.save without a process group says so


def save(state: dict, folder: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), **kw)
    return folder


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def trained(model: torch.nn.Module) -> torch.optim.Adam:
    """One real Adam step, so that the optimizer has state."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    model.eval()
    return opt


def _nonzero(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if v}


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """(folder, model, optimizer) of ``dcp.save({"model", "optim", "step", ...})`` in one process."""
    model = net()
    opt = trained(model)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 5,
             "run": {"name": "demo", "lrs": [0.1, 0.01]}}
    return save(state, tmp_path / "ckpt"), model, opt


# ---- one process: listing, values, compare, load ---------------------------------------------------
def test_lists_tensors_sections_and_metadata(saved):
    folder, model, _ = saved
    ck = cv.open_checkpoint(folder)
    assert ck.format == "dcp"
    assert ck.sections == ["model"] and ck.optimizer_sections == ["optim"]
    frame = ck.tensors()
    sd = model.state_dict()
    assert list(frame.index) == list(sd)
    assert frame["shape"].tolist() == [tuple(v.shape) for v in sd.values()]
    assert frame["dtype"].tolist() == [str(v.dtype).removeprefix("torch.") for v in sd.values()]
    assert set(frame["file"]) == {"__0_0.distcp"}
    assert ck.files == [str(folder / ".metadata"), str(folder / "__0_0.distcp")]
    assert ck.metadata["step"] == 5 and ck.metadata["run"] == {"name": "demo", "lrs": [0.1, 0.01]}
    facts = ck.metadata["dcp"]
    assert facts["version"] == "1.0.0" and facts["files"] == 1 and facts["planner_data"] is True
    assert facts["tensors"] == len(sd) + 3 * len(list(model.parameters()))  # Adam: step, exp_avg, exp_avg_sq
    assert facts["storage_meta"]["checkpoint_id"] == str(folder)


def test_values_are_exact_and_single_chunks_are_views(saved):
    folder, model, _ = saved
    ck = cv.open_checkpoint(folder)
    got = ck.state_dict()
    for key, want in model.state_dict().items():
        assert got[key].dtype == want.dtype and torch.equal(got[key], want), key
    assert ck.tensor("1.num_batches_tracked").item() == 1


def test_one_byte_tensors_are_zero_copy_views_of_one_map(tmp_path):
    """Byte-wide dtypes are always aligned, so with copy=False each tensor is a view of the one private map
    of the file: the distance between two tensors' data equals the distance between their bytes in the
    .distcp."""
    torch.manual_seed(0)
    state = {"a": torch.arange(200, dtype=torch.uint8), "b": torch.arange(-50, 50, dtype=torch.int8),
             "c": torch.linspace(0, 1, 7), "big": torch.randint(0, 255, (1100, 1024), dtype=torch.uint8)}
    folder = save(state, tmp_path / "bytes")
    ck = cv.open_checkpoint(folder)
    sd = ck.state_dict(copy=False)
    assert all(torch.equal(sd[k], v) for k, v in state.items())
    offsets = _data_offsets(folder)
    assert sd["b"].data_ptr() - sd["a"].data_ptr() == offsets["b"] - offsets["a"]
    assert sd["big"].data_ptr() - sd["a"].data_ptr() == offsets["big"] - offsets["a"]  # over 1 MB: read in place
    sd["a"].fill_(0)  # private map: the file and later reads keep the saved values
    assert torch.equal(ck.tensor("a"), state["a"])


def _data_offsets(folder: Path) -> dict[str, int]:
    """Where each tensor's bytes start in its .distcp, found with torch's reader and zipfile."""
    import zipfile

    md = dcp.FileSystemReader(str(folder)).read_metadata()
    out = {}
    for index, info in md.storage_data.items():
        if index.offset is None:
            continue
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            entry = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
            head = blob[entry.header_offset: entry.header_offset + 30]
            start = entry.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30],
                                                                                                    "little")
        out[index.fqn] = info.offset + start
    return out


def test_compare_load_partial_and_forward(saved):
    folder, model, _ = saved
    fresh = net().eval()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    rep = cv.compare(fresh, folder)
    assert _nonzero(rep.summary) == {"match": len(model.state_dict())}
    res = cv.load_partial(fresh, rep)
    assert len(res.loaded) == len(model.state_dict())
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))

    code = cv.torch_code(res)  # the same load in plain PyTorch, through torch's own DCP reader
    assert "FileSystemReader" in code and 'sd = ckpt["model"]' in code
    twin = net().eval()
    exec(code, {"model": twin})
    assert torch.equal(twin(x), model(x))


def test_load_optimizer_restores_adam(saved):
    folder, model, opt = saved
    twin = net()
    cv.load_partial(twin, cv.compare(twin, folder))
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    info = cv.load_optimizer(twin_opt, folder)
    assert info == {"groups": 1, "params": 6, "params_with_state": 6}
    for p, q in zip(model.parameters(), twin.parameters()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][name], twin_opt.state[q][name]), name
    for m, o in ((model, opt), (twin, twin_opt)):  # the next step is the same on both
        m.train()
        o.zero_grad()
        torch.manual_seed(3)
        m(torch.randn(5, 8)).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_flat_state_dict_is_the_top_section(tmp_path):
    model = net()
    folder = save(model.state_dict(), tmp_path / "flat")
    ck = cv.open_checkpoint(folder)
    assert ck.sections == [""] and ck.optimizer_sections == []
    assert list(ck.state_dict("")) == list(model.state_dict())
    assert _nonzero(cv.compare(net(), folder).summary) == {"match": len(model.state_dict())}


def test_without_planner_data_keys_are_taken_as_saved(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4), "s": 3}
    folder = save(state, tmp_path / "noflat", planner=DefaultSavePlanner(flatten_state_dict=False))
    ck = cv.open_checkpoint(folder)
    assert ck.metadata["dcp"]["planner_data"] is False
    assert ck.sections == [""] and torch.equal(ck.tensor("w"), state["w"]) and ck.metadata["s"] == 3


def test_a_missing_folder(tmp_path):
    with pytest.raises(cv.CheckpointNotFoundError, match="no such folder"):
        read_dcp(tmp_path / "nowhere")


def test_open_through_metadata_or_distcp_path(saved):
    folder = saved[0]
    for path in (folder, folder / ".metadata", folder / "__0_0.distcp", str(folder)):
        assert is_dcp_folder(path) and dcp_folder_of(path) == str(folder)
        assert cv.open_checkpoint(path).sections == ["model"]
    assert not is_dcp_folder(folder.parent) and dcp_folder_of(folder / "nothing.pt") is None


def test_listing_reads_only_the_metadata(tmp_path):
    """With the .distcp overwritten by zeros (same size), listing works; reading says which file is bad."""
    model = net()
    folder = save({"model": model.state_dict()}, tmp_path / "only")
    distcp = folder / "__0_0.distcp"
    distcp.write_bytes(bytes(distcp.stat().st_size))
    ck = cv.open_checkpoint(folder)
    assert len(ck.tensors()) == len(model.state_dict())
    with pytest.raises(cv.CorruptCheckpointError, match="__0_0.distcp"):
        ck.tensor("0.weight")


def test_big_byte_items_are_skipped_and_said(tmp_path):
    folder = save({"model": net().state_dict(), "blob": b"x" * (5 * 2**20), "epoch": 2}, tmp_path / "blob")
    ck = cv.open_checkpoint(folder)
    skipped = ck.metadata["dcp"]["skipped_byte_items"]
    assert skipped["keys"] == ["blob"] and skipped["bytes"] > 5 * 2**20
    assert "blob" not in ck.metadata and ck.metadata["epoch"] == 2


def test_safetensors_serialization(tmp_path):
    state = {"model": {"w": torch.randn(3, 4), "i": torch.arange(5)}, "note": "st"}
    writer = dcp.FileSystemWriter(str(tmp_path / "st"), serialization_format=SerializationFormat.SAFETENSORS)
    folder = save(state, tmp_path / "st", storage_writer=writer)
    ck = cv.open_checkpoint(folder)
    sd = ck.state_dict("model")
    assert all(torch.equal(sd[k], v) for k, v in state["model"].items()) and ck.metadata["note"] == "st"


class Gzip(StreamTransformExtension):
    """A stream transform (compression) through DCP's extension API."""

    @staticmethod
    def registry_name() -> str:
        return "test.gzip"

    @staticmethod
    def from_descriptor(version: str) -> Gzip:
        return Gzip()

    def get_descriptor(self) -> str:
        return "test.gzip/1"

    def transform_to(self, output):
        return gzip.GzipFile(fileobj=output, mode="wb")

    def transform_from(self, input):
        return gzip.GzipFile(fileobj=input, mode="rb")


def test_stream_transforms_are_refused_clearly(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "epoch": 1}
    writer = dcp.FileSystemWriter(str(tmp_path / "gz"), _extensions=[Gzip()])
    folder = save(state, tmp_path / "gz", storage_writer=writer)
    ck = cv.open_checkpoint(folder)
    assert ck.tensors()["shape"].tolist() == [(3, 4)]
    assert ck.metadata["dcp"]["skipped_byte_items"]["keys"] == ["epoch"]
    with pytest.raises(cv.UnknownFormatError, match=r"test\.gzip/1"):
        ck.tensor("w")


def test_torch_can_still_read_the_folder(saved):
    folder, model, _ = saved
    before = snapshot(folder)
    ck = cv.open_checkpoint(folder)
    ck.state_dict()
    cv.load_optimizer(torch.optim.Adam(net().parameters()), ck)
    assert snapshot(folder) == before
    target = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(folder)))
    assert all(torch.equal(target["model"][k], v) for k, v in model.state_dict().items())


# ---- two processes: FSDP2 shards, several chunks per tensor, one file per rank ---------------------
def _fsdp_worker(rank: int, world: int, folder: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                                    torch.nn.Linear(5, 1))  # 5 and 1 rows: uneven and empty shards
        torch.manual_seed(0)
        model = _init(model)
        for layer in (model[0], model[2], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        msd, osd = get_state_dict(model, opt)
        torch.manual_seed(2)
        table = torch.randn(4, 6)
        extra = {"columns": distribute_tensor(table, mesh, [Shard(1)]),
                 "replicated": distribute_tensor(table, mesh, [Replicate()])}
        dcp.save({"model": msd, "optim": osd, "extra": extra, "step": 5}, checkpoint_id=folder)
        full = {"model": {k: v.full_tensor() for k, v in msd.items()}, "extra": {"table": table},
                "optim": {k: {n: v.full_tensor() if hasattr(v, "full_tensor") else v for n, v in s.items()}
                          for k, s in osd["state"].items()}}
        if rank == 0:
            torch.save(full, os.path.join(os.path.dirname(folder), "full.pt"))
    finally:
        dist.destroy_process_group()


def _init(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1))
    return model


def _plain_model() -> torch.nn.Module:
    return _init(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                                     torch.nn.Linear(5, 1)))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A real 2-rank FSDP2 checkpoint. The ranks are forked (they inherit the imported torch modules;
    spawning re-imports torch in each rank, 20 s more on two cores)."""
    root = tmp_path_factory.mktemp("fsdp")
    folder = root / "ckpt"
    port = 29500 + os.getpid() % 1000
    start = time.perf_counter()
    context = mp.start_processes(_fsdp_worker, args=(2, str(folder), port), nprocs=2, join=False,
                                 start_method="fork")
    while not context.join(timeout=60):
        if time.perf_counter() - start > 180:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process FSDP2 save did not finish in 180 s")
    return folder, torch.load(root / "full.pt")


def test_sharded_fsdp2_chunks_assemble_to_full_tensors(sharded):
    folder, full = sharded
    ck = cv.open_checkpoint(folder)
    assert ck.metadata["dcp"]["files"] == 2
    assert sorted(os.path.basename(f) for f in ck.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    assert all(len(md.state_dict_metadata[f"model.{k}"].chunks) == 2 for k in full["model"])
    sd = ck.state_dict("model")
    assert list(sd) == list(full["model"])
    assert all(torch.equal(sd[k], v) for k, v in full["model"].items())
    extra = ck.state_dict("extra")
    assert torch.equal(extra["columns"], full["extra"]["table"])
    assert torch.equal(extra["replicated"], full["extra"]["table"])
    assert ck.metadata["step"] == 5
    assert _nonzero(cv.compare(_plain_model(), folder).summary) == {"match": 6}


def test_sharded_optimizer_restores_into_a_plain_adam(sharded):
    folder, full = sharded
    model = _plain_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cv.load_optimizer(opt, folder)
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], full["optim"][name][key]), (name, key)


# ---- damaged folders ---------------------------------------------------------------------------
def test_missing_distcp_is_named(sharded, tmp_path):
    folder = shutil.copytree(sharded[0], tmp_path / "copy")
    (folder / "__1_0.distcp").unlink()
    with pytest.raises(cv.CheckpointNotFoundError, match=r"__1_0\.distcp: missing"):
        cv.open_checkpoint(folder)


def test_truncated_distcp_is_named_at_open(saved):
    folder = saved[0]
    distcp = folder / "__0_0.distcp"
    with open(distcp, "r+b") as f:
        f.truncate(distcp.stat().st_size - 100)
    with pytest.raises(cv.CorruptCheckpointError, match=r"__0_0\.distcp: holds .* truncated"):
        cv.open_checkpoint(folder)


def test_file_cut_after_open_is_refused_not_a_crash(saved):
    folder, model, _ = saved
    ck = cv.open_checkpoint(folder)
    distcp = folder / "__0_0.distcp"
    with open(distcp, "r+b") as f:
        f.truncate(distcp.stat().st_size // 2)
    with pytest.raises(cv.CorruptCheckpointError, match="changed on disk"):
        ck.state_dict()


def test_missing_metadata_says_the_save_did_not_finish(saved):
    folder = saved[0]
    (folder / ".metadata").unlink()
    with pytest.raises(cv.CorruptCheckpointError, match="without .metadata"):
        cv.open_checkpoint(folder)


def _rewrite(folder: Path, change) -> None:
    """Edit a real .metadata (loaded with torch's classes, as a test may for a file it wrote)."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("where", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.distcp"])
def test_paths_outside_the_folder_are_refused(saved, where):
    folder = saved[0]

    def change(md):
        info = next(iter(md.storage_data.values()))
        info.relative_path = where

    _rewrite(folder, change)
    with pytest.raises(cv.CorruptCheckpointError, match="not inside the checkpoint folder"):
        cv.open_checkpoint(folder)


def test_chunk_with_other_bytes_is_caught_at_read(saved):
    """Two entries' byte ranges swapped: each chunk's zip is valid but holds another tensor."""
    folder = saved[0]

    def change(md):
        infos = {i.fqn: v for i, v in md.storage_data.items()}
        a, b = infos["model.0.weight"], infos["model.0.bias"]
        (a.offset, a.length), (b.offset, b.length) = (b.offset, b.length), (a.offset, a.length)

    _rewrite(folder, change)
    ck = cv.open_checkpoint(folder)
    with pytest.raises(cv.CorruptCheckpointError, match=r"__0_0\.distcp: the chunk of 'model.0.weight'.*shape \[6\]"):
        ck.tensor("0.weight")


def test_garbage_inside_a_chunk_is_caught_at_read(saved):
    folder = saved[0]
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    info = next(v for i, v in md.storage_data.items() if i.fqn == "model.0.weight")
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length - 22)  # the zip's end-of-central-directory record
        f.write(b"\xff" * 22)
    ck = cv.open_checkpoint(folder)
    with pytest.raises(cv.CorruptCheckpointError, match=r"__0_0\.distcp: the chunk of 'model.0.weight'"):
        ck.tensor("0.weight")
    assert torch.equal(ck.tensor("0.bias"), saved[1].state_dict()["0.bias"])


def test_truncated_metadata(saved):
    folder = saved[0]
    meta = folder / ".metadata"
    meta.write_bytes(meta.read_bytes()[:-200])
    with pytest.raises(cv.CorruptCheckpointError, match="metadata is truncated or corrupted"):
        cv.open_checkpoint(folder)


# ---- hostile .metadata and byte items: the payload is live under pickle, inert under ckptviz -------
class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _live(data: bytes, marker: Path) -> None:
    """Prove the payload is real: plain pickle runs it."""
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()


class _DisguisingPickler(pickle._Pickler):
    """Writes ``os.system`` as the global ``torch.distributed.checkpoint.filesystem`` / ``os.system``:
    a DCP module name that resolves to something else."""

    def save_global(self, obj, name=None):
        if obj is os.system:
            self.save("torch.distributed.checkpoint.filesystem")
            self.save("os.system")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _disguised(obj) -> bytes:
    buf = io.BytesIO()
    _DisguisingPickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


def test_metadata_that_is_only_a_payload(saved, tmp_path):
    folder, marker = saved[0], tmp_path / "pwned"
    data = pickle.dumps(Payload(marker))
    _live(data, marker)
    (folder / ".metadata").write_bytes(data)
    for trust in (False, True):
        with pytest.raises(cv.CorruptCheckpointError, match=r"not the metadata.*posix\.system.*none of which was"):
            cv.open_checkpoint(folder, trust=trust)
    assert not marker.exists()


@pytest.mark.parametrize("disguise", [False, True])
def test_payload_inside_real_metadata(saved, tmp_path, disguise):
    folder, model, _ = saved
    marker = tmp_path / "pwned"
    md = pickle.loads((folder / ".metadata").read_bytes())
    md.version = Payload(marker)
    data = _disguised(md) if disguise else pickle.dumps(md)
    _live(data, marker)
    (folder / ".metadata").write_bytes(data)
    name = "torch.distributed.checkpoint.filesystem.os.system" if disguise else "posix.system"
    with pytest.raises(cv.UnsafeCheckpointError) as err:
        cv.open_checkpoint(folder)
    assert err.value.globals == [name]  # DCP's own classes are not listed; the disguised name is
    ck = cv.open_checkpoint(folder, trust=True)  # even trusted, nothing is built or run
    assert not marker.exists()
    assert torch.equal(ck.tensor("0.weight"), model.state_dict()["0.weight"])


def test_reduce_on_a_dcp_class_name_builds_nothing(saved, tmp_path):
    """A REDUCE of the name ``...metadata.Metadata`` with a shell command as argument stays a record."""
    folder = saved[0]
    def text(t: str) -> bytes:
        return b"\x8c" + bytes([len(t)]) + t.encode()

    data = (b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("Metadata") + pickle.STACK_GLOBAL
            + text("touch /tmp/never") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    assert type(pickle.loads(data)).__name__ == "Metadata"  # plain pickle builds the real class
    (folder / ".metadata").write_bytes(data)
    with pytest.raises(cv.CorruptCheckpointError, match="not the metadata"):
        cv.open_checkpoint(folder, trust=True)


def test_hostile_byte_item(tmp_path):
    """dcp.save torch.saves non-tensor values; torch's loader unpickles them with weights_only=False."""
    marker = tmp_path / "pwned"
    model = net()
    folder = save({"model": model.state_dict(), "evil": Payload(marker)}, tmp_path / "evil")
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    info = next(v for i, v in md.storage_data.items() if i.fqn == "evil")
    with open(folder / info.relative_path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    torch.load(io.BytesIO(blob), weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(cv.UnsafeCheckpointError, match=r"posix\.system"):
        cv.open_checkpoint(folder)
    ck = cv.open_checkpoint(folder, trust=True)
    assert not marker.exists()
    assert ck.metadata["evil"]["__class__"] == "posix.system"
    assert torch.equal(ck.tensor("0.weight"), model.state_dict()["0.weight"])


def test_tensor_entry_pointing_at_a_payload(tmp_path):
    """A tensor's storage entry redirected to the bytes of a hostile object: refused when read, never run."""
    marker = tmp_path / "pwned"
    folder = save({"model": net().state_dict(), "evil": Payload(marker)}, tmp_path / "evil")

    def change(md):
        infos = {i.fqn: v for i, v in md.storage_data.items()}
        infos["model.0.weight"].offset, infos["model.0.weight"].length = infos["evil"].offset, infos["evil"].length

    _rewrite(folder, change)
    ck = cv.open_checkpoint(folder, trust=True)
    with pytest.raises(cv.CorruptCheckpointError, match=r"posix\.system"):
        ck.tensor("0.weight")
    assert not marker.exists()


def _first_tensor(md):
    return next(v for k, v in md.state_dict_metadata.items() if k == "model.0.weight")


def _first_info(md):
    return next(v for k, v in md.storage_data.items() if k.fqn == "model.0.weight")


DAMAGES = {
    "storage_data is a list": lambda md: setattr(md, "storage_data", []),
    "an entry is a string": lambda md: md.state_dict_metadata.__setitem__("model.0.weight", "weight"),
    "a negative size": lambda md: setattr(_first_tensor(md), "size", torch.Size([-6, 8])),
    "chunk offsets of strings": lambda md: setattr(_first_tensor(md).chunks[0], "offsets", ["a", "b"]),
    "a chunk smaller than its tensor": lambda md: setattr(_first_tensor(md).chunks[0], "sizes", torch.Size([3, 8])),
    "relative_path is a number": lambda md: setattr(_first_info(md), "relative_path", 5),
    "a negative offset": lambda md: setattr(_first_info(md), "offset", -10),
    "a length that is text": lambda md: setattr(_first_info(md), "length", "many"),
    "transform_descriptors is a number": lambda md: setattr(_first_info(md), "transform_descriptors", 5),
    "the dtype is a string": lambda md: setattr(_first_tensor(md).properties, "dtype", "float32"),
    "the dtype is a list": lambda md: setattr(_first_tensor(md).properties, "dtype", [torch.float32]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_metadata_fields_give_ckptviz_errors(saved, damage):
    """Each damage either fails at open or when the tensor is read, always as a CheckpointError naming
    a file of the folder; the undamaged tensors of a folder that opens still read exactly."""
    folder, model, _ = saved
    _rewrite(folder, DAMAGES[damage])
    with pytest.raises(cv.CheckpointError, match=str(folder)):
        ck = cv.open_checkpoint(folder)
        assert torch.equal(ck.tensor("0.bias"), model.state_dict()["0.bias"])
        ck.tensor("0.weight")


def test_damaged_planner_data_falls_back_to_the_saved_keys(saved):
    folder, model, _ = saved
    _rewrite(folder, lambda md: md.planner_data.__setitem__("model.0.weight", ("model", ["0", "weight"])))
    ck = cv.open_checkpoint(folder)
    assert torch.equal(ck.tensor("model.0.weight", ""), model.state_dict()["0.weight"])
    assert "0.weight" not in ck.tensors("model").index


def test_lightning_meta_pt_beside_the_folder(saved):
    """Lightning's FSDP strategy (state_dict_type="sharded") torch.saves its non-tensor state as meta.pt
    next to the DCP files; it is read with the safe unpickler into ck.metadata."""
    folder = saved[0]
    torch.save({"epoch": 3, "global_step": 30, "hyper_parameters": {"lr": 0.01}}, folder / "meta.pt")
    ck = cv.open_checkpoint(folder)
    assert ck.metadata["epoch"] == 3 and ck.metadata["hyper_parameters"] == {"lr": 0.01}
    assert ck.files[-1] == str(folder / "meta.pt") and ck.metadata["step"] == 5
    (folder / "meta.pt").write_bytes((folder / "meta.pt").read_bytes()[:50])  # cut off: said, weights still open
    ck = cv.open_checkpoint(folder)
    assert ck.metadata["meta.pt"].startswith("unreadable") and len(ck.state_dict()) == 9
    torch.save({"callbacks": Payload(folder / "pwned")}, folder / "meta.pt")
    with pytest.raises(cv.UnsafeCheckpointError, match=r"posix\.system"):
        cv.open_checkpoint(folder)
    assert not (folder / "pwned").exists()


def test_flattened_optimizer_state_as_torchtitan_saves_it(tmp_path):
    """get_state_dict(..., flatten_optimizer_state_dict=True) keys: state.<fqn>.<name> and
    param_groups.<fqn>.<hyper-parameter>; the groups come back from equal hyper-parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = net()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 0.1},
                            {"params": [*model[1].parameters(), *model[3].parameters()]}], lr=1e-2)
    torch.manual_seed(1)
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert "state.0.weight.exp_avg" in osd and "param_groups.0.weight.lr" in osd
    folder = save({"model": msd, "optimizer": osd, "train_state": {"step": 7}}, tmp_path / "titan")
    ck = cv.open_checkpoint(folder)
    assert ck.sections == ["model"] and ck.optimizer_sections == ["optimizer"] and ck.metadata["train_state"]
    twin = net()
    twin_opt = torch.optim.Adam([{"params": twin[0].parameters(), "lr": 0.1},
                                 {"params": [*twin[1].parameters(), *twin[3].parameters()]}], lr=1e-2)
    assert cv.load_optimizer(twin_opt, folder) == {"groups": 2, "params": 6, "params_with_state": 6}
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], twin_opt.state[q]["exp_avg_sq"])
    assert [g["lr"] for g in twin_opt.param_groups] == [0.1, 1e-2]


# ---- declared sizes bounded (issue 8): planner paths and chunk lists ------------------------------------
def test_a_planner_path_longer_than_any_state_dict_nests_is_not_rebuilt_as_a_tree(tmp_path):
    """planner_data placing a byte item 100,000 levels deep: the item's fqn is used instead of a tree
    that deep (which every later walk of the metadata would have to recurse through)."""
    from ckptviz.readers import dcp_layout
    from tests.fuzz.bombs import dcp_deep_planner_path

    folder = dcp_deep_planner_path(tmp_path)
    ck = cv.open_checkpoint(folder)
    assert ck.metadata["step"] == 3 and ck.metadata["extra"] == {"a": [1, 2]}
    assert torch.equal(ck.tensor("w", section="model"), torch.load(_item_zip(folder, "model.w")))
    assert dcp_layout.paths_of(["x"], {"x": ("a",) * (dcp_layout.MAX_PATH_LENGTH + 1)}) == [("x",)]
    assert dcp_layout.paths_of(["x"], {"x": ("a", "b")}) == [("a", "b")]


def _item_zip(folder: Path, fqn: str) -> io.BytesIO:
    """The torch.save bytes DCP wrote for ``fqn`` (read with torch, as the reference)."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    info = next(v for k, v in md.storage_data.items() if k.fqn == fqn)
    data = (folder / info.relative_path).read_bytes()
    return io.BytesIO(data[info.offset:info.offset + info.length])


def test_a_chunk_list_past_max_chunks_is_a_limit_error_that_can_be_raised(tmp_path, monkeypatch):
    """A tensor declaring more chunks than MAX_CHUNKS (here: 40 empty ones shared through the memo, as a
    4 MB file can declare millions) is refused when read, naming the limit; raised, it reads."""
    from ckptviz.readers import dcp as dcp_reader
    from tests.fuzz.bombs import _dcp

    def edit(md, _folder):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        entry = md.state_dict_metadata["model.w"]
        entry.chunks = entry.chunks + [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([0, 3]))] * 40

    folder = _dcp(tmp_path, "chunks", edit)
    want = torch.load(_item_zip(folder, "model.w"))
    monkeypatch.setattr(dcp_reader, "MAX_CHUNKS", 32)
    ck = cv.open_checkpoint(folder)
    with pytest.raises(cv.CheckpointLimitError, match=r"41 chunks.*ckptviz\.readers\.dcp\.MAX_CHUNKS = 32"):
        ck.tensor("w", section="model")
    monkeypatch.setattr(dcp_reader, "MAX_CHUNKS", 64)
    assert torch.equal(ck.tensor("w", section="model"), want)


def test_metadata_holding_a_tensor_storage_is_refused(tmp_path):
    """A .metadata whose pickle refers to a tensor storage (DCP never writes one there: its tensors are
    in the .distcp files) is corrupt; it was a raw AttributeError when the state was read."""
    folder = save({"model": {"w": torch.randn(4)}}, tmp_path / "ck")
    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    marker = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is marker else None

    meta.planner_data = {"model.w": [marker]}
    with open(folder / ".metadata", "wb") as f:
        Pickler(f).dump(meta)
    with pytest.raises(cv.CorruptCheckpointError, match="metadata holds tensor storages"):
        cv.open_checkpoint(folder)


def test_tensors_inside_byte_items_read_their_own_bytes(tmp_path):
    """A value DCP saves as a byte item (a tuple holding a tensor) materializes with the tensor's values;
    its storage reads from the item's bytes (it was a raw AttributeError: a storage with no file)."""
    folder = save({"m": {"w": torch.randn(2)}, "cfg": {"t": (torch.arange(3.0), 1)}}, tmp_path / "ck")
    ck = cv.open_checkpoint(folder)
    got = ck.materialize(ck._root["cfg"])
    assert torch.equal(got["t"][0], torch.arange(3.0)) and got["t"][1] == 1


def test_a_damaged_entry_inside_a_byte_item_is_a_clean_error(saved):
    """The non-tensor items of a .distcp are torch.save zips; one whose byteorder entry claims deflate
    (raw zlib errors inside zipfile) is a CorruptCheckpointError naming the file and the item."""
    folder = saved[0]
    distcp = next(folder.glob("*.distcp"))
    data = bytearray(distcp.read_bytes())
    name, hits = b"byteorder", 0
    for sig, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers
        at = data.find(sig)
        while at >= 0:
            name_at = at + (30 if sig == b"PK\x03\x04" else 46)
            length = int.from_bytes(data[at + method_at + 18:at + method_at + 20], "little") if sig == b"PK\x03\x04" \
                else int.from_bytes(data[at + 28:at + 30], "little")
            if bytes(data[name_at:name_at + length]).endswith(name):
                data[at + method_at:at + method_at + 2] = (8).to_bytes(2, "little")
                hits += 1
            at = data.find(sig, at + 4)
    assert hits >= 2
    distcp.write_bytes(bytes(data))
    with pytest.raises(cv.CorruptCheckpointError, match="byteorder does not inflate") as err:
        cv.open_checkpoint(folder)
    assert str(distcp) in str(err.value) and "Traceback" not in str(err.value)
