"""open_checkpoint() and Checkpoint: format sniffing, exact values, the tensors() frame, laziness,
sections and metadata, whole pickled modules, saved devices, half-precision dtypes."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from ckpt_files import (
    FORMATS,
    TORCH_FORMATS,
    assert_frame_matches,
    assert_same_tensors,
    state_of,
    write,
    write_torchscript,
)
from torch import nn

import ckptviz as cv

# ---------------------------------------------------------------------------------------------
# format sniffing and exact values
# ---------------------------------------------------------------------------------------------

# Every file name lies about its container: the format must come from the bytes.
MISLEADING_NAMES = {
    "torch-zip": ["weights.ckpt", "weights.safetensors"],
    "torch-legacy": ["weights.pth.tar", "weights.zip"],
    "safetensors": ["weights.bin", "weights.pt"],
}


@pytest.mark.parametrize(
    "fmt,name", [(fmt, name) for fmt, names in MISLEADING_NAMES.items() for name in names]
)
def test_format_is_sniffed_from_bytes_and_values_are_exact(fmt, name, model_state, tmp_path):
    _, sd = model_state
    path = write(fmt, sd, tmp_path / name)
    ck = cv.open_checkpoint(path)
    assert ck.format == fmt
    assert ck.sections == [""]
    assert ck.unsafe_globals == []
    assert_same_tensors(ck.state_dict(), sd)
    assert_frame_matches(ck.tensors(), sd, file=name)
    assert ck.files == [str(path)]


def test_format_does_not_follow_renaming(small_cnn, tmp_path):
    """The same bytes under two names open the same way; different bytes under one name do not."""
    sd = state_of(small_cnn)
    zip_path = write("torch-zip", sd, tmp_path / "a.safetensors")
    st_path = write("safetensors", sd, tmp_path / "b.pt")
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(zip_path.read_bytes())
    assert cv.open_checkpoint(renamed).format == "torch-zip"
    renamed.write_bytes(st_path.read_bytes())
    assert cv.open_checkpoint(renamed).format == "safetensors"


@pytest.mark.parametrize("which,name", [("small_cnn", "scripted.pth.tar"), ("lstm_model", "scripted.bin")])
def test_torchscript_archive(which, name, request, tmp_path):
    model = request.getfixturevalue(which)
    example = torch.randn(2, 3, 12, 12) if which == "small_cnn" else torch.randint(0, 100, (2, 7))
    path = write_torchscript(model, example, tmp_path / name)
    ck = cv.open_checkpoint(path)
    assert ck.format == "torchscript"
    assert ck.sections == [""]
    sd = state_of(model)
    assert_same_tensors(ck.state_dict(), sd)
    assert_frame_matches(ck.tensors(), sd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_tensor_access_matches_state_dict(fmt, small_cnn, tmp_path):
    sd = state_of(small_cnn)
    ck = cv.open_checkpoint(write(fmt, sd, tmp_path / "w.ckpt"))
    assert torch.equal(ck.tensor("conv1.weight"), sd["conv1.weight"])
    assert torch.equal(ck.tensor("bn1.num_batches_tracked"), sd["bn1.num_batches_tracked"])


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_views_offsets_and_strides_survive(fmt, tmp_path):
    """Tensors sharing one storage at offsets, transposed views, 0-d and empty tensors."""
    base = torch.arange(20.0)
    sd = {
        "base": base,
        "slice": base[2:5],
        "transposed": base.view(4, 5).t(),
        "strided": base[1::3],
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
    }
    ck = cv.open_checkpoint(write(fmt, sd, tmp_path / "views.bin"))
    got = ck.state_dict()
    assert_same_tensors(got, sd)
    assert got["transposed"].stride() == sd["transposed"].stride()
    frame = ck.tensors()
    assert frame.loc["scalar", "shape"] == ()
    assert frame.loc["empty", "numel"] == 0 and frame.loc["empty", "nbytes"] == 0
    assert frame.loc["transposed", "shape"] == (5, 4)


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(fmt, dtype, small_cnn, tmp_path):
    sd = state_of(small_cnn.to(dtype))
    assert sd["conv1.weight"].dtype == dtype
    ck = cv.open_checkpoint(write(fmt, sd, tmp_path / "half.pt"))
    frame = ck.tensors()
    name = str(dtype).removeprefix("torch.")
    assert frame.loc["conv1.weight", "dtype"] == name
    assert frame.loc["conv1.weight", "nbytes"] == sd["conv1.weight"].numel() * 2
    assert frame.loc["bn1.num_batches_tracked", "dtype"] == "int64"
    assert_frame_matches(frame, sd)
    assert_same_tensors(ck.state_dict(), sd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_dtypes(fmt, tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "f64": torch.randn(5, generator=g).double(),
        "i8": torch.tensor([-1, 2, -128], dtype=torch.int8),
        "u8": torch.tensor([255, 1], dtype=torch.uint8),
        "i32": torch.tensor([7, -9], dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(4, dtype=torch.complex64, generator=g),
    }
    ck = cv.open_checkpoint(write(fmt, sd, tmp_path / "mixed.pt"))
    assert dict(ck.tensors()["dtype"]) == {
        "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i8": "int8",
        "u8": "uint8", "i32": "int32", "bool": "bool", "c64": "complex64",
    }
    assert_frame_matches(ck.tensors(), sd)
    assert_same_tensors(ck.state_dict(), sd)


# ---------------------------------------------------------------------------------------------
# laziness: listing reads no tensor data (measured by bytes read and resident memory)
# ---------------------------------------------------------------------------------------------

BIG_NUMEL = 16 * 1024 * 1024  # float32: 64 MiB of tensor data
MiB = 1024 * 1024


def _io_and_rss() -> tuple[int, int]:
    proc = psutil.Process()
    return proc.io_counters().read_chars, proc.memory_info().rss


def _big_file(fmt, tmp_path, warm_up) -> tuple:
    """A 64 MiB "big" tensor beside a "small" one, written as ``fmt``, after a warm-up open of a tiny file
    (``warm_up(checkpoint)``) so the reader's modules are imported and pandas has allocated what it keeps."""
    if not hasattr(psutil.Process().io_counters(), "read_chars"):
        pytest.skip("this platform does not count bytes read per process")
    big = torch.zeros(BIG_NUMEL)
    big[-1] = 5.0
    small = torch.arange(10.0)
    path = write(fmt, {"big": big, "small": small}, tmp_path / "big.bin")
    del big
    gc.collect()
    warm_up(cv.open_checkpoint(write(fmt, {"x": torch.ones(2)}, tmp_path / "warm.bin")))
    return path, small


