"""Output files: PNG, JPEG or WebP by the output's suffix, with the settings as metadata in the
format's own way (PNG text; EXIF UserComment for JPEG and WebP), read back by `read_metadata`;
written to a temporary file beside the target and moved into place, never replacing an existing
file unless asked; output names from a template; grids.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from hmar.atomic import atomic_write
from hmar.errors import HmarError, InputError, arg
from hmar.images import WHITE, to_rgb


class OutputError(HmarError):
    """An output the user named that cannot be used (exists without --overwrite, an unusable
    folder): a usage error, like every other bad input."""

    exit_code = 2


class WriteError(OutputError):
    """Writing an output failed (a full disk, a folder made read-only meanwhile): a runtime failure."""

    exit_code = 1


#: the formats an output may have, by its suffix (Pillow's format names)
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SUFFIXES = ", ".join(list(OUTPUT_FORMATS)[:-1]) + " or " + list(OUTPUT_FORMATS)[-1]
DEFAULT_QUALITY = 95  # JPEG and WebP: high enough that the compression does not show on a photo
_EXIF_IFD, _USER_COMMENT, _SOFTWARE = 0x8769, 0x9286, 0x0131
_ASCII_COMMENT = b"ASCII\0\0\0"  # the character code EXIF puts before a UserComment's text


def output_format(path: str | os.PathLike) -> str:
    """Pillow's format for an output path, by its suffix; an InputError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"output must be a {_SUFFIXES} file, got {str(path)!r}")
    return OUTPUT_FORMATS[suffix]


def check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise InputError(f"{arg('quality')} must be a whole number from 1 to 100, got {quality}")


def output_paths(template: str, count: int) -> list[Path]:
    """One path per image: `{i}` in the template is the index; else one image keeps the name and
    several get `-0`, `-1` … before the suffix."""
    output_format(template)
    if "{i}" in template:
        return [Path(template.replace("{i}", str(i))) for i in range(count)]
    path = Path(template)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work when an output exists (without `overwrite`) or cannot be made: a
    missing folder is fine (it is made when the image is written) if the nearest folder that
    exists above it is writable."""
    for path in paths:
        if path.is_dir():
            raise OutputError(f"output {path} is a folder; give a file name ending in {_SUFFIXES}")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass {arg('overwrite', True)} to replace it")
        folder = _folder_of(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"cannot make the output folder {_folder_of(path)}: {folder} is a file")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"output folder {folder} is not writable")


def save_image(image: Image.Image, path: str | os.PathLike, metadata: dict[str, str], overwrite: bool = False,
               quality: int = DEFAULT_QUALITY) -> None:
    """Write `image` in the format its suffix names (`OUTPUT_FORMATS`), atomically (a temporary
    file beside the target, then a rename), making its folder if needed. `metadata` goes where the
    format keeps text: PNG text chunks; for JPEG and WebP an EXIF UserComment holding the same
    keys as JSON (and Software as EXIF's own tag). `quality` (1..100) applies to JPEG and WebP.
    JPEG has no transparency: an image with alpha is written on white. Without `overwrite` an
    existing file is never replaced (also not one that appears meanwhile)."""
    path = Path(path)
    kind = output_format(path)
    check_quality(quality)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass {arg('overwrite', True)} to replace it")
    if kind == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, str(value))
        options = {"pnginfo": info}
    else:
        exif = Image.Exif()
        if "Software" in metadata:
            exif[_SOFTWARE] = str(metadata["Software"])
        text = json.dumps({key: str(value) for key, value in metadata.items()}, ensure_ascii=True)
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII_COMMENT + text.encode("ascii")
        options = {"quality": int(quality), "exif": exif.tobytes()}
        if kind == "JPEG" and image.mode not in ("RGB", "L"):
            image = to_rgb(image, WHITE)
    folder = _folder_of(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission
        raise WriteError(f"cannot write {path}: cannot make its folder {folder} ({exc.strerror or exc})") from None
    try:
        with atomic_write(path, overwrite=overwrite) as temporary, open(temporary, "wb") as stream:
            image.save(stream, format=kind, **options)
    except FileExistsError:
        raise OutputError(f"{path} exists; pass {arg('overwrite', True)} to replace it") from None
    except OSError as exc:  # a full disk, a read-only folder…: the user's to fix, not a bug
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `save_image` wrote: PNG text, or the JSON in a JPEG's or WebP's EXIF
    UserComment ({} when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}" if not path.exists() else f"image {path} is not a regular file")
    try:  # text and EXIF come before the pixels: nothing is decoded
        with Image.open(path) as image:
            if image.format == "PNG":
                return dict(image.text)
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read the metadata of {path} ({type(exc).__name__})") from None
    if isinstance(comment, str):  # Pillow decodes a comment with its character code
        comment = comment.encode("utf-8")
    if not comment:
        return {}
    try:
        stored = json.loads(comment.removeprefix(_ASCII_COMMENT).decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    return {str(key): str(value) for key, value in stored.items()} if isinstance(stored, dict) else {}


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, `columns` per row (default: up to 8), on white."""
    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    canvas = Image.new("RGB", (columns * width, rows * height), WHITE)
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * width, (i // columns) * height))
    return canvas
