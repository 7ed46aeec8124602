"""ckptviz.snippet.torch_code: the generated plain-PyTorch code is valid Python and, run on a fresh copy
of the model, loads exactly the values that load_partial loaded (real files, real models, exec)."""

import ast
import copy
import warnings

import pytest
import torch
from models import SmallCNN, bit_identical, randomized, snapshot
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv
from ckptviz.snippet import torch_code

HEAD = {"head.weight", "head.bias"}


def run(code: str, model: nn.Module, **names) -> dict:
    """Parse, then execute the snippet with ``model`` bound; return its namespace."""
    ast.parse(code)
    ns = {"model": model, **names}
    exec(compile(code, "<torch_code>", "exec"), ns)
    return ns


@pytest.fixture
def dp_checkpoint(tmp_path):
    """A DataParallel-style training checkpoint of a 10-class SmallCNN: keys prefixed ``module.``."""
    src = randomized(SmallCNN(num_classes=10), seed=1)
    src.features[1].num_batches_tracked.fill_(7)
    path = tmp_path / "dp.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, path)
    return path, src


@pytest.fixture
def pair():
    """Model A (5 classes, random values) and B, an identical copy to run the snippet on."""
    a = randomized(SmallCNN(num_classes=5), seed=2)
    return a, copy.deepcopy(a)


def test_snippet_loads_exactly_what_load_partial_loaded(dp_checkpoint, pair):
    path, src = dp_checkpoint
    a, b = pair
    before = snapshot(b)
    res = cv.load_partial(a, cv.compare(a, path))
    code = torch_code(res)
    assert 'sd = {re.sub(r"^module\\.", "", k): v for k, v in sd.items()}' in code
    assert "model.load_state_dict(sd, strict=False)" in code
    assert f'torch.load("{path}", map_location="cpu", weights_only=True)' in code
    assert 'sd = ckpt["state_dict"]' in code
    assert code.startswith("import re\nimport torch\n")
    ns = run(code, b)
    assert bit_identical(b, snapshot(a))
    assert not bit_identical(b, before)  # something really was loaded
    for k in HEAD:  # the 5-class head kept its own values in both
        assert torch.equal(b.state_dict()[k], before[k])
    assert sorted(ns["missing"]) == sorted(HEAD) and ns["unexpected"] == []
    # the skipped keys are listed (fewer than the 14 that load), each with its reason
    assert "skip = {" in code and "keep = " not in code
    assert '"head.weight",  # shape (10, 16) in the checkpoint, (5, 16) in the model' in code


def test_a_report_gives_the_code_for_its_default_load(dp_checkpoint, pair):
    path, _ = dp_checkpoint
    a, _ = pair
    rep = cv.compare(a, path)
    code = torch_code(rep)
    assert code == torch_code(cv.load_partial(a, rep))


def test_a_user_selected_subset(dp_checkpoint, pair):
    path, _ = dp_checkpoint
    a, b = pair
    before = snapshot(b)
    keys = ["features.0.weight", "features.1.running_mean", "features.1.num_batches_tracked", "head.weight"]
    rep = cv.compare(a, path)
    code = torch_code(rep, keys=keys)
    res = cv.load_partial(a, rep, keys=keys)
    assert sorted(res.loaded) == sorted(keys[:3])
    assert code == torch_code(res)
    assert 'keep = {"features.0.weight", "features.1.running_mean", "features.1.num_batches_tracked"}' in code
    ns = run(code, b)
    assert bit_identical(b, snapshot(a))
    changed = {k for k, v in b.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(keys[:3])
    # (BatchNorm fills in its own num_batches_tracked when sd lacks it, so torch does not list that one)
    assert set(ns["missing"]) == set(before) - set(keys[:3]) - {"features.4.num_batches_tracked"}


def test_top_level_state_dict_with_dtype_mismatch_and_path_override(tmp_path, pair):
    a, b = pair
    src = randomized(SmallCNN(num_classes=5), seed=3)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    rep = cv.compare(a, path)
    assert rep.summary["dtype_mismatch"] > 0 and rep.rules == []
    code = torch_code(cv.load_partial(a, rep))
    assert "import re" not in code and "re.sub" not in code and "skip =" not in code and "keep =" not in code
    assert "sd = ckpt  # the file is the state dict itself" in code
    run(code, b)
    assert bit_identical(b, snapshot(a))
    assert b.head.weight.dtype == torch.float32
    moved = torch_code(rep, path="weights/other.pt")
    assert 'torch.load("weights/other.pt"' in moved and str(path) not in moved


def test_nested_section_through_dicts_and_lists(tmp_path, pair):
    a, b = pair
    src = randomized(SmallCNN(num_classes=5), seed=4)
    path = tmp_path / "nested.pt"
    torch.save({"runs": [{"note": "warmup"}, {"weights": src.state_dict(), "step": 10}]}, path)
    rep = cv.compare(a, path)
    assert rep.section == "runs.1.weights"
    code = torch_code(cv.load_partial(a, rep))
    assert 'sd = ckpt["runs"][1]["weights"]' in code
    run(code, b)
    assert bit_identical(b, snapshot(a)) and bit_identical(b, snapshot(src))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))


