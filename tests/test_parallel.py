"""Shard-parallel statistics, histograms and diffs: tasks by file, any executor (threads, a process
pool, a real dask.distributed LocalCluster on 127.0.0.1), and the same numbers bit for bit."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ckptviz as cv
from ckptviz.parallel import TASK_KEYS, plan


def _sharded(folder, sd: dict[str, torch.Tensor], shards: int):
    folder.mkdir()
    keys = list(sd)
    per = -(-len(keys) // shards)
    for s in range(shards):
        part = keys[s * per:(s + 1) * per]
        save_file({k: sd[k] for k in part}, folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two 4-shard folders of mixed dtypes (bf16, fp16, fp32, int64), the second a perturbed copy."""
    torch.manual_seed(0)
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.int64]
    sd = {}
    for i in range(40):
        dt = dtypes[i % 4]
        t = torch.randn(64, 48 + i) * (i + 1)
        sd[f"layers.{i}.weight"] = t.to(dt) if dt.is_floating_point else (t * 100).to(dt)
    sd["layers.6.weight"][0, :3] = float("nan")
    root = tmp_path_factory.mktemp("par")
    tuned = {k: v + 1 if i % 3 == 0 else v for i, (k, v) in enumerate(sd.items())}
    return _sharded(root / "a", sd, 4), _sharded(root / "b", tuned, 4), sd


def _same(a, b) -> bool:
    """Frames equal bit for bit (NaN in the same places)."""
    return list(a.index) == list(b.index) and list(a.columns) == list(b.columns) and all(
        np.array_equal(a[c].to_numpy(), b[c].to_numpy(), equal_nan=True) for c in a.columns
        if a[c].dtype.kind == "f") and all(a[c].equals(b[c]) for c in a.columns if a[c].dtype.kind != "f")


def test_tasks_follow_files_and_cap_their_size(folders):
    a, _, sd = folders
    ck = cv.open_checkpoint(a)
    tasks = plan(ck._section(""))
    files = ck.tensors()["file"]
    assert len(tasks) == 4 and [k for t in tasks for k in t] == list(ck.tensors().index)
    assert all(files[t].nunique() == 1 for t in tasks)
    many = cv.Checkpoint.from_mapping({f"t{i}": torch.zeros(1) for i in range(TASK_KEYS + 5)})
    assert [len(t) for t in plan(many._section(""))] == [TASK_KEYS, 5]


def test_stats_and_histograms_match_the_serial_pass(folders):
    a, _, sd = folders
    ck = cv.open_checkpoint(a)
    ticks = []
    stats = ck.stats(tick=ticks.append)
    assert ticks == sorted(ticks) and ticks[-1] == 1.0 and len(ticks) == 4
    serial = cv.stats_frame({k: ck.tensor(k) for k in stats.index})
    assert np.allclose(stats.to_numpy(), serial.to_numpy(), equal_nan=True, rtol=1e-12)
    assert stats.loc["layers.6.weight", "nan"] == 3
    hists = ck.histograms(bins=16)
    assert list(hists) == list(stats.index)
    one = ck.histogram("layers.5.weight", bins=16)
    assert np.array_equal(hists["layers.5.weight"].counts, one.counts)


def test_every_executor_gives_the_same_numbers(folders):
    a, b, _ = folders
    ck = cv.open_checkpoint(a)
    default = ck.stats()
    diff_default = cv.diff(a, b).frame
    with ThreadPoolExecutor(3) as pool:
        assert _same(cv.open_checkpoint(a).stats(executor=pool), default)
        assert _same(cv.diff(a, b, executor=pool).frame, diff_default)
    with ProcessPoolExecutor(2) as pool:  # checkpoints travel as "open this path again"
        assert _same(cv.open_checkpoint(a).stats(executor=pool), default)
        assert _same(cv.diff(a, b, executor=pool).frame, diff_default)
    changed = diff_default.set_index("key")["changed_frac"]
    assert changed["layers.0.weight"] > 0 and changed["layers.1.weight"] == 0


def test_dask_local_cluster_gives_the_same_numbers(folders):
    distributed = pytest.importorskip("distributed")
    a, b, _ = folders
    default = cv.open_checkpoint(a).stats()
    diff_default = cv.diff(a, b).frame
    hist_default = cv.open_checkpoint(a).histograms(bins=32)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        assert _same(cv.open_checkpoint(a).stats(executor=client), default)
        assert _same(cv.diff(a, b, executor=client).frame, diff_default)
        hists = cv.open_checkpoint(a).histograms(bins=32, executor=client.get_executor())
        assert all(np.array_equal(hists[k].counts, h.counts) and np.array_equal(hists[k].edges, h.edges)
                   for k, h in hist_default.items())
        workers = client.run(lambda: __import__("os").getpid())
        assert len(set(workers.values())) == 2


def test_checkpoint_pickles_as_a_reopen(folders, tmp_path):
    a, _, sd = folders
    ck = cv.open_checkpoint(a)
    back = pickle.loads(pickle.dumps(ck))
    assert back.path == ck.path and back.tensors().equals(ck.tensors())
    assert torch.equal(back.tensor("layers.3.weight"), sd["layers.3.weight"])


def test_bad_executor_is_refused(folders):
    with pytest.raises(TypeError, match="concurrent.futures.Executor"):
        cv.open_checkpoint(folders[0]).stats(executor="threads")


def test_default_executor_runs_small_items_in_the_calling_thread_and_big_ones_on_workers():
    """Many small items (under INLINE_BYTES each on average) run in the caller's thread, where worker
    threads would only contend for the GIL; big ones go to worker threads; the results are the same."""
    import threading

    from ckptviz import parallel

    def where(i):
        return i, threading.current_thread() is threading.main_thread(), torch.get_num_threads()

    small = parallel.run(where, [(i,) for i in range(4)], sizes=[1000] * 4, items=400)
    big = parallel.run(where, [(i,) for i in range(4)], sizes=[parallel.INLINE_BYTES * 200] * 4, items=400)
    assert [r[0] for r in small] == [r[0] for r in big] == [0, 1, 2, 3]
    assert all(r[1] for r in small) and not any(r[1] for r in big)
    assert {r[2] for r in small + big} == {1}  # one intra-op thread either way
