"""Small real models shared by the tests."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class LSTMTagger(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 16, tags: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, tags)

    def forward(self, x):
        return self.out(self.lstm(self.embed(x))[0])


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every float tensor (parameters and buffers) fresh random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def bit_identical(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    """Every state-dict tensor of ``model`` has the same dtype and the same bytes as in ``snap``."""
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        now[k].dtype == snap[k].dtype and now[k].shape == snap[k].shape and torch.equal(_bits(now[k]), _bits(snap[k]))
        for k in now
    )


class InterruptOnCopy(torch.Tensor):
    """A checkpoint tensor whose copy into the model raises KeyboardInterrupt on the Nth copy (set
    ``InterruptOnCopy.countdown = N``): the interrupt comes from inside the load's own ``dst.copy_(src)``,
    through torch's dispatch."""

    countdown = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            cls.countdown -= 1
            if cls.countdown == 0:
                raise KeyboardInterrupt
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