def test_renames_that_apply_to_only_some_keys_are_spelled_out(tmp_path):
    # "weight"/"bias" need the prefix "net." added, "scale" matches as is: re.sub("^", "net.") over
    # every key would rename "scale" too, so the snippet lists the pairs instead
    src = randomized(Wrapped(), seed=5)
    path = tmp_path / "flat.pt"
    torch.save({"weight": src.net.weight.detach(), "bias": src.net.bias.detach(), "scale": src.scale.detach()}, path)
    a = Wrapped()
    b = copy.deepcopy(a)
    rep = cv.compare(a, path)
    assert rep.rules == [("^", "net.")] and rep.summary["match"] == 3
    code = torch_code(cv.load_partial(a, rep))
    assert "re.sub" not in code
    assert '"weight": "net.weight",' in code and '"scale": "scale",' in code
    run(code, b)
    assert bit_identical(b, snapshot(a)) and bit_identical(b, snapshot(src))


def test_safetensors_file_uses_load_file(tmp_path, pair):
    a, b = pair
    src = randomized(SmallCNN(num_classes=10), seed=6)
    path = tmp_path / "model.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    code = torch_code(cv.load_partial(a, cv.compare(a, path)))
    assert "from safetensors.torch import load_file" in code and f'sd = load_file("{path}")' in code
    assert 'sd = {re.sub(r"^model\\.", "", k): v for k, v in sd.items()}' in code
    run(code, b)
    assert bit_identical(b, snapshot(a))


def test_a_pickled_module_needs_trust_and_says_so(tmp_path, pair):
    a, b = pair
    src = randomized(SmallCNN(num_classes=5), seed=7)
    path = tmp_path / "whole_model.pt"
    torch.save(src, path)
    rep = cv.compare(a, cv.open_checkpoint(path, trust=True))
    code = torch_code(cv.load_partial(a, rep))
    assert "weights_only=False" in code and "models.SmallCNN" in code and "trust" in code
    assert "sd = ckpt.state_dict()" in code
    run(code, b)
    assert bit_identical(b, snapshot(a)) and bit_identical(b, snapshot(src))


def test_a_torchscript_archive_is_read_with_torch_jit_load(tmp_path, pair):
    a, b = pair
    src = randomized(SmallCNN(num_classes=5), seed=9).eval()
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, still real
        torch.jit.save(torch.jit.trace(src, torch.randn(1, 1, 8, 8)), str(path))
    code = torch_code(cv.load_partial(a, cv.compare(a, path)))
    assert f'ckpt = torch.jit.load("{path}", map_location="cpu")' in code and "sd = ckpt.state_dict()" in code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(code, b)
    assert bit_identical(b, snapshot(a)) and bit_identical(b, snapshot(src))


