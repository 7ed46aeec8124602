"""Helpers for the checkpoint tests: real models, writers for every container ckptviz reads, a zip
rewriter for damaging archives, and checks on errors, frames and values."""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz as cv

TORCH_FORMATS = ("torch-zip", "torch-legacy")
FORMATS = ("torch-zip", "torch-legacy", "safetensors")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


class LSTMLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 100)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def randomize_buffers(model: nn.Module) -> nn.Module:
    """Give BatchNorm statistics non-default values so that equality checks mean something."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
    return model.eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """An owned copy of ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write(fmt: str, obj, path: Path) -> Path:
    """Write ``obj`` to ``path`` in container ``fmt`` with the real writer of that container."""
    if fmt == "torch-zip":
        torch.save(obj, path)
    elif fmt == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        raise ValueError(fmt)
    return path


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace/save are deprecated, still real
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model.eval(), example), str(path))
    return path


def rewrite_zip(src: Path, dst: Path, transform: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy the zip ``src`` to ``dst`` entry by entry (valid CRCs), passing each through ``transform``
    (name, data) -> new data, or None to drop the entry."""
    with zipfile.ZipFile(src) as zin:
        entries = [(info, zin.read(info.filename)) for info in zin.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            new = transform(info.filename, data)
            if new is not None:
                zout.writestr(info, new)
    dst.write_bytes(buf.getvalue())
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_clean_error(err: BaseException, path) -> None:
    """A deliberate ckptviz error: a CheckpointError naming the file, not a chained torch traceback."""
    assert isinstance(err, cv.CheckpointError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert str(path) in msg, msg
    assert "Traceback" not in msg
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__, repr(err.__context__)


def expected_frame_rows(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), str(v.device), v.numel(), v.numel() * v.element_size())
        for k, v in sd.items()
    }


def assert_frame_matches(frame, sd: dict[str, torch.Tensor], device: str | None = None,
                         file: str | None = None) -> None:
    """``ck.tensors()`` describes exactly the tensors of ``sd`` (device overridden when given; every
    row's ``file`` checked when given)."""
    assert list(frame.columns) == ["shape", "dtype", "device", "numel", "nbytes", "file"]
    if file is not None:
        assert (frame["file"] == file).all()
    assert frame.index.name == "key"
    assert frame.index.is_unique
    assert set(frame.index) == set(sd)
    for key, (shape, dtype, dev, numel, nbytes) in expected_frame_rows(sd).items():
        row = frame.loc[key]
        assert isinstance(row["shape"], tuple), key
        assert row["shape"] == shape, key
        assert isinstance(row["dtype"], str) and row["dtype"] == dtype, key
        assert row["device"] == (device or dev), key
        assert int(row["numel"]) == numel, key
        assert int(row["nbytes"]) == nbytes, key


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k
