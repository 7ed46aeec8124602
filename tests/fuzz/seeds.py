"""Small real seed checkpoints, written by the real libraries, one per container ckptviz reads."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class FuzzNet(nn.Module):
    """The live model the fuzzer compares and loads every mutated checkpoint into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 6, 6)
        return self.fc(torch.relu(self.bn(self.pool(self.conv(x)).flatten(1))))


def model(seed: int = 0) -> FuzzNet:
    torch.manual_seed(seed)
    return FuzzNet().eval()


def trained() -> tuple[FuzzNet, torch.optim.Adam]:
    """A model after one real Adam step, so the optimizer has state."""
    m = model(1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    m(torch.randn(6, 1, 6, 6)).pow(2).sum().backward()
    opt.step()
    return m.eval(), opt


def _extra() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {"extra.f16": torch.randn(5).half(), "extra.bf16": torch.randn(3, 2).bfloat16(),
            "extra.f64": torch.randn(4).double(), "extra.i8": torch.arange(-3, 3, dtype=torch.int8)}


# name -> (kind, relative path). kind is what the reference reader is: "torch", "safetensors", "jit", "folder".
SEEDS: dict[str, str] = {
    "zip.pt": "torch", "legacy.pt": "torch", "model.safetensors": "safetensors", "script.pt": "jit",
    "train.ckpt": "torch", "hub_st": "folder", "hub_bin": "folder", "dcp": "folder", "deepspeed": "folder",
}


def build(root: Path) -> dict[str, Path]:
    """Write every seed under ``root``; return name -> path (a file, or a folder for the layouts)."""
    root.mkdir(parents=True, exist_ok=True)
    sd = {**model().state_dict(), **_extra()}
    out: dict[str, Path] = {}
    out["zip.pt"] = root / "zip.pt"
    torch.save(sd, out["zip.pt"])
    out["legacy.pt"] = root / "legacy.pt"
    torch.save(sd, out["legacy.pt"], _use_new_zipfile_serialization=False)
    out["model.safetensors"] = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, out["model.safetensors"], metadata={"format": "pt"})
    out["script.pt"] = root / "script.pt"
    torch.jit.script(model()).save(str(out["script.pt"]))
    m, opt = trained()
    out["train.ckpt"] = root / "train.ckpt"
    torch.save({"epoch": 3, "global_step": 12, "state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "optimizer_states": [opt.state_dict()], "hyper_parameters": {"lr": 1e-2, "layers": [4, 8, 3]},
                "nested": {"ema": {"decay": 0.99, "shadow": {"fc.weight": m.fc.weight.detach().clone()}}}},
               out["train.ckpt"])
    from huggingface_hub import save_torch_state_dict

    for name, safe in (("hub_st", True), ("hub_bin", False)):
        out[name] = root / name
        out[name].mkdir()
        save_torch_state_dict(model().state_dict(), out[name], max_shard_size=300, safe_serialization=safe)
    out["dcp"] = root / "dcp"
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": m.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(out["dcp"]))
    from tests.deepspeed_fixtures import write_deepspeed_checkpoint

    out["deepspeed"] = root / "deepspeed"
    write_deepspeed_checkpoint(out["deepspeed"], model(), stage=2, world_size=2)
    return out
