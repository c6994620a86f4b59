"""Sample grids written during training: a row-major mosaic of images in [0, 1], as one PNG."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from hmar.atomic import atomic_write


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """`images` (N, 3, H, W) in [0, 1] → PNG at `path` (written atomically)."""
    n, _, h, w = images.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, columns)
        canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    array = canvas.mul(255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=True) as temporary:
        Image.fromarray(array, "RGB").save(temporary, format="PNG")
    return path
