"""Shared references in a pickle ("billion laughs": a list that holds ten times the list below it, 30
levels deep, 10**30 paths in about 2 KB) and module trees that point at one child many times: every
verb visits each shared object once and returns, and a walk past a ``ckptviz.walk`` limit is a
``WalkLimitError`` naming the limit. Files are written by torch.save; each verb runs in a child
process with a timeout, so a regression shows as a failure, not as a hung test run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptviz as cv
from ckptviz import walk
from ckptviz.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def laughs(levels: int = 30, width: int = 10) -> list:
    x: list = [1]
    for _ in range(levels):
        x = [x] * width
    return x


def _adam_state() -> tuple[nn.Module, dict]:
    from test_consumer_errors import _adam

    return _adam()


@pytest.fixture
def bombs(tmp_path) -> dict[str, Path]:
    model, opt_sd = _adam_state()
    files = {}
    files["top"] = tmp_path / "top.pt"
    torch.save({"state_dict": model.state_dict(), "meta": laughs()}, files["top"])
    files["top2"] = tmp_path / "top2.pt"
    torch.save({"state_dict": {k: v + 1 for k, v in model.state_dict().items()}, "meta": laughs()}, files["top2"])
    opt_sd["state"][0]["junk"] = laughs()
    files["train"] = tmp_path / "train.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": opt_sd, "epoch": 3, "meta": {"history": laughs()}},
               files["train"])
    _, opt_sd = _adam_state()
    opt_sd["param_groups"][0]["betas"] = laughs()  # a hyper-parameter torch's Adam has, holding the bomb
    files["groups"] = tmp_path / "groups.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": opt_sd}, files["groups"])
    return files


def _in_child(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter importing this worktree's ckptviz; its stdout."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_the_bombs_are_real(bombs):
    """Control: the file is tiny, and what torch.load gives expands to 10**30 leaves when walked as a tree."""
    assert bombs["top"].stat().st_size < 4096
    loaded = torch.load(bombs["top"], weights_only=True)
    assert loaded["meta"][0] is loaded["meta"][9]  # shared, not copied: the memo at work
    with pytest.raises(walk.WalkLimitError, match="MAX_EXPANDED_NODES"):
        walk.expanded_size(loaded["meta"])


def test_every_verb_returns_on_shared_metadata(bombs):
    out = _in_child(f"""
        import torch, ckptviz as cv
        from ckptviz.widgets.inspector import CheckpointInspector as Inspector
        for trust in (False, True):
            ck = cv.open_checkpoint({str(bombs['top'])!r}, trust=trust)
            assert ck.sections == ['state_dict'], ck.sections
            text = repr(ck.metadata)
            assert 'MAX_DISPLAY_NODES' in text and len(text) < 5_000_000, len(text)
            html = ck._repr_html_() + Inspector._metadata_html(ck) + repr(ck)
            assert len(html) < 100_000
            copy = ck.materialize(ck._root)
            assert copy['meta'][0] is copy['meta'][5]  # shared in the copy too, as torch.load gives it
            leaf = copy['meta']
            for _ in range(30):
                leaf = leaf[7]
            assert leaf == [1]
            assert torch.equal(copy['state_dict']['weight'], torch.load({str(bombs['top'])!r})['state_dict']['weight'])
        rep = cv.diff({str(bombs['top'])!r}, {str(bombs['top2'])!r})
        assert rep.summary['both'] == 2, rep.summary
        t = cv.open_checkpoint({str(bombs['train'])!r})
        assert t.sections == ['state_dict'] and t.optimizer_sections == ['optimizer']
        assert t.metadata['epoch'] == 3
        print('ok')
    """)
    assert out.strip() == "ok"


def test_load_optimizer_refuses_a_bomb_in_state_and_in_groups(bombs):
    out = _in_child(f"""
        import torch, ckptviz as cv
        from ckptviz.errors import OptimizerMismatchError
        from ckptviz.walk import WalkLimitError
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(model.parameters())
        before = opt.state_dict()
        try:
            cv.load_optimizer(opt, {str(bombs['train'])!r})
        except OptimizerMismatchError as e:
            assert 'junk' in str(e) and 'parameter 0' in str(e), e
        else:
            raise AssertionError('accepted')
        try:
            cv.load_optimizer(opt, {str(bombs['groups'])!r})
        except WalkLimitError as e:
            assert 'MAX_EXPANDED_NODES' in str(e) and 'groups.pt' in str(e), e
        else:
            raise AssertionError('accepted')
        assert opt.state_dict() == before  # left as it was
        print('ok')
    """)
    assert out.strip() == "ok"


def _shared_tree(levels: int, width: int) -> nn.Module:
    """A real module tree whose every level registers ONE child module under ``width`` names."""
    level: nn.Module = nn.Linear(2, 2)
    for _ in range(levels):
        parent = nn.Module()
        for j in range(width):
            parent.add_module(f"c{j}", level)
        level = parent
    return level


def test_module_tree_pointing_at_one_child_many_times(tmp_path):
    bomb = tmp_path / "module_bomb.pt"
    torch.save(_shared_tree(30, 10), bomb)  # a whole nn.Module, 10**30 parameter paths
    assert bomb.stat().st_size < 20_000
    out = _in_child(f"""
        import ckptviz as cv
        from ckptviz.walk import WalkLimitError
        try:
            cv.open_checkpoint({str(bomb)!r}, trust=True)
        except WalkLimitError as e:
            assert 'MAX_WALK_NODES' in str(e) and 'module_bomb.pt' in str(e) and 'raise the limit' in str(e), e
            print('refused')
    """)
    assert out.strip() == "refused"


def test_a_tied_module_is_listed_under_each_name_like_torch(tmp_path):
    """The legitimate case of sharing: one child under two names gives both keys, as torch's state_dict."""
    model = _shared_tree(3, 2)
    path = tmp_path / "tied.pt"
    torch.save(model, path)
    ck = cv.open_checkpoint(path, trust=True)
    assert sorted(ck.tensors().index) == sorted(model.state_dict())
    got = ck.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v)


