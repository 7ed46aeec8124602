"""Demo material that needs no download: a small CNN trained for seconds on scikit-learn's bundled
digits, saved the way real training scripts save (DataParallel prefix, optimizer, epoch).

Run ``python -m ckptviz.demo`` to build the checkpoint and print what ckptviz makes of it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digit images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(x)))


def digits(classes: range | list[int] = range(10)) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits of the given classes, as (images, labels re-numbered from 0)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = [i for i, y in enumerate(data.target) if y in classes]
    x = torch.tensor(data.images[keep], dtype=torch.float32).unsqueeze(1) / 16.0
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[int(t)] for t in data.target[keep]])
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5, lr: float = 1e-2,
          params=None, seed: int = 0) -> torch.optim.Optimizer:
    """A few epochs of Adam on (x, y); returns the optimizer."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return opt


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def make_demo_checkpoint(path: str | os.PathLike, *, epochs: int = 5) -> Path:
    """Train a DigitsCNN on all ten digits and save it as a DataParallel-wrapped training checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x, y = digits()
    model = DigitsCNN(10)
    opt = train(model, x, y, epochs=epochs)
    wrapped = nn.DataParallel(model)  # keys gain "module.", as in many real checkpoints
    torch.save({
        "epoch": epochs,
        "model_state_dict": wrapped.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "hparams": {"lr": 1e-2, "batch_size": 64, "num_classes": 10},
        "accuracy": accuracy(model, x, y),
        "torch_version": str(torch.__version__),
    }, path)
    return path


def main(argv: list[str] | None = None) -> None:
    import pandas as pd

    import ckptviz as cv

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=os.path.expanduser("~/ckptviz-demo"),
                        help="where to write the demo checkpoint")
    parser.add_argument("--build-only", action="store_true", help="only make the checkpoint (if missing)")
    args = parser.parse_args(argv)
    path = Path(args.dir) / "digits_cnn.pth.tar"
    if not path.exists():
        print(f"training a small CNN on scikit-learn's digits -> {path}")
        make_demo_checkpoint(path)
    if args.build_only:
        return
    ck = cv.open_checkpoint(path)
    print(f"\n{ck}\nmetadata: {ck.metadata}\n")
    model = DigitsCNN(num_classes=5)  # a new head: the transfer-learning case
    report = cv.compare(model, ck)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 100):
        print(report.frame.drop(columns=["model_device", "ckpt_device"]).to_string(index=False))
    print(f"\nsummary: {report.summary}\nrules inferred: {report.rules}")
    result = cv.load_partial(model, report)
    print(f"\n{result}\nskipped: {result.skipped}")
    print("\nNext: scripts/test runs every test; the README shows the Python API.")


if __name__ == "__main__":
    main()