@pytest.mark.parametrize("fmt", FORMATS)
def test_listing_reads_no_tensor_data(fmt, tmp_path):
    path, _ = _big_file(fmt, tmp_path, lambda ck: ck.tensors())

    read0, rss0 = _io_and_rss()
    ck = cv.open_checkpoint(path)
    frame = ck.tensors()
    read1, rss1 = _io_and_rss()

    assert frame.loc["big", "nbytes"] == BIG_NUMEL * 4
    assert frame.loc["big", "shape"] == (BIG_NUMEL,)
    # A reader that touched the data would read 64 MiB; the structure is a few KiB.
    assert read1 - read0 < 1 * MiB, f"read {(read1 - read0) / MiB:.1f} MiB to list the tensors"
    assert rss1 - rss0 < 16 * MiB, f"resident memory grew by {(rss1 - rss0) / MiB:.1f} MiB"


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_state_dict_maps_instead_of_reading(fmt, tmp_path):
    """With copy=False, aligned containers hand out memory-mapped tensors: nothing is read until a value
    is used."""
    path, small = _big_file(fmt, tmp_path, lambda ck: ck.state_dict(copy=False))

    read0, rss0 = _io_and_rss()
    sd = cv.open_checkpoint(path).state_dict(copy=False)
    read1, rss1 = _io_and_rss()
    assert read1 - read0 < 1 * MiB
    assert rss1 - rss0 < 16 * MiB
    assert torch.equal(sd["small"], small)
    assert sd["big"].shape == (BIG_NUMEL,)
    assert sd["big"][-1].item() == 5.0 and sd["big"][0].item() == 0.0


