"""Images in: picture and mask files decoded from any format and mode Pillow reads, and the model's
float pixels as an image.

A picture is turned upright by its EXIF orientation and flattened to 8-bit RGB (any mode: RGBA, LA,
palette, grayscale, 1-bit, CMYK, 16-bit): transparency is composited on white (or dropped).
`load_picture` also keeps what an edit gives back (`restore_nature`): grayscale stays grayscale, and
alpha is kept outside what was regenerated. A mask is read as grey levels, white (above 50 %) =
regenerate, unless it has transparent pixels: then its alpha alone decides, opaque = regenerate
(`MASK_RULE`). Every failure is an `InputError` that names the file and the problem; images above
`MAX_PIXELS` are refused before they are decoded (decompression bombs).
"""
from __future__ import annotations

import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hmar.errors import InputError

MAX_PIXELS = 120_000_000  # larger images are refused unread (Pillow's own hard limit is ~179 MP)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: str | os.PathLike, *, alpha: str = "white", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file as upright 8-bit RGB. `alpha`: "white" composites transparency on white,
    "drop" discards it."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    image = _decode(Path(path), "image", max_pixels)
    return to_rgb(image, WHITE if alpha == "white" else None)


_GRAY_MODES = ("1", "L", "LA", "La", "F", *_SIXTEEN_BIT_MODES)


@dataclass(frozen=True)
class Nature:
    """What an edit's output keeps of its input besides the RGB pixels the model works on: a
    grayscale input gives a grayscale output, and one with transparency keeps its alpha (and the
    colours under it, which flattening on white would change) wherever nothing was regenerated."""

    gray: bool
    alpha: np.ndarray | None = None  # (H, W) uint8
    colour: np.ndarray | None = None  # (H, W, 3) uint8: the RGB under the alpha, not flattened
    deep: bool = False  # more than 8 bits a channel (16-bit, float): the output has 8


def load_picture(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, Nature]:
    """`load_image` (transparency on white) and the input's `Nature`, from one decoding."""
    return picture_from_image(_decode(Path(path), "image", max_pixels))


def picture_from_image(image: Image.Image) -> tuple[Image.Image, Nature]:
    """A decoded image of any mode as 8-bit RGB (transparency on white) and its `Nature`."""
    alpha = _alpha(image)
    colour = None if alpha is None else np.asarray(to_rgb(image, None))
    deep = image.mode in _SIXTEEN_BIT_MODES or image.mode == "F"
    return to_rgb(image, WHITE), Nature(image.mode in _GRAY_MODES, alpha, colour, deep)


def restore_nature(edited: Image.Image, nature: Nature, changed: np.ndarray, origin: tuple[int, int] = (0, 0)) -> Image.Image:
    """An edit's RGB result with the input's `Nature` back: grayscale stays grayscale (the kept
    pixels are grey, so their level is exact), and an input with alpha gets its own alpha and
    colours back outside `changed` (H, W bool, where the output's pixels were generated or blended),
    while what was generated is opaque. `origin`: where the input's pixel (0, 0) is in `edited`
    (outpainting's larger canvas, whose new area is `changed` and opaque)."""
    if nature.alpha is None:
        return edited.convert("L") if nature.gray else edited
    pixels = np.asarray(edited.convert("RGB"))
    colour, alpha = pixels.copy(), np.full(pixels.shape[:2], 255, dtype=np.uint8)
    height, width = nature.alpha.shape
    inside = np.s_[origin[1]:origin[1] + height, origin[0]:origin[0] + width]
    kept = ~changed[inside]
    colour[inside] = np.where(kept[..., None], nature.colour, pixels[inside])
    alpha[inside] = np.where(kept, nature.alpha, 255)
    if nature.gray:
        return Image.merge("LA", (Image.fromarray(colour, mode="RGB").convert("L"), Image.fromarray(alpha, mode="L")))
    return Image.fromarray(np.dstack([colour, alpha]), mode="RGBA")


#: how a mask file reads: said once, in the help and in the errors about masks
MASK_RULE = ("white (above 50 %) = regenerate, black = keep; a mask with transparent pixels is read by its alpha "
             "alone: opaque (painted) = regenerate, transparent = keep")


@dataclass(frozen=True)
class Mask:
    regenerate: np.ndarray  # (H, W) bool: True where new pixels are generated
    notes: tuple[str, ...] = ()  # things the user should know (resizing…)


def load_mask(path: str | os.PathLike, size: tuple[int, int], *, max_pixels: int = MAX_PIXELS) -> Mask:
    """A mask file for an image of `size` (W, H), read by `MASK_RULE`. Transparency counts when some
    pixel is less than 50 % opaque: a stroke painted on an empty layer, whatever its colour, marks
    what to regenerate. A mask of another size is resized to the image (with a note; one of another
    aspect ratio is stretched, and the note says so). A mask that selects nothing is refused with
    what was seen in it."""
    path = Path(path)
    return mask_from_image(_decode(path, "mask", max_pixels), size, path.name)


