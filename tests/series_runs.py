"""A real short training run on disk, for the series tests: the digits CNN trained one epoch at a time with
its first convolution frozen, saved Lightning-style after every epoch, the head multiplied by 50 from epoch
``blow_up_from`` on and one NaN put into the head's bias at epoch ``nan_at``."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptviz.demo import DigitsCNN, digits, train


def save_run(folder: Path, epochs: int, *, blow_up_from: int, nan_at: int, samples: int = 256,
             steps_per_epoch: int = 4) -> list[dict[str, torch.Tensor]]:
    """Write ``epoch={e}.ckpt`` for e = 1..epochs into ``folder``; return the state dicts saved."""
    x, y = digits()
    x, y = x[:samples], y[:samples]
    torch.manual_seed(0)
    model = DigitsCNN(10)
    model.features[0].requires_grad_(False)
    saved = []
    for epoch in range(1, epochs + 1):
        train(model, x, y, epochs=1, params=[p for p in model.parameters() if p.requires_grad], seed=epoch)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        if epoch >= blow_up_from:
            sd["head.weight"] *= 50.0
        if epoch == nan_at:
            sd["head.bias"][3] = float("nan")
        saved.append(sd)
        torch.save({"epoch": epoch, "global_step": steps_per_epoch * epoch, "state_dict": sd},
                   folder / f"epoch={epoch}.ckpt")
    return saved
