"""Sample grids written during training: a row-major mosaic of images in [0, 1], as one PNG."""
from __future__ import annotations

from pathlib import Path

import torch

from hmar.atomic import atomic_write
from hmar.images import image_from_array
from hmar.outputs import grid


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """`images` (N, 3, H, W) in [0, 1] → PNG at `path` (written atomically)."""
    pictures = [image_from_array(image.permute(1, 2, 0).numpy()) for image in images.detach().float().cpu()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, overwrite=True) as temporary:
        grid(pictures, min(columns, len(pictures))).save(temporary, format="PNG")
    return path
