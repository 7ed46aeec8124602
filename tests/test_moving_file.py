"""A checkpoint file that changes while it is open (issue 8, items 2 and 6): reads through the old layout
are refused, and ``copy=True`` reads never fault, even while a real ``torch.save`` rewrites the file."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import ckptviz
from ckptviz.errors import CheckpointError

FMTS = ["torch", "legacy", "safetensors"]


def _save(path, fmt, scale=1.0, extra=False):
    state = {"a": torch.arange(4096.0) * scale, "b": torch.ones(64, 64) * scale}
    if extra:
        state = {"z": torch.full((7,), 1e29), **state}
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("fmt", FMTS)
def test_an_atomic_replace_is_refused_even_with_the_same_size_and_mtime(tmp_path, fmt):
    path = tmp_path / f"ck.{fmt}"
    _save(path, fmt)
    ck = ckptviz.open_checkpoint(path)
    st = os.stat(path)
    (tmp_path / "new").mkdir()
    tmp = tmp_path / "new" / path.name  # same name: torch.save names the archive after the file
    _save(tmp, fmt, scale=2.0)
    assert os.path.getsize(tmp) == st.st_size
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    for read in (lambda: ck.tensor("a"), lambda: ck.tensor("a", copy=True), ck.stats, lambda: ck.histogram("b")):
        with pytest.raises(CheckpointError, match="changed on disk.*replaced by another file"):
            read()


@pytest.mark.parametrize("fmt", FMTS)
def test_a_resave_with_a_new_layout_never_reads_new_bytes_through_the_old_one(tmp_path, fmt):
    path = tmp_path / f"ck.{fmt}"
    _save(path, fmt)
    ck = ckptviz.open_checkpoint(path)
    _save(path, fmt, extra=True)  # in place, one tensor added: every offset moves
    with pytest.raises(CheckpointError, match="changed on disk"):
        ck.stats()
    model = torch.nn.Module()
    model.register_buffer("a", torch.zeros(4096))
    with pytest.raises(CheckpointError, match="changed on disk"):
        ckptviz.load_partial(model, ckptviz.compare(model, ck))
    assert torch.equal(model.a, torch.zeros(4096))


@pytest.mark.parametrize("fmt", FMTS)
def test_tensors_read_with_copy_survive_truncation_and_resave(tmp_path, fmt):
    path = tmp_path / f"ck.{fmt}"
    _save(path, fmt)
    ck = ckptviz.open_checkpoint(path)
    held = ck.state_dict(copy=True)
    one = ck.tensor("a", copy=True)
    os.truncate(path, 100)
    assert torch.equal(held["a"], torch.arange(4096.0)) and torch.equal(one, torch.arange(4096.0))
    assert torch.equal(held["b"], torch.ones(64, 64))
    with pytest.raises(CheckpointError, match="changed on disk"):
        ck.tensor("a", copy=True)
    _save(path, fmt, scale=3.0)
    assert torch.equal(held["a"], torch.arange(4096.0))


READER = textwrap.dedent("""
    import sys, ckptviz
    from ckptviz.errors import CheckpointError
    ok = refused = 0
    for _ in range(int(sys.argv[2])):
        try:
            ck = ckptviz.open_checkpoint(sys.argv[1])
            for k in ck.tensors().index if ck.tensors().index.name == "key" else ck.tensors()["key"]:
                ck.tensor(k, copy=True).sum()
            ok += 1
        except CheckpointError:
            refused += 1
    print(ok, refused)
""")


def _torch_save(obj, path) -> None:
    torch.save(obj, path)


def _race(path, script: str, runs: int, key: str, sizes: list[tuple[int, int]], save=_torch_save,
          cut: bool = False) -> None:
    """Run ``script`` (``runs`` rounds) in a child (so a SIGBUS shows as a signal, not a dead pytest)
    while real ``save`` calls (``torch.save`` by default) rewrite ``path``, now shorter, now longer
    (``cut``: each save is also truncated in place to half its size, then written again); the child
    must exit 0."""
    save({key: torch.randn(*sizes[0])}, path)
    child = subprocess.Popen([sys.executable, "-c", script, str(path), str(runs)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    i = 0
    while child.poll() is None:
        save({key: torch.randn(*sizes[i % len(sizes)])}, path)
        if cut:
            os.truncate(path, os.path.getsize(path) // 2)
            save({key: torch.randn(*sizes[i % len(sizes)])}, path)
        i += 1
    out, err = child.communicate()
    assert child.returncode == 0, (f"reader died with signal {signal.Signals(-child.returncode).name}"
                                   if child.returncode < 0 else err[-2000:])
    ok, refused = map(int, out.split())
    assert ok + refused == runs and i > 3


def test_reading_with_copy_while_torch_save_rewrites_the_file_never_faults(tmp_path):
    _race(tmp_path / "last.ckpt", READER, 300, "w", [(256, 1024), (8, 8), (512, 1024)])


VERBS = textwrap.dedent("""
    import sys, torch, ckptviz
    from ckptviz.errors import CheckpointError
    model = torch.nn.Linear(1024, 256, bias=False)
    before = model.weight.detach().clone()
    ok = refused = 0
    for i in range(int(sys.argv[2])):
        try:
            ck = ckptviz.open_checkpoint(sys.argv[1])
            verb = i % 4
            if verb == 0:
                ck.stats(progress=False)
            elif verb == 1:
                ck.histogram("weight")
            elif verb == 2:
                ckptviz.diff(ck, ck)
            else:
                ckptviz.load_partial(model, ckptviz.compare(model, ck)).undo()
            ok += 1
        except CheckpointError:
            refused += 1
        assert torch.equal(model.weight, before), "a failed or undone load changed the model"
    print(ok, refused)