def test_an_in_memory_mapping_reads_from_a_variable(pair):
    a, b = pair
    src = randomized(SmallCNN(num_classes=5), seed=8)
    state = {"model_state_dict": src.state_dict(), "epoch": 3}
    code = torch_code(cv.load_partial(a, cv.compare(a, state)))
    assert "torch.load" not in code and "ckpt = state_dict" in code
    run(code, b, state_dict=state)
    assert bit_identical(b, snapshot(a)) and bit_identical(b, snapshot(src))


def test_bad_arguments(dp_checkpoint, pair):
    path, _ = dp_checkpoint
    a, _ = pair
    rep = cv.compare(a, path)
    with pytest.raises(TypeError, match="LoadResult already records"):
        torch_code(cv.load_partial(a, rep), keys=["head.bias"])
    with pytest.raises(cv.LoadError, match="not.a.key"):
        torch_code(rep, keys=["not.a.key"])
    with pytest.raises(TypeError, match="got dict"):
        torch_code({"a": 1})
    assert "keep = set()" in torch_code(rep, keys=[])


# ---- assign loads (meta-device models) -----------------------------------------------------------
def meta_cnn(num_classes: int = 5) -> nn.Module:
    with torch.device("meta"):
        return SmallCNN(num_classes=num_classes)


def test_assign_load_of_a_meta_model(dp_checkpoint):
    path, src = dp_checkpoint
    a, b = meta_cnn(), meta_cnn()
    res = cv.load_partial(a, cv.compare(a, path), assign=True)
    code = torch_code(res)
    assert "missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)" in code
    assert "dst = model.state_dict()" not in code  # nothing to cast: the file's tensors are taken as they are
    assert '"head.weight",  # shape (10, 16) in the checkpoint, (5, 16) in the model' in code
    ns = run(code, b)
    assert sorted(ns["missing"]) == sorted(HEAD) and ns["unexpected"] == []
    assert b.head.weight.is_meta and b.head.bias.is_meta  # still on meta in both
    assert res.still_meta == ["head.weight", "head.bias"]
    loaded = {k: v for k, v in a.state_dict().items() if k not in HEAD}
    assert all(torch.equal(b.state_dict()[k], v) for k, v in loaded.items())
    assert all(b.state_dict()[k].device.type == "cpu" for k in loaded)


def test_assign_load_with_casts_writes_the_cast(tmp_path):
    src = randomized(SmallCNN(num_classes=5), seed=11)
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}, str(path))
    a, b = meta_cnn(), meta_cnn()
    res = cv.load_partial(a, cv.compare(a, path), assign=True)
    code = torch_code(res)
    assert "dst = model.state_dict()" in code and 'device="cpu" if dst[k].is_meta' in code
    assert "assign=True)" in code
    run(code, b)
    assert bit_identical(b, snapshot(a))
    assert b.head.weight.dtype == torch.float32


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight


def test_assign_load_reties_tied_weights(tmp_path):
    src = randomized(Tied(), seed=12)
    path = tmp_path / "tied.safetensors"
    save_file({"embed.weight": src.embed.weight.detach().contiguous()}, str(path))  # the tied head is not saved
    with torch.device("meta"):
        a, b = Tied(), Tied()
    res = cv.load_partial(a, cv.compare(a, path), assign=True)
    code = torch_code(res)
    assert 'model.get_submodule("head").weight = model.get_submodule("embed").weight' in code
    ns = run(code, b)
    assert ns["missing"] == ["head.weight"]
    assert b.head.weight is b.embed.weight and torch.equal(b.head.weight, src.embed.weight)
    assert bit_identical(b, snapshot(a))


def test_copying_load_of_a_partly_meta_model_says_why_meta_keys_are_left_out(dp_checkpoint):
    path, _ = dp_checkpoint
    a = SmallCNN(num_classes=10)
    with torch.device("meta"):
        a.head = nn.Linear(16, 10)
    b = copy.deepcopy(a)
    rep = cv.compare(a, path)
    code = torch_code(cv.load_partial(a, rep))
    assert code == torch_code(rep)
    assert '"head.weight",  # on the meta device: load with assign=True' in code
    assert "assign=True)" not in code
    run(code, b)
    assert b.head.weight.is_meta and torch.equal(b.features[0].weight, a.features[0].weight)
