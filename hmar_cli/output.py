"""Writing result images: output paths, PNG text metadata, atomic writes that never clobber."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, PngImagePlugin

from hmar.errors import HmarError, InputError


class OutputError(HmarError):
    """An output that cannot be written (exists without --overwrite, unwritable folder)."""


def output_paths(template: str, count: int) -> list[Path]:
    """`out.png` for one image; several: `{i}` in the template is the index, else `-0`, `-1` … appended."""
    path = Path(template)
    if path.suffix.lower() != ".png":
        raise InputError(f"output must be a .png file, got {template!r}")
    if "{i}" in template:
        return [Path(template.replace("{i}", str(i))) for i in range(count)]
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work when an output exists (without --overwrite) or its folder is unusable."""
    for path in paths:
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"output folder {folder} is not writable")


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] → 8-bit RGB."""
    array = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or min(len(images), 8)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    canvas = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * w, (i // columns) * h))
    return canvas


def save_png(image: Image.Image, path: Path, metadata: dict[str, str], overwrite: bool) -> None:
    """Write to a temporary file beside the target, then rename: never a half-written output."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=info)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