def test_a_module_that_contains_itself_opens(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3))
    model[0].loop = model  # torch's own state_dict() would recurse forever on this
    path = tmp_path / "cycle.pt"
    torch.save(model, path)
    ck = cv.open_checkpoint(path, trust=True)
    assert sorted(ck.tensors().index) == ["0.bias", "0.weight"]
    assert torch.equal(ck.tensor("0.weight"), model[0].weight.detach())


def test_limits_name_themselves_and_can_be_raised(tmp_path, monkeypatch):
    sd = {f"s{i}": {"w": torch.full((2,), float(i))} for i in range(40)}
    path = tmp_path / "many.pt"
    torch.save(sd, path)
    monkeypatch.setattr(walk, "MAX_WALK_NODES", 30)
    with pytest.raises(CheckpointError, match=r"ckptviz\.walk\.MAX_WALK_NODES = 30") as err:
        cv.open_checkpoint(path)
    assert str(path) in str(err.value)
    monkeypatch.setattr(walk, "MAX_WALK_NODES", 1000)  # the remedy the message names
    ck = cv.open_checkpoint(path)
    assert len(ck.sections) == 40
    distinct = [[i] for i in range(2000)]
    with pytest.raises(walk.WalkLimitError, match="MAX_WALK_NODES"):
        ck.materialize(distinct)
    monkeypatch.setattr(walk, "MAX_WALK_NODES", 10_000)
    assert ck.materialize(distinct) == distinct


def test_materialize_keeps_tied_tensors_shared(tmp_path):
    """Records over one storage are read once into one buffer, as torch.load shares them."""
    w = torch.randn(4, 4)
    path = tmp_path / "tied.pt"
    torch.save({"state_dict": {"a": w}, "extra": {"x": w, "y": w[1:], "z": [w] * 3}}, path)
    ck = cv.open_checkpoint(path)
    got = ck.materialize(ck._root)
    ref = torch.load(path, weights_only=True)
    assert torch.equal(got["extra"]["y"], ref["extra"]["y"])
    assert got["extra"]["x"].untyped_storage().data_ptr() == got["extra"]["y"].untyped_storage().data_ptr()
    assert got["extra"]["z"][0] is got["extra"]["z"][2]