# ---------------------------------------------------------------------------------------------
# sections, metadata, optimizer state
# ---------------------------------------------------------------------------------------------


def _trained_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    model.eval()
    return opt


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_top_level_state_dict_is_section_empty_string(fmt, small_cnn, tmp_path):
    sd = state_of(small_cnn)
    ck = cv.open_checkpoint(write(fmt, sd, tmp_path / "sd.pt"))
    assert ck.sections == [""]
    assert ck.optimizer_sections == []
    assert ck.metadata == {}
    assert_same_tensors(ck.state_dict(""), sd)
    assert_frame_matches(ck.tensors(""), sd)


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_lightning_checkpoint(fmt, small_cnn, tmp_path):
    opt = _trained_optimizer(small_cnn)
    sd = state_of(small_cnn)
    hparams = {"lr": 1e-3, "layers": [8, 16], "name": "cnn"}
    ckpt = {
        "epoch": 3,
        "global_step": 100,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": hparams,
    }
    ck = cv.open_checkpoint(write(fmt, ckpt, tmp_path / "last.ckpt"))
    assert ck.sections[0] == "state_dict"
    assert_same_tensors(ck.state_dict(), ckpt["state_dict"])
    assert_same_tensors(ck.state_dict("state_dict"), ckpt["state_dict"])

    assert ck.metadata["epoch"] == 3
    assert ck.metadata["global_step"] == 100
    assert ck.metadata["hyper_parameters"] == hparams
    assert ck.metadata["pytorch-lightning_version"] == "2.4.0"
    assert "state_dict" not in ck.metadata and "optimizer_states" not in ck.metadata

    assert ck.optimizer_sections, "the optimizer state was not found"
    assert all(s.startswith("optimizer_states") for s in ck.optimizer_sections)
    assert not set(ck.optimizer_sections) & set(ck.sections)
    assert all(not s.startswith("optimizer") for s in ck.sections)
    state = ck.optimizer_state()
    assert state["param_groups"][0]["lr"] == 1e-3
    # The optimizer's moment tensors are never offered as weights.
    assert all("exp_avg" not in k for s in ck.sections for k in ck.tensors(s).index)
    with pytest.raises(cv.SectionError, match="optimizer"):
        ck.tensors(ck.optimizer_sections[0])


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_model_ranked_before_ema_and_optimizer_excluded(fmt, small_cnn, tmp_path):
    opt = _trained_optimizer(small_cnn)
    sd = state_of(small_cnn)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    # Insertion order puts "ema" first: the ranking, not the dict order, decides.
    path = write(fmt, {"ema": ema, "optimizer": opt.state_dict(), "model": sd, "epoch": 12}, tmp_path / "m.bin")
    ck = cv.open_checkpoint(path)
    assert ck.sections == ["model", "ema"]
    assert ck.optimizer_sections == ["optimizer"]
    assert ck.metadata == {"epoch": 12}
    assert_same_tensors(ck.state_dict(), sd)
    assert_same_tensors(ck.state_dict("ema"), ema)
    assert_frame_matches(ck.tensors("ema"), ema)

    with pytest.raises(cv.SectionError) as err:
        ck.tensors("optimizer")
    assert "optimizer state" in str(err.value)
    assert str(path) in str(err.value)
    with pytest.raises(cv.SectionError, match="optimizer state"):
        ck.state_dict("optimizer")


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_model_state_dict_and_optimizer_state_dict(fmt, small_cnn, tmp_path):
    opt = _trained_optimizer(small_cnn, lr=0.05)
    sd = state_of(small_cnn)
    ckpt = {"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 5, "loss": 0.25}
    ck = cv.open_checkpoint(write(fmt, ckpt, tmp_path / "train.tar"))
    assert ck.sections == ["model_state_dict"]
    assert ck.optimizer_sections == ["optimizer_state_dict"]
    assert ck.metadata == {"epoch": 5, "loss": 0.25}
    assert_same_tensors(ck.state_dict(), sd)
    assert ck.optimizer_state("optimizer_state_dict")["param_groups"][0]["lr"] == 0.05


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_nested_mapping_of_tensors_is_flattened(fmt, tmp_path):
    g = torch.Generator().manual_seed(4)
    nested = {
        "encoder": {"conv": {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(4, generator=g)},
                    "norm": {"scale": torch.randn(4, generator=g)}},
        "decoder": {"weight": torch.randn(2, 4, generator=g)},
    }
    ck = cv.open_checkpoint(write(fmt, {"model": nested, "step": 7}, tmp_path / "nested.pt"))
    assert ck.sections == ["model"]
    assert ck.metadata == {"step": 7}
    flat = {
        "encoder.conv.weight": nested["encoder"]["conv"]["weight"],
        "encoder.conv.bias": nested["encoder"]["conv"]["bias"],
        "encoder.norm.scale": nested["encoder"]["norm"]["scale"],
        "decoder.weight": nested["decoder"]["weight"],
    }
    assert_same_tensors(ck.state_dict("model"), flat)
    assert_frame_matches(ck.tensors("model"), flat)


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_mapping_mostly_of_tensors(fmt, small_cnn, tmp_path):
    """A mapping whose values are mostly tensors is a state dict; its other values are not weights."""
    sd = state_of(small_cnn)
    top = {**sd, "arch": "small_cnn"}
    ck = cv.open_checkpoint(write(fmt, top, tmp_path / "top.pt"))
    assert ck.sections == [""]
    assert_same_tensors(ck.state_dict(), sd)
    assert ck.metadata == {"arch": "small_cnn"}

    deep = {"trainer": {"weights": {**sd, "num_classes": 10}}, "epoch": 2}
    ck = cv.open_checkpoint(write(fmt, deep, tmp_path / "deep.pt"))
    assert ck.sections == ["trainer.weights"]
    assert_same_tensors(ck.state_dict("trainer.weights"), sd)
    assert ck.metadata["epoch"] == 2


def test_unknown_section_lists_the_sections(small_cnn, tmp_path):
    sd = state_of(small_cnn)
    path = write("torch-zip", {"model": sd, "ema": sd}, tmp_path / "two.pt")
    ck = cv.open_checkpoint(path)
    with pytest.raises(cv.SectionError) as err:
        ck.tensors("weights")
    msg = str(err.value)
    assert "'weights'" in msg and "'model'" in msg and "'ema'" in msg and str(path) in msg
    with pytest.raises(cv.SectionError):
        ck.state_dict("nope")
    with pytest.raises(KeyError):  # SectionError is also a KeyError, for dict-like callers
        ck.tensor("no.such.key")


# ---------------------------------------------------------------------------------------------
# whole pickled modules
# ---------------------------------------------------------------------------------------------


class Wrapped(nn.Module):
    """A model with a persistent and a non-persistent buffer, an LSTM and a nested CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.rnn = nn.LSTM(4, 6)
        self.fc = nn.Linear(6, 2)
        self.register_buffer("scale", torch.full((2,), 0.5))
        self.register_buffer("cache", torch.arange(3.0), persistent=False)


def _wrapped() -> Wrapped:
    torch.manual_seed(5)
    return Wrapped().eval()


EXPECTED_MODULE_GLOBALS = {
    f"{Wrapped.__module__}.{Wrapped.__qualname__}",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.rnn.LSTM",
    "torch.nn.modules.linear.Linear",
}


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_pickled_module_is_refused_listing_every_global(fmt, tmp_path):
    path = write(fmt, _wrapped(), tmp_path / "model.pt")
    with pytest.raises(cv.UnsafeCheckpointError) as err:
        cv.open_checkpoint(path)
    assert EXPECTED_MODULE_GLOBALS <= set(err.value.globals)
    for name in EXPECTED_MODULE_GLOBALS:
        assert name in str(err.value)
    assert str(path) in str(err.value)
    assert "trust=True" in str(err.value)


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_pickled_module_with_trust_gives_its_state_dict(fmt, tmp_path):
    model = _wrapped()
    path = write(fmt, model, tmp_path / "model.pt")
    ck = cv.open_checkpoint(path, trust=True)
    assert ck.format == fmt
    assert ck.sections == [""]
    assert EXPECTED_MODULE_GLOBALS <= set(ck.unsafe_globals)
    sd = state_of(model)
    assert "scale" in sd and "features.1.running_mean" in sd and "cache" not in sd
    got = ck.state_dict("")
    assert "cache" not in got  # non-persistent buffers are not part of a state dict
    assert_same_tensors(got, sd)
    assert_frame_matches(ck.tensors(), sd)


# ---------------------------------------------------------------------------------------------
# saved devices
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def save_tagged_cuda():
    """save(obj, path, fmt): torch.save with storages tagged as saved on cuda:0 (torch's own
    serialization registry; no GPU needed). The registry entry is removed again afterwards."""
    from torch.serialization import _package_registry, register_package

    def tagger(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    def deserializer(storage, location):
        return None

    def unregister():
        _package_registry[:] = [entry for entry in _package_registry if entry[1] is not tagger]

    def save(obj, path, fmt):
        register_package(1, tagger, deserializer)
        try:
            return write(fmt, obj, path)
        finally:
            unregister()

    yield save
    unregister()


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_file_saved_on_cuda_opens_on_cpu(fmt, save_tagged_cuda, small_cnn, tmp_path):
    sd = state_of(small_cnn)
    sd["half"] = torch.linspace(0, 1, 9).half()
    path = save_tagged_cuda(sd, tmp_path / "gpu.pt", fmt)

    # The file really says cuda:0: torch itself cannot load it on a CPU-only machine.
    if torch.cuda.is_available():
        assert torch.load(path, weights_only=True)["half"].device == torch.device("cuda:0")
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)

    ck = cv.open_checkpoint(path)
    frame = ck.tensors()
    assert set(frame["device"]) == {"cuda:0"}
    assert_frame_matches(frame, sd, device="cuda:0")
    got = ck.state_dict()
    assert all(v.device.type == "cpu" for v in got.values())
    assert_same_tensors(got, sd)


def test_cuda_tag_does_not_leak(save_tagged_cuda, tmp_path):
    sd = {"w": torch.ones(3)}
    save_tagged_cuda(sd, tmp_path / "gpu.pt", "torch-zip")
    plain = write("torch-zip", sd, tmp_path / "cpu.pt")
    assert set(cv.open_checkpoint(plain).tensors()["device"]) == {"cpu"}
    assert torch.load(plain, weights_only=True)["w"].device == torch.device("cpu")


def test_values_changed_in_memory_never_reach_a_later_read(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    ck = cv.open_checkpoint(path)
    sd = ck.state_dict()
    sd["w"].add_(100)
    assert torch.equal(ck.state_dict()["w"], torch.arange(6.0))
    assert torch.equal(ck.tensor("w"), torch.arange(6.0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_cut_short_after_opening_is_refused_not_faulted(fmt, tmp_path):
    """A file truncated after it was opened would fault (SIGBUS) when a map past its end is read:
    every read checks the file first and says what happened."""
    sd = {"w": torch.arange(50_000.0), "b": torch.ones(3)}
    path = write(fmt, sd, tmp_path / "m.bin")
    ck = cv.open_checkpoint(path)
    assert torch.equal(ck.tensor("w"), sd["w"])
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    for read in (lambda: ck.tensor("w"), ck.state_dict, lambda: ck.histogram("w")):
        with pytest.raises(cv.CorruptCheckpointError, match="changed on disk since it was opened"):
            read()