def mask_from_image(image: Image.Image, size: tuple[int, int], name: str) -> Mask:
    """`load_mask` of a decoded image; `name` says which mask in the notes and errors."""
    alpha = _alpha(image)
    by_alpha = alpha is not None and bool((alpha <= 127).any())
    values = alpha if by_alpha else np.asarray(to_rgb(image, BLACK).convert("L"))
    _check_mask_selects(name, values, by_alpha, "")
    notes = []
    if values.shape != (size[1], size[0]):
        notes.append(_resize_note(name, (values.shape[1], values.shape[0]), size))
        original = values.shape
        values = np.asarray(Image.fromarray(values, mode="L").resize(tuple(size), Image.Resampling.BILINEAR))
        _check_mask_selects(name, values, by_alpha, f" once resized from {original[1]}x{original[0]} to the image's "
                            f"{size[0]}x{size[1]} (what it marks is too thin at that scale)")
    regenerate = values > 127
    if by_alpha:
        notes.append(f"mask {name} has transparency, so its alpha decides: its opaque pixels ({_share(regenerate)} of "
                     f"the image) are regenerated, its transparent ones kept")
    return Mask(regenerate, tuple(notes))


def _alpha(image: Image.Image) -> np.ndarray | None:
    """The (H, W) uint8 alpha of an image that has one (a band, or a palette/colour-key
    transparency), else None."""
    bands = image.getbands()
    for band in ("A", "a"):
        if band in bands:
            return np.asarray(image.getchannel(band))
    if "transparency" in image.info and image.mode not in _SIXTEEN_BIT_MODES:
        return np.asarray(image.convert("RGBA").getchannel("A"))
    return None


def _check_mask_selects(name: str, values: np.ndarray, by_alpha: bool, where: str) -> None:
    if (values > 127).any():
        return
    brightest = int(values.max()) if values.size else 0
    if by_alpha:
        seen = "it is fully transparent" if brightest == 0 else f"the most opaque is {brightest}/255"
        raise InputError(f"mask {name} selects nothing to regenerate{where}: no pixel is more than 50 % opaque ({seen}; "
                         f"a mask with transparent pixels is read by its alpha: opaque = regenerate)")
    seen = "it is all black" if brightest == 0 else f"the brightest is {brightest}/255"
    raise InputError(f"mask {name} selects nothing to regenerate{where}: no pixel is brighter than 50 % ({seen}; "
                     f"white = regenerate, black = keep)")


def _resize_note(name: str, mask_size: tuple[int, int], size: tuple[int, int]) -> str:
    """A mask of the image's aspect ratio (up to rounding: a scaled copy) is resized; another is
    stretched, which moves what it marks: the note says which."""
    (mask_width, mask_height), (width, height) = mask_size, size
    said = f"mask {name} is {mask_width}x{mask_height} but the image is {width}x{height}"
    if 2 * abs(mask_width * height - mask_height * width) <= max(width + height, mask_width + mask_height):
        return f"{said}: the mask was resized to the image"
    return (f"{said}: another aspect ratio ({mask_width / mask_height:.2f} against {width / height:.2f}), so the mask was "
            f"stretched {width / mask_width:.3g}x wide and {height / mask_height:.3g}x tall to fit, which moves what it marks")


def _share(regenerate: np.ndarray) -> str:
    percent = 100.0 * np.count_nonzero(regenerate) / max(regenerate.size, 1)
    return f"{percent:.0f} %" if percent >= 1 or percent == 0 else f"{percent:.2g} %"


def _decode(path: Path, what: str, max_pixels: int) -> Image.Image:
    """Open, check the pixel count, decode fully and apply the EXIF orientation."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not an image file")
    if not path.is_file():  # a pipe or a device would block or never end
        raise InputError(f"{what} {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(path) as image:
                _check_pixels(path, what, image.size, max_pixels)
                _check_still(path, what, image)
                image.load()
                return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:  # refused by Pillow from the header, before ours could see the size
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(counted[1]):,} pixels, " if counted else ""
        raise InputError(f"{what} {path} has {size}more than Pillow's safety limit allows (a decompression bomb?) and more "
                         f"than the limit of {max_pixels:,}") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} {path} is not an image (or not in a format Pillow can read)") from None
    except PermissionError:
        raise InputError(f"cannot read {what} {path}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} {path} is corrupt or truncated ({detail})") from None


def _check_pixels(path: Path, what: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(f"{what} {path} is {width}x{height} = {width * height:,} pixels, more than the limit of "
                         f"{max_pixels:,} (a decompression bomb, or simply too large: downscale it first)")


def _check_still(path: Path, what: str, image: Image.Image) -> None:
    """Refuses an animation (GIF, APNG, WebP) or a multi-page file: which frame is meant is unknown.
    A camera's MPO counts as still: its first picture is the photo, the others are previews."""
    if getattr(image, "is_animated", False) and image.format != "MPO":
        raise InputError(f"{what} {path} has {image.n_frames} frames (an animation or a multi-page file): save the frame to "
                         f"edit as a still image first")


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """Any mode → 8-bit RGB; transparency composited on `background` (None: dropped)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = Image.fromarray(_to_8bit(np.asarray(image), image.mode), mode="L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if background is None:
            return rgba.convert("RGB")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel 16-bit pixels (0..65535) or floats (0..1, else 0..255) → uint8."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0)
    if mode in _SIXTEEN_BIT_MODES:
        values = values / 257.0
    elif values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def image_from_array(pixels: np.ndarray) -> Image.Image:
    """(H, W, 3) floats in [0, 1] → 8-bit RGB (rounded to the nearest level)."""
    levels = np.rint(np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0) * np.float32(255.0))
    return Image.fromarray(levels.astype(np.uint8), mode="RGB")
