"""Models without memory: meta-device models compare in full, the copying load refuses to "load" into
them, and ``load_partial(assign=True)`` materializes them from real files (identity, requires_grad, ties,
buffers, dtype casts, no copy from a memory map, atomicity, undo)."""

import weakref
from pathlib import Path

import psutil
import pytest
import torch
from models import SmallCNN, bit_identical, randomized, snapshot
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv

MiB = 2**20


def meta(cls, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(*args, **kwargs)


@pytest.fixture
def src():
    model = randomized(SmallCNN(num_classes=10), seed=1).eval()
    with torch.no_grad():
        for bn in (model.features[1], model.features[4]):
            bn.running_var.abs_().add_(0.1)  # a real variance, so eval-mode outputs are numbers
    return model


@pytest.fixture
def dp_file(tmp_path, src):
    """A DataParallel training checkpoint (keys prefixed ``module.``) of ``src``."""
    path = tmp_path / "dp.pth.tar"
    torch.save({"epoch": 2, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    return path


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of ``path`` (from /proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                start, end = line.split()[0].split("-")
                out.append((int(start, 16), int(end, 16)))
    return out


def in_map(t: torch.Tensor, path: Path) -> bool:
    return any(start <= t.data_ptr() < end for start, end in mapped_ranges(path))


# ---- compare --------------------------------------------------------------------------------------
def test_a_meta_model_compares_in_full(dp_file, src):
    model = meta(SmallCNN, num_classes=10)
    rep = cv.compare(model, dp_file)
    assert rep.summary == {"match": len(src.state_dict()), "shape_mismatch": 0, "dtype_mismatch": 0,
                           "adapted": 0, "suggested": 0, "missing": 0, "unexpected": 0}
    assert set(rep.frame["model_device"]) == {"meta"} and set(rep.frame["ckpt_device"]) == {"cpu"}
    assert rep.rules == [("^module\\.", "")]
    small = cv.compare(meta(SmallCNN, num_classes=5), dp_file)
    assert sorted(small.frame.loc[small.frame["status"] == "shape_mismatch", "key"]) == ["head.bias", "head.weight"]


# ---- the copying load never "loads" into meta -----------------------------------------------------
def test_copying_load_skips_meta_tensors_and_points_to_assign(dp_file):
    model = meta(SmallCNN, num_classes=10)
    res = cv.load_partial(model, cv.compare(model, dp_file))
    assert res.loaded == []
    assert set(res.skipped) == set(model.state_dict())
    assert all("meta device" in why and "assign=True" in why for why in res.skipped.values())
    assert res.still_meta == list(model.state_dict())
    assert all(t.is_meta for t in model.state_dict().values())


def test_copying_load_into_a_partly_meta_model_loads_only_the_real_tensors(dp_file, src):
    model = SmallCNN(num_classes=10)
    with torch.device("meta"):
        model.head = nn.Linear(16, 10)
    res = cv.load_partial(model, cv.compare(model, dp_file))
    assert "head.weight" not in res.loaded and "head.bias" not in res.loaded
    assert set(res.loaded) == set(model.state_dict()) - {"head.weight", "head.bias"}
    assert "assign=True" in res.skipped["head.weight"]
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    assert res.still_meta == ["head.weight", "head.bias"]
    assert "still_meta=2" in repr(res) and "still on the meta device" in res._repr_html_()


# ---- assign ---------------------------------------------------------------------------------------
def test_assign_materializes_the_same_objects_with_requires_grad_and_buffers(dp_file, src):
    model = meta(SmallCNN, num_classes=10)
    model.features[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    objects = dict(model.state_dict(keep_vars=True))
    params = dict(model.named_parameters())
    res = cv.load_partial(model, cv.compare(model, dp_file), assign=True)
    assert res.loaded == list(objects) and res.skipped == {} and res.still_meta == []
    assert res.assign and res.device == "cpu" and "assign" in repr(res)
    for k, t in model.state_dict(keep_vars=True).items():
        assert t is objects[k], k
        assert t.device.type == "cpu" and torch.equal(t, src.state_dict()[k]), k
    for n, p in model.named_parameters():
        assert p is params[n] and type(p) is nn.Parameter
    assert model.features[0].weight.requires_grad is False and model.head.weight.requires_grad is True
    bn = model.features[1]
    assert type(bn.running_mean) is torch.Tensor and bn.running_mean is objects["features.1.running_mean"]
    assert bn.num_batches_tracked.dtype == torch.long
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), src(x))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()(x).sum().backward()
    opt.step()  # the optimizer built before or after trains the same objects
    assert not torch.equal(model.head.weight, src.head.weight)


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def test_assign_keeps_tied_weights_tied(tmp_path):
    src = randomized(TiedLM(), seed=3)
    path = tmp_path / "tied.safetensors"  # like save_pretrained: the tied head is not stored
    save_file({k: v for k, v in src.state_dict().items() if k != "head.weight"}, str(path))
    model = meta(TiedLM)
    rep = cv.compare(model, path)
    assert rep.summary["match"] == 3 and rep.frame.set_index("key").loc["head.weight", "status"] == "missing"
    res = cv.load_partial(model, rep, assign=True)
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.device.type == "cpu" and torch.equal(model.head.weight, src.embed.weight)
    assert res.missing_keys == ["head.weight"] and res.still_meta == []  # missing from the file, filled by the tie
    assert res.tied == [["embed.weight", "head.weight"]]
    assert res.frame.set_index("key").loc["head.weight", "detail"] == "tied to embed.weight, which was loaded"
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), src(ids))


class TiedDeep(TiedLM):
    """Many keys besides the tie: the tie must come apart however many tensors one map of the file serves."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(40))


@pytest.mark.parametrize("cls", [TiedLM, TiedDeep])
def test_assign_from_a_torch_file_that_stores_the_tie_twice(tmp_path, cls):
    src = randomized(cls(), seed=4)
    path = tmp_path / "tied.pt"
    torch.save(src.state_dict(), path)  # both keys, one storage
    untied = cls()
    untied.head.weight = nn.Parameter(torch.zeros(11, 6))  # an untied model: its two tensors must not alias
    with torch.device("meta"):
        untied = untied.to("meta")
    res = cv.load_partial(untied, cv.compare(untied, path), assign=True)
    assert set(res.loaded) == set(src.state_dict()) and res.tied == []
    assert untied.head.weight is not untied.embed.weight
    assert torch.equal(untied.head.weight, src.embed.weight) and torch.equal(untied.embed.weight, src.embed.weight)
    with torch.no_grad():
        untied.head.weight.add_(1.0)
    assert torch.equal(untied.embed.weight, src.embed.weight)  # writing one leaves the other alone
    tied = meta(cls)
    res = cv.load_partial(tied, cv.compare(tied, path), assign=True)
    assert tied.head.weight is tied.embed.weight and res.tied == [["embed.weight", "head.weight"]]


class Big(nn.Module):
    def __init__(self, numel: int):
        super().__init__()
        self.big = nn.Parameter(torch.empty(numel))
        self.small = nn.Parameter(torch.empty(3))


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_assign_from_a_safetensors_file_copies_nothing_and_never_writes_to_it(tmp_path):
    numel = 16 * MiB  # 64 MiB of float32
    big = torch.arange(numel, dtype=torch.float32)
    path = tmp_path / "big.safetensors"
    save_file({"big": big, "small": torch.tensor([1.0, 2.0, 3.0])}, str(path))
    del big
    data_end = path.read_bytes()[-64:]
    model = meta(Big, numel)
    rep = cv.compare(model, path)
    rss0 = _rss()
    res = cv.load_partial(model, rep, assign=True)
    grew = _rss() - rss0
    assert res.loaded == ["big", "small"] and res.still_meta == []
    assert grew < 16 * MiB, f"resident memory grew by {grew / MiB:.1f} MiB for a 64 MiB tensor"
    assert in_map(model.big, path) and in_map(model.small, path)  # the parameters are the file's mapped bytes
    assert model.big[12345].item() == 12345.0 and model.big[-1].item() == numel - 1
    with torch.no_grad():
        model.big.mul_(-1)  # copy-on-write: private pages, the file is untouched
    assert path.read_bytes()[-64:] == data_end
    assert cv.open_checkpoint(path).tensor("big")[-1].item() == numel - 1
    assert model.big[-1].item() == -(numel - 1)


def test_assign_casts_to_the_model_dtype(tmp_path, src):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}, str(path))
    model = meta(SmallCNN, num_classes=10)  # float32 on meta, float16 in the file
    rep = cv.compare(model, path)
    assert rep.summary["dtype_mismatch"] == len([v for v in src.state_dict().values() if v.is_floating_point()])
    res = cv.load_partial(model, rep, assign=True)
    assert res.still_meta == []
    for k, v in model.state_dict().items():
        assert v.dtype == src.state_dict()[k].dtype
        assert torch.equal(v, src.state_dict()[k].half().to(v.dtype) if v.is_floating_point() else src.state_dict()[k])
    assert not in_map(model.head.weight, path)  # a cast is a copy in the model's dtype
    halfm = meta(SmallCNN, num_classes=10).half()  # built in the file's dtype: no cast, no copy
    rep = cv.compare(halfm, path)
    assert rep.summary["match"] == len(src.state_dict())
    cv.load_partial(halfm, rep, assign=True)
    assert halfm.head.weight.dtype == torch.float16 and in_map(halfm.head.weight, path)


def test_assign_into_a_real_cpu_model_keeps_its_objects_and_undo_gives_its_memory_back(dp_file, src):
    model = randomized(SmallCNN(num_classes=10), seed=7)
    before = snapshot(model)
    objects = dict(model.state_dict(keep_vars=True))
    ptrs = {k: t.data_ptr() for k, t in objects.items()}
    res = cv.load_partial(model, cv.compare(model, dp_file), assign=True)
    assert res.loaded == list(objects) and res.still_meta == []
    now = model.state_dict(keep_vars=True)
    assert all(t is objects[k] and torch.equal(t, src.state_dict()[k]) for k, t in now.items())
    assert all(t.data_ptr() != ptrs[k] for k, t in objects.items())  # new memory, not a copy into the old
    res.undo()
    assert bit_identical(model, before)
    assert all(t is objects[k] and t.data_ptr() == ptrs[k] for k, t in model.state_dict(keep_vars=True).items())


def test_undo_of_an_assign_load_puts_the_meta_tensors_back(dp_file, src):
    model = meta(SmallCNN, num_classes=10)
    objects = dict(model.state_dict(keep_vars=True))
    rep = cv.compare(model, dp_file)
    res = cv.load_partial(model, rep, assign=True)
    res.undo()
    assert res.undone and "undone" in repr(res)
    assert all(t is objects[k] and t.is_meta for k, t in model.state_dict(keep_vars=True).items())
    assert type(model.head.weight) is nn.Parameter and type(model.features[1].running_var) is torch.Tensor
    with pytest.raises(cv.LoadError, match="already undone"):
        res.undo()
    again = cv.load_partial(model, rep, assign=True, undo=False)
    assert torch.equal(model.head.weight, src.head.weight) and model.head.weight is objects["head.weight"]
    with pytest.raises(cv.LoadError, match="kept no copy"):
        again.undo()


def test_undo_refuses_when_the_model_holds_other_objects_now(dp_file):
    model = meta(SmallCNN, num_classes=10)
    res = cv.load_partial(model, cv.compare(model, dp_file), assign=True)
    loaded = snapshot(model)
    model.head.weight = nn.Parameter(torch.zeros(10, 16))
    with pytest.raises(cv.LoadError, match="other tensor objects.*head.weight.*nothing was restored"):
        res.undo()
    assert all(not t.is_meta for t in model.state_dict().values())
    assert torch.equal(model.features[0].weight, loaded["features.0.weight"])


def test_selected_keys_only_and_still_meta_lists_the_rest(dp_file, src):
    model = meta(SmallCNN, num_classes=10)
    res = cv.load_partial(model, cv.compare(model, dp_file), keys=["head.weight", "head.bias"], assign=True)
    assert res.loaded == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, src.head.weight)
    assert res.still_meta == [k for k in model.state_dict() if not k.startswith("head.")]
    outcome = res.frame.set_index("key")
    assert outcome.loc["features.0.weight", "outcome"] == "not_selected"
    assert "meta" in outcome.loc["features.0.weight", "detail"]


class WithRope(nn.Module):
    """A persistent weight and a non-persistent buffer (like a rotary embedding's inv_freq)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)


def test_still_meta_names_non_persistent_buffers_that_no_checkpoint_holds(tmp_path):
    torch.save(WithRope().state_dict(), tmp_path / "r.pt")
    model = meta(WithRope)
    res = cv.load_partial(model, cv.compare(model, tmp_path / "r.pt"), assign=True)
    assert res.loaded == ["proj.weight", "proj.bias"] and res.still_meta == ["inv_freq"]
    assert "inv_freq" in res._repr_html_() and "cannot run yet" in res._repr_html_()


def test_tensors_that_cannot_be_swapped_are_skipped_with_the_reason(dp_file, src):
    model = meta(SmallCNN, num_classes=10)
    ref = weakref.ref(model.head.weight)
    with torch.no_grad():
        view = model.features[0].weight.view(-1)
    res = cv.load_partial(model, cv.compare(model, dp_file), assign=True)
    assert "weak reference" in res.skipped["head.weight"]
    assert "views of it" in res.skipped["features.0.weight"]
    assert res.still_meta == ["features.0.weight", "head.weight"]
    assert torch.equal(model.head.bias, src.head.bias)
    assert ref() is model.head.weight and view.is_meta


def test_device_argument_is_checked_and_a_failed_conversion_changes_nothing(dp_file):
    model = SmallCNN(num_classes=10)
    with torch.device("meta"):
        model.head = nn.Linear(16, 10)  # last in the state dict: the real tensors come first
    before = {k: (t, t.data_ptr()) for k, t in model.state_dict(keep_vars=True).items() if not t.is_meta}
    values = snapshot(model)
    rep = cv.compare(model, dp_file)
    with pytest.raises(cv.LoadError, match="meta tensors without values"):
        cv.load_partial(model, rep, assign=True, device="meta")
    with pytest.raises(cv.LoadError, match="not a torch device"):
        cv.load_partial(model, rep, assign=True, device="gpu7")
    with pytest.raises(cv.LoadError, match="pass assign=True"):
        cv.load_partial(model, rep, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(cv.LoadError, match="converting 'head.weight'.*nothing was loaded"):
            cv.load_partial(model, rep, assign=True, device="cuda")
    else:
        cv.load_partial(model, rep, assign=True, device="cuda").undo()
    assert model.head.weight.is_meta
    for k, (t, ptr) in before.items():
        assert model.state_dict(keep_vars=True)[k] is t and t.data_ptr() == ptr and torch.equal(t, values[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_assign_materializes_meta_tensors_on_a_gpu(dp_file, src):
    model = meta(SmallCNN, num_classes=10)
    weight = model.head.weight
    res = cv.load_partial(model, cv.compare(model, dp_file), assign=True, device="cuda")
    assert res.device.startswith("cuda") and model.head.weight is weight and weight.device.type == "cuda"
    assert torch.equal(weight.cpu(), src.head.weight)
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model.eval()(x.cuda()).cpu(), src(x), atol=1e-5)


# ---- Hugging Face: config.json -> meta model -> compare -> assign -> the same outputs ----------------
@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_from_its_config_compares_and_loads_to_the_same_outputs(tmp_path, tie):
    pytest.importorskip("transformers")
    from hf_files import logits, tiny_llama

    src = tiny_llama(tmp_path, tie=tie)
    model = cv.build_model(f"config:{tmp_path}")
    assert all(t.is_meta for t in model.state_dict().values())
    rep = cv.compare(model, tmp_path / "model.safetensors")
    n = len(src.state_dict())
    if tie:  # save_pretrained leaves the tied lm_head out of the file; the model ties it to the embeddings
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert rep.summary == {"match": n - 1, "shape_mismatch": 0, "dtype_mismatch": 0, "adapted": 0,
                               "suggested": 0, "missing": 1, "unexpected": 0}
        assert rep.frame.loc[rep.frame["status"] == "missing", "key"].tolist() == ["lm_head.weight"]
    else:
        assert rep.summary == {"match": n, "shape_mismatch": 0, "dtype_mismatch": 0, "adapted": 0,
                               "suggested": 0, "missing": 0, "unexpected": 0}
    res = cv.load_partial(model, rep, assign=True)
    assert res.still_meta == [] and res.skipped == {}
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight and res.missing_keys == ["lm_head.weight"]
        assert "tied to model.embed_tokens.weight" in res.frame.set_index("key").loc["lm_head.weight", "detail"]
    ids = torch.tensor([[1, 7, 3, 99, 12, 5]])
    assert torch.equal(logits(model, ids), logits(src, ids))


def test_a_bf16_llama_is_assigned_from_the_files_map_without_copies(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_files import logits, tiny_llama

    tiny_llama(tmp_path, dtype=torch.bfloat16, seed=5)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    model = cv.build_model(f"config:{tmp_path}")  # the config's dtype: bfloat16, like the file
    rep = cv.compare(model, tmp_path / "model.safetensors")
    assert rep.summary["match"] == len(model.state_dict()) and set(rep.frame["model_dtype"]) == {"bfloat16"}
    cv.load_partial(model, rep, assign=True)
    weights = tmp_path / "model.safetensors"
    assert all(in_map(p, weights) for p in model.parameters())
    ids = torch.tensor([[2, 4, 8, 16, 32]])
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_a_sharded_hub_folder_is_assigned_from_its_shards(tmp_path):
    pytest.importorskip("transformers")
    from hf_files import TINY_LLAMA, logits
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(6)
    src = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    src.save_pretrained(tmp_path, max_shard_size="40KB")  # model-0000i-of-0000n.safetensors + the index
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    model = cv.build_model(f"config:{tmp_path}")
    rep = cv.compare(model, tmp_path)  # the folder itself
    assert rep.summary["match"] == len(src.state_dict()) and set(rep.frame["model_device"]) == {"meta"}
    res = cv.load_partial(model, rep, assign=True)
    assert res.still_meta == []
    assert all(any(in_map(p, shard) for shard in shards) for p in model.parameters())
    ids = torch.tensor([[5, 4, 3, 2, 1]])
    assert torch.equal(logits(model, ids), logits(src, ids))