""")


def test_stats_histogram_diff_and_load_while_torch_save_rewrites_the_file_never_fault(tmp_path):
    """The streaming verbs (stats, histogram, diff, compare + load_partial) race real ``torch.save``
    calls on the same path: errors are CheckpointErrors, never a signal."""
    _race(tmp_path / "last.ckpt", VERBS, 200, "weight", [(256, 1024), (8, 8), (256, 1024), (512, 1024)])


def test_big_parallel_reads_work_in_a_forked_child(tmp_path):
    """Reads above PARALLEL_READ use a thread pool; a child forked after the parent used it (a fork
    server, a multiprocessing or dask worker) gets a pool of its own instead of hanging on the copy."""
    from ckptviz.readers import mapped

    path = tmp_path / "big.pt"
    w = torch.randn(3 * mapped.PARALLEL_READ // 4 * 2)  # 1.5 x PARALLEL_READ bytes: split in two
    torch.save({"w": w}, path)
    ck = ckptviz.open_checkpoint(path)
    assert torch.equal(ck.tensor("w"), w) and mapped._pool_box  # the parent used the pool
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the read finished and is right
        signal.alarm(20)
        try:
            got = ckptviz.open_checkpoint(path).tensor("w")  # compared by numpy: torch's OpenMP is not fork-safe
            os._exit(0 if (got.numpy() == w.numpy()).all() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _legacy_save(obj, path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def test_legacy_files_rewritten_during_open_stats_and_load_never_fault(tmp_path):
    """A legacy (pre-zip) torch.save file is parsed through checked reads, not a map: opening it, and
    stats, histogram, diff and load_partial on it, while it is re-saved and cut short give
    CheckpointErrors, never a signal, never a model left changed."""
    _race(tmp_path / "last.pt", VERBS, 200, "weight", [(256, 1024), (8, 8), (512, 1024)], save=_legacy_save,
          cut=True)


def _pickle_save(obj, path) -> None:
    """A plain pickle of plain data (a big list), as pickle.dump writes it."""
    (key, value), = obj.items()
    path.write_bytes(pickle.dumps({key: value.reshape(-1).tolist(), "step": 3}, protocol=4))


OPENER = textwrap.dedent("""
    import sys, ckptviz
    from ckptviz.errors import CheckpointError, NoTensorsError
    ok = refused = 0
    for _ in range(int(sys.argv[2])):
        try:
            ckptviz.open_checkpoint(sys.argv[1])
            ok += 1
        except NoTensorsError:  # the whole pickle was read: it holds plain data only
            ok += 1
        except CheckpointError:  # changed on disk, cut short, empty, not yet a pickle
            refused += 1
    print(ok, refused)
""")


def test_plain_pickles_rewritten_during_open_never_fault(tmp_path):
    """A plain pickle is read through checked reads too: a rewrite or a cut during the parse is a
    CheckpointError, never a SIGBUS."""
    _race(tmp_path / "state.pkl", OPENER, 300, "w", [(64, 1024), (8, 8), (128, 1024)], save=_pickle_save,
          cut=True)


@pytest.mark.parametrize("fmt", ["legacy", "pickle"])
def test_opening_and_reading_never_maps_the_file(fmt, tmp_path):
    """Only ``copy=False`` maps a file; opening a legacy torch file or a plain pickle reads it."""
    path = tmp_path / f"ck.{fmt}"
    if fmt == "pickle":
        _pickle_save({"w": torch.ones(8, 8)}, path)
    else:
        _save(path, fmt)
    try:
        ck = ckptviz.open_checkpoint(path)
        ck.stats(progress=False)
        ck.tensor("a")
    except ckptviz.errors.NoTensorsError:
        assert fmt == "pickle"
    with open("/proc/self/maps") as f:
        assert str(path) not in f.read()


def test_a_legacy_file_cut_short_after_open_is_refused_not_read(tmp_path):
    path = tmp_path / "ck.pt"
    _save(path, "legacy")
    ck = ckptviz.open_checkpoint(path)
    os.truncate(path, os.path.getsize(path) - 100)
    for read in (lambda: ck.tensor("b"), lambda: ck.state_dict(copy=True), ck.stats):
        with pytest.raises(CheckpointError, match="changed on disk"):
            read()


@pytest.mark.parametrize("fmt", ["legacy", "torch"])
def test_zero_copy_reads_share_one_map_per_file(fmt, tmp_path):
    """``copy=False`` tensors are views of ONE private map of the file, however many there are (issue 8,
    item 11: not one map per tensor); a legacy file's storages at offsets unaligned for their dtype are
    copies instead (no map)."""
    path = tmp_path / f"many.{fmt}"
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(300)}
    torch.save(state, path, _use_new_zipfile_serialization=fmt == "torch")
    sd = ckptviz.open_checkpoint(path).state_dict(copy=False)
    with open("/proc/self/maps") as f:
        maps = [line for line in f if line.rstrip().endswith(str(path))]
    assert len(maps) == 1 if fmt == "torch" else len(maps) <= 1, maps
    assert all(torch.equal(sd[k], v) for k, v in state.items())
