"""Hub folders written by the real libraries: transformers' ``save_pretrained`` (sharded safetensors
and a single ``model.safetensors``), huggingface_hub's ``save_torch_state_dict`` (safetensors and
``.bin`` shards), shards without their index, a peft adapter; and what goes wrong with such folders
(missing, truncated or foreign shards, an index pointing outside the folder)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import ckptviz as cv

transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")

SHARD_SIZE = "20KB"  # the tiny model below spreads over 7 shards


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    """folder name -> path: each layout written once by its real writer."""
    root = tmp_path_factory.mktemp("hub")
    llama.save_pretrained(root / "sharded", max_shard_size=SHARD_SIZE)
    llama.save_pretrained(root / "single")
    for name, safe in (("hub_st", True), ("hub_bin", False)):
        (root / name).mkdir()
        hub.save_torch_state_dict(llama.state_dict(), root / name, safe_serialization=safe, max_shard_size=SHARD_SIZE)
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def copy_of(saved, tmp_path):
    def make(name: str):
        return shutil.copytree(saved[name], tmp_path / name)

    return make


def _fresh(llama) -> torch.nn.Module:
    torch.manual_seed(123)
    return transformers.LlamaForCausalLM(llama.config).eval()


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(16).reshape(2, 8)).logits


LAYOUTS = [("sharded", "hf-safetensors-sharded", 7), ("hub_st", "hf-safetensors-sharded", 7),
           ("hub_bin", "hf-bin-sharded", 7), ("single", "safetensors", 1)]


@pytest.mark.parametrize("name,fmt,shards", LAYOUTS)
def test_folder_opens_as_one_checkpoint_with_exact_values(llama, saved, name, fmt, shards):
    ck = cv.open_checkpoint(saved[name])
    assert ck.format == fmt
    assert ck.path == str(saved[name])
    weight_files = [f for f in ck.files if not f.endswith(".json")]
    assert len(weight_files) == shards
    frame = ck.tensors()
    assert list(frame.columns) == ["shape", "dtype", "device", "numel", "nbytes", "file"]
    assert frame["file"].nunique() == shards
    want = llama.state_dict()
    assert set(frame.index) == set(want)
    got = ck.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
        assert frame.loc[k, "shape"] == tuple(v.shape)
    assert int(frame["nbytes"].sum()) == sum(v.numel() * v.element_size() for v in want.values())


@pytest.mark.parametrize("name", ["sharded", "hub_bin"])
def test_each_tensor_comes_from_the_shard_the_index_names(saved, name):
    ck = cv.open_checkpoint(saved[name])
    index = next(f for f in ck.files if f.endswith(".index.json"))
    weight_map = json.loads(open(index).read())["weight_map"]
    assert ck.tensors()["file"].to_dict() == weight_map
    assert ck.metadata["index"]["total_size"] == int(ck.tensors()["nbytes"].sum())
    assert ck.metadata["shards"] == len(set(weight_map.values()))


def test_configs_become_metadata(llama, saved):
    ck = cv.open_checkpoint(saved["sharded"])
    assert ck.metadata["config"]["architectures"] == ["LlamaForCausalLM"]
    assert ck.metadata["config"]["hidden_size"] == 32
    assert "generation_config" in ck.metadata
    single = cv.open_checkpoint(saved["single"] / "model.safetensors")  # the file itself, config beside it
    assert single.metadata["config"]["num_hidden_layers"] == 2
    assert single.path == str(saved["single"] / "model.safetensors")


def test_index_or_any_shard_opens_the_whole_folder(saved):
    folder = saved["sharded"]
    by_index = cv.open_checkpoint(folder / "model.safetensors.index.json")
    with pytest.warns(cv.CheckpointWarning, match="one shard of model.safetensors.index.json"):
        by_shard = cv.open_checkpoint(folder / "model-00003-of-00007.safetensors")
    whole = cv.open_checkpoint(folder)
    for ck in (by_index, by_shard):
        assert ck.path == str(folder) and ck.format == "hf-safetensors-sharded"
        assert ck.tensors().equals(whole.tensors())


@pytest.mark.parametrize("name", ["sharded", "hub_bin"])
def test_compare_load_undo_and_plain_torch_code(llama, saved, name):
    model = _fresh(llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = cv.compare(model, saved[name])
    assert rep.summary["match"] == len(before) and rep.summary["missing"] == 0
    res = cv.load_partial(model, rep)
    assert len(res.loaded) == len(before)
    assert torch.equal(_outputs(model), _outputs(llama))
    res.undo()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    code = cv.torch_code(res)
    assert "for shard in shards" in code
    other = _fresh(llama)
    exec(code, {"model": other})
    assert torch.equal(_outputs(other), _outputs(llama))


def test_shards_without_index(llama, copy_of):
    folder = copy_of("sharded")
    (folder / "model.safetensors.index.json").unlink()
    ck = cv.open_checkpoint(folder)
    assert ck.format == "hf-safetensors-sharded" and len(ck.files) == 7
    got = ck.state_dict()
    assert all(torch.equal(got[k], v) for k, v in llama.state_dict().items())
    model = _fresh(llama)
    cv.load_partial(model, cv.compare(model, folder))
    assert torch.equal(_outputs(model), _outputs(llama))
    code = cv.torch_code(cv.compare(_fresh(llama), folder))
    other = _fresh(llama)
    exec(code, {"model": other})
    assert torch.equal(_outputs(other), _outputs(llama))


def test_stats_histogram_and_diff_across_folders(llama, saved, tmp_path):
    ck = cv.open_checkpoint(saved["sharded"])
    stats = ck.stats()
    w = llama.state_dict()["model.layers.1.mlp.up_proj.weight"]
    assert stats.loc["model.layers.1.mlp.up_proj.weight", "max"] == pytest.approx(float(w.max()))
    hist = ck.histogram("model.layers.1.mlp.up_proj.weight", bins=8)
    assert hist.total == w.numel()

    same = cv.diff(saved["sharded"], saved["hub_bin"])
    assert same.summary["both"] == len(llama.state_dict())
    assert (same.frame["max_abs_diff"] == 0).all()
    tuned = {k: v + 1 if k == "lm_head.weight" else v for k, v in llama.state_dict().items()}
    from safetensors.torch import save_file  # a folder against a file

    save_file(tuned, tmp_path / "tuned.safetensors")
    rep = cv.diff(saved["sharded"], tmp_path / "tuned.safetensors")
    changed = rep.frame.set_index("key")["max_abs_diff"]
    assert changed["lm_head.weight"] == pytest.approx(1.0)
    assert (changed.drop("lm_head.weight") == 0).all()


def test_peft_adapter_folder(llama, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    model = peft.get_peft_model(_fresh(llama), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    model.save_pretrained(tmp_path / "adapter")
    ck = cv.open_checkpoint(tmp_path / "adapter")
    assert ck.format == "safetensors" and ck.files[0].endswith("adapter_model.safetensors")
    assert ck.metadata["adapter_config"]["r"] == 4
    saved = peft.get_peft_model_state_dict(model)
    assert set(ck.tensors().index) == set(saved)
    assert all(torch.equal(ck.tensor(k), v) for k, v in saved.items())


# ---- what goes wrong ------------------------------------------------------------------------


def test_missing_shard_is_named(copy_of):
    folder = copy_of("sharded")
    (folder / "model-00004-of-00007.safetensors").unlink()
    with pytest.raises(cv.CheckpointNotFoundError, match="model-00004-of-00007.safetensors"):
        cv.open_checkpoint(folder)


def test_missing_shard_without_index_is_named(copy_of):
    folder = copy_of("hub_bin")
    (folder / "pytorch_model.bin.index.json").unlink()
    (folder / "pytorch_model-00002-of-00007.bin").unlink()
    with pytest.raises(cv.CheckpointNotFoundError, match="pytorch_model-00002-of-00007.bin"):
        cv.open_checkpoint(folder)


@pytest.mark.parametrize("name,shard", [("sharded", "model-00005-of-00007.safetensors"),
                                        ("hub_bin", "pytorch_model-00005-of-00007.bin")])
def test_truncated_shard_is_named(copy_of, name, shard):
    folder = copy_of(name)
    path = folder / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(cv.CorruptCheckpointError, match=shard):
        cv.open_checkpoint(folder)


def test_tensor_promised_by_index_but_absent_is_named(copy_of):
    folder = copy_of("sharded")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = "model-00002-of-00007.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(cv.CorruptCheckpointError, match=r"model\.layers\.9\.mlp\.gate_proj\.weight.*00002"):
        cv.open_checkpoint(folder)


@pytest.mark.parametrize("evil", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_folder_is_refused(copy_of, evil):
    folder = copy_of("sharded")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = evil
    index.write_text(json.dumps(data))
    with pytest.raises(cv.CorruptCheckpointError, match="outside the checkpoint's folder"):
        cv.open_checkpoint(folder)


def test_shard_the_index_ignores_is_reported(copy_of, llama):
    folder = copy_of("sharded")
    shutil.copy(folder / "model-00001-of-00007.safetensors", folder / "model-00008-of-00008.safetensors")
    with pytest.warns(cv.CheckpointWarning, match="model-00008-of-00008.safetensors"):
        ck = cv.open_checkpoint(folder)
    assert "model-00008-of-00008.safetensors" not in set(ck.tensors()["file"])
    assert any("not in it" in w for w in ck.warnings)


def test_index_that_is_not_an_index(copy_of):
    folder = copy_of("sharded")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(cv.CorruptCheckpointError, match="weight_map"):
        cv.open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(cv.CorruptCheckpointError, match="not readable JSON"):
        cv.open_checkpoint(folder)


def test_folders_without_one_checkpoint(tmp_path):
    with pytest.raises(cv.CheckpointNotFoundError, match="directory with no checkpoint"):
        cv.open_checkpoint(tmp_path)
    for i in range(3):
        torch.save({"w": torch.ones(i + 1)}, tmp_path / f"epoch{i}.pt")
    with pytest.raises(cv.UnknownFormatError, match="3 separate checkpoint files"):
        cv.open_checkpoint(tmp_path)


def test_folder_with_one_plain_file(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "last.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck = cv.open_checkpoint(tmp_path)
    assert ck.format == "torch-zip" and ck.path == str(tmp_path)
    assert ck.files == [str(tmp_path / "last.ckpt")]
    assert torch.equal(ck.tensor("w"), torch.arange(3.0))


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


def test_opening_reads_headers_only_and_maps_a_shard_when_read(tmp_path):
    psutil = pytest.importorskip("psutil")
    sd = {f"layer{i}.weight": torch.full((1024, 1024), float(i)) for i in range(6)}  # 4 MiB each
    hub.save_torch_state_dict(sd, tmp_path, max_shard_size="9MB")
    cv.open_checkpoint(tmp_path).tensors()  # warm up imports
    proc = psutil.Process()
    before = proc.io_counters().read_chars
    ck = cv.open_checkpoint(tmp_path)
    frame = ck.tensors()
    assert proc.io_counters().read_chars - before < 256 * 1024
    shards = sorted(set(frame["file"]))
    assert len(shards) == 3
    assert not any(str(tmp_path) in m for m in _mapped_files())
    assert float(ck.tensor("layer4.weight")[0, 0]) == 4.0  # read with pread: nothing mapped
    assert not any(str(tmp_path) in m for m in _mapped_files())
    t = ck.tensor("layer4.weight", copy=False)
    mapped = {m for m in _mapped_files() if str(tmp_path) in m}
    assert mapped == {str(tmp_path / frame.loc["layer4.weight", "file"])}
    assert float(t[0, 0]) == 4.0


def test_a_shard_named_under_many_spellings_is_read_once(tmp_path):
    """An index naming its one shard as ``./x``, ``.//x`` and ``x``: one shard file, read once, every
    key where the index says (a hostile index with 10**5 spellings would otherwise read it 10**5 times)."""
    from tests.fuzz.bombs import _hub, _weights

    shard = "model-00001-of-00001.safetensors"
    folder = _hub(tmp_path, "spelled", {"w": "./" + shard, "b": ".//./" + shard})
    ck = cv.open_checkpoint(folder)
    assert [f for f in ck.files if f.endswith(".safetensors")] == [str(folder / shard)]
    assert sorted(ck.tensors().index) == ["b", "w"] and not ck.warnings
    for k, v in _weights().items():
        assert torch.equal(ck.tensor(k), v)
