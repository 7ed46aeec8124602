"""A pre-training task that needs no download: digits and letters rendered from the 21 fonts matplotlib ships,
degraded into 8x8 images made the way scikit-learn's digits were (32x32 bitmaps, 4x4 blocks counted).

Used by ``notebooks/02_transfer_learning.ipynb``: a model trained on these glyphs transfers to the real
handwritten digits, where training on digits 0-4 did not help 5-9."""

from __future__ import annotations

import math
import os
import string

import numpy as np
import torch
import torch.nn.functional as F

FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10",
)


def font_templates(chars: str, fonts: tuple[str, ...] = FONTS, size: int = 64) -> torch.Tensor:
    """Each character of ``chars`` in each font as a ``size`` x ``size`` coverage map in [0, 1].

    Returns a tensor (len(fonts), len(chars), size, size). The glyph is cropped to its ink and scaled to
    the full height (keeping its aspect ratio, at most the full width), centred, like the 32x32 bitmaps
    sklearn's digits were made from."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    root = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    cell, dpi = 2 * size, 100
    out = torch.zeros(len(fonts), len(chars), size, size)
    for f, name in enumerate(fonts):
        fig = Figure(figsize=(cell * len(chars) / dpi, cell / dpi), dpi=dpi)
        FigureCanvasAgg(fig)
        prop = FontProperties(fname=os.path.join(root, name + ".ttf"))
        for c, ch in enumerate(chars):
            fig.text((c + 0.5) / len(chars), 0.5, ch, fontproperties=prop, size=size * 72 / dpi,
                     ha="center", va="center")
        fig.canvas.draw()
        ink = 1.0 - np.asarray(fig.canvas.buffer_rgba())[..., 0].astype(np.float32) / 255.0
        for c in range(len(chars)):
            tile = torch.from_numpy(np.ascontiguousarray(ink[:, c * cell:(c + 1) * cell]))
            rows, cols = (tile > 0.3).any(1).nonzero(), (tile > 0.3).any(0).nonzero()
            if len(rows) == 0:
                continue
            tile = tile[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            h, w = tile.shape
            scale = min(size / h, size / w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            tile = F.interpolate(tile[None, None], size=(nh, nw), mode="area" if scale < 1 else "bilinear",
                                 **({} if scale < 1 else {"align_corners": False}))[0, 0]
            top, left = (size - nh) // 2, (size - nw) // 2
            out[f, c, top:top + nh, left:left + nw] = tile
    return out.clamp(0, 1)


def degrade(templates: torch.Tensor, n: int, *, seed: int = 0, rotate: float = 12.0, shear: float = 0.3,
            scale: tuple[float, float] = (0.85, 1.0), aspect: tuple[float, float] = (0.83, 1.1),
            shift: float = 0.08, elastic: float = 0.06, width: tuple[float, float] = (0.25, 0.6),
            blur: float = 2.0, dilate_p: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 8x8 images (values k/16) drawn from ``templates`` (T, size, size), with their template indices.

    Each image: a random affine map (rotation, shear, scale, aspect, shift) plus a smooth random
    displacement, sampled into a 32x32 bitmap from the blurred template and thresholded at a random
    level (thin to thick strokes, optionally dilated once more), then 4x4 blocks counted, as in UCI's
    optdigits from which sklearn's digits come."""
    g = torch.Generator().manual_seed(seed)
    T = templates.shape[0]
    idx = torch.randint(T, (n,), generator=g)

    def u(lo, hi, shape=(n,)):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    src = templates[:, None]
    if blur > 0:
        k = int(2 * math.ceil(2 * blur) + 1)
        x = torch.arange(k, dtype=torch.float32) - k // 2
        w = torch.exp(-x ** 2 / (2 * blur ** 2))
        w = w / w.sum()
        src = F.conv2d(F.pad(src, (k // 2,) * 4), w.view(1, 1, 1, k))
        src = F.conv2d(src, w.view(1, 1, k, 1))
        src = src / src.amax((2, 3), keepdim=True).clamp_min(1e-6)
    a = u(-rotate, rotate) * math.pi / 180
    sh = u(-shear, shear)
    s = u(*scale)
    sx = s * u(*aspect)  # horizontal scale: the grid maps output to input, hence the divisions below
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / sx
    theta[:, 0, 1] = (-sin + sh) / sx
    theta[:, 1, 0] = sin / s
    theta[:, 1, 1] = cos / s
    theta[:, :, 2] = u(-shift, shift, (n, 2))
    grid = F.affine_grid(theta, (n, 1, 32, 32), align_corners=False)
    if elastic > 0:
        d = torch.randn(n, 2, 4, 4, generator=g) * elastic
        grid = grid + F.interpolate(d, size=(32, 32), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    img = F.grid_sample(src[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bits = (img > u(*width).view(n, 1, 1, 1)).float()
    thick = (torch.rand(n, generator=g) < dilate_p).view(n, 1, 1, 1)
    bits = torch.where(thick, F.max_pool2d(bits, 3, 1, 1), bits)
    return F.avg_pool2d(bits, 4), idx


def glyphs(chars: str = string.digits + string.ascii_uppercase, n: int = 12000, *, seed: int = 0,
           fonts: tuple[str, ...] = FONTS, **augment) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 8x8 images of ``chars`` rendered from matplotlib's bundled fonts, as (images (n,1,8,8) in
    [0, 1] with values k/16, labels = index into ``chars``). Deterministic for a given ``seed``."""
    t = font_templates(chars, fonts)
    x, idx = degrade(t.flatten(0, 1), n, seed=seed, **augment)
    return x, idx % len(chars)