def test_display_of_ordinary_metadata_is_unchanged(tmp_path):
    path = tmp_path / "ok.pt"
    hp = {"lr": 0.1, "layers": [64, 64]}
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": hp, "same": hp, "epoch": 7,
                (1, 2): "tuple key"}, path)
    ck = cv.open_checkpoint(path)
    assert ck.metadata["hparams"] == hp and ck.metadata["same"] == hp and ck.metadata["epoch"] == 7
    assert ck.metadata["(1, 2)"] == "tuple key"



def _from_depth(frames: int, fn):
    """``fn()`` called from ``frames`` Python frames deep (a notebook callback chain, a framework's hooks)."""
    return fn() if frames <= 0 else _from_depth(frames - 1, fn)


@pytest.mark.parametrize("kind", ["tuple-as-dict-key", "list", "dict", "tuple"])
def test_trees_at_the_nesting_ceiling_need_no_stack_per_level(kind, tmp_path, monkeypatch):
    """A tree nested as deep as the pickle limit allows (raised to its ceiling) goes through open,
    materialize, repr, hashing, equality, metadata, sections and the widget's metadata and table code
    when called from a caller 500 frames deep: walks keep their own stacks instead of spending Python
    (or C) frames per level of the file's nesting."""
    from test_limits import CONTAINERS, _deep

    from ckptviz.readers import pickle_reader
    from ckptviz.widgets.inspector import CheckpointInspector

    monkeypatch.setattr(pickle_reader, "MAX_NESTING", 10**6)
    depth = pickle_reader.NESTING_CEILING - 5
    for name in ("torch-zip", "torch-legacy"):
        path = CONTAINERS[name](_deep(kind, depth), tmp_path / f"{name}.pt")

        def verbs(path=path):
            ck = cv.open_checkpoint(path)
            copy, again = ck.materialize(ck._root), ck.materialize(ck._root)
            assert torch.equal(copy.pop("w"), torch.ones(3)) and torch.equal(again.pop("w"), torch.ones(3))
            assert copy == again and len({hash(k) for k in copy}) == len(copy)
            (deep,) = copy if kind == "tuple-as-dict-key" else copy.values()
            levels = 0
            while isinstance(deep, (list, tuple, dict)) and deep:
                deep, levels = (deep["k"] if isinstance(deep, dict) else deep[0]), levels + 1
            assert levels >= depth - 1, levels
            text = repr(copy) + repr(ck) + ck._repr_html_() + repr(ck.metadata)
            assert ck.sections == [""] and ck.tensors().index.tolist() == ["w"]
            inspector = CheckpointInspector(path=path)
            return text, CheckpointInspector._metadata_html(ck), inspector.checkpoint, inspector.error

        text, html, opened, error = _from_depth(500, verbs)
        assert "1 tensors" in text and "format" in html and opened is not None and error is None, error


@pytest.mark.parametrize("kind", ["list", "dict", "tuple"])
def test_materialize_walks_as_deep_as_max_walk_depth_with_a_stack_of_its_own(kind, tmp_path):
    """``materialize`` of a value nested just under ``MAX_WALK_DEPTH`` (other readers' trees, or a
    caller's own value holding records) from 300 frames deep; one level past the limit is a
    WalkLimitError, never a RecursionError."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    ck = cv.open_checkpoint(path)

    def nest(levels):
        x = ck._root["w"]
        for _ in range(levels):
            x = [x] if kind == "list" else {"k": x} if kind == "dict" else (x,)
        return x

    copy = _from_depth(300, lambda: ck.materialize(nest(walk.MAX_WALK_DEPTH - 5)))
    for _ in range(walk.MAX_WALK_DEPTH - 5):
        copy = copy["k"] if kind == "dict" else copy[0]
    assert torch.equal(copy, torch.arange(3.0))
    with pytest.raises(walk.WalkLimitError, match="MAX_WALK_DEPTH"):
        _from_depth(300, lambda: ck.materialize(nest(walk.MAX_WALK_DEPTH + 5)))
