"""Image files in and out, for generation and the editing commands.

Reading: any image Pillow decodes, in any mode (RGBA, LA, palette, grayscale, 1-bit, CMYK, 16-bit),
turned upright by its EXIF orientation and flattened to 8-bit RGB: transparency is composited on
white (or dropped). `load_picture` also keeps what an edit gives back (`restore_nature`): grayscale
stays grayscale, and alpha is kept outside what was regenerated. A mask is read as grey levels, white (above 50 %) = regenerate, unless it has
transparent pixels: then its alpha alone decides, opaque = regenerate (`MASK_RULE`). Every failure is
an `InputError` that names the file and the problem; images above a pixel limit are refused before
they are decoded (decompression bombs), and so is every size that would make the model's window over
a region, or an outpaint canvas, larger than that limit.

Colour matching (`match_colours`): a model that regenerates a region may shift its colours a little,
which shows as a box; the smooth offset that takes the generated border to the input's is added
inside the region. Which windows of the image the model sees, and how its outputs go back, is
`hmar.edit_window`.

Writing: PNG, JPEG or WebP by the output's suffix, with the settings as metadata in the format's
own way (PNG text; EXIF UserComment for JPEG and WebP), written to a temporary file beside the target and moved into place,
never replacing an existing file unless asked; output names from a template; grids.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np  # cv2 is imported in the functions that use it: the CLI imports this module to start
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from hmar.atomic import atomic_write
from hmar.errors import HmarError, InputError

MAX_PIXELS = 120_000_000  # larger images are refused unread (Pillow's own hard limit is ~179 MP)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class OutputError(HmarError):
    """An output the user named that cannot be used (exists without --overwrite, an unusable
    folder): a usage error, like every other bad input."""

    exit_code = 2


class WriteError(OutputError):
    """Writing an output failed (a full disk, a folder made read-only meanwhile): a runtime failure."""

    exit_code = 1


# ---- reading ----------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, *, alpha: str = "white", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file as upright 8-bit RGB. `alpha`: "white" composites transparency on white,
    "drop" discards it."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    image = _decode(Path(path), "image", max_pixels)
    return _to_rgb(image, WHITE if alpha == "white" else None)


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
    colour = None if alpha is None else np.asarray(_to_rgb(image, None))
    deep = image.mode in _SIXTEEN_BIT_MODES or image.mode == "F"
    return _to_rgb(image, WHITE), Nature(image.mode in _GRAY_MODES, alpha, colour, deep)


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
    values = alpha if by_alpha else np.asarray(_to_rgb(image, BLACK).convert("L"))
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


def _to_rgb(image: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
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


# ---- masks and boxes --------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A rectangle in pixels: x0, y0 inclusive, x1, y1 exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int


def parse_box(text: str) -> Box:
    """`x0,y0,x1,y1`: whole numbers of pixels, x0,y0 the top-left corner, x1,y1 the bottom-right
    (exclusive), so x1 > x0 and y1 > y0. Any values: `clip_box` fits the box to an image."""
    shown = _shown(text)
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise InputError(f"box must be four integers x0,y0,x1,y1, got {len(parts)} value{'s' * (len(parts) != 1)}: {shown}")
    for part in parts:
        if not re.fullmatch(r"[+-]?\d{1,30}", part):  # more digits than that: no image is that large
            raise InputError(f"box must be four integers x0,y0,x1,y1, but {_shown(part)} is not a whole number of pixels "
                             f"(in {shown})")
    box = Box(*(int(p) for p in parts))
    for axis, start, stop in (("x", box.x0, box.x1), ("y", box.y0, box.y1)):
        if stop <= start:
            raise InputError(f"box {_box_text(box)} is empty: {axis}1 {stop} is not past {axis}0 {start} (x0,y0 is the top-left "
                             f"corner, x1,y1 the bottom-right: x1 > x0 and y1 > y0)")
    return box


def clip_box(box: Box, size: tuple[int, int]) -> tuple[Box, tuple[str, ...]]:
    """`box` cut to an image of `size` (W, H), with a note when that changed it; a box wholly
    outside the image is refused."""
    width, height = size
    clipped = Box(max(box.x0, 0), max(box.y0, 0), min(box.x1, width), min(box.y1, height))
    if clipped.x1 <= clipped.x0 or clipped.y1 <= clipped.y0:
        raise InputError(f"box {_box_text(box)} lies wholly outside the {width}x{height} image "
                         f"(x must be within 0..{width}, y within 0..{height})")
    if clipped == box:
        return box, ()
    return clipped, (f"box {_box_text(box)} reaches past the edge of the {width}x{height} image: clipped to {_box_text(clipped)}",)


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True inside `box`, which must lie within an image of `size` (W, H)."""
    width, height = size
    if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        raise InputError(f"box {_box_text(box)} reaches outside the {width}x{height} image "
                         f"(x must be within 0..{width}, y within 0..{height})")
    regenerate = np.zeros((height, width), dtype=bool)
    regenerate[box.y0:box.y1, box.x0:box.x1] = True
    return regenerate


def _box_text(box: Box) -> str:
    return f"{box.x0},{box.y0},{box.x1},{box.y1}"


def _shown(text: object, limit: int = 40) -> str:
    """A user's text quoted for a one-line message, shortened when long."""
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def mask_notes(regenerate: np.ndarray) -> tuple[str, ...]:
    """Refuses a mask with nothing to regenerate; notes one that covers everything."""
    if not regenerate.any():
        raise InputError("the mask selects nothing to regenerate: nothing to do")
    if regenerate.all():
        return ("the mask covers the whole image: this is the same as generating a new image",)
    return ()


def check_region(regenerate: np.ndarray, *, dilate_pixels: int = 0, feather_pixels: int = 0,
                 max_pixels: int = MAX_PIXELS) -> None:
    """Refuses, before anything of the image's size is made, what an edit of `regenerate` (H, W)
    bool cannot do: nothing to regenerate, a bad --dilate or --feather, or a region
    whose square model window (at least as wide as the region's bounding box, after dilation)
    would have more than `max_pixels`."""
    mask_notes(regenerate)
    check_pixels_option("dilate", dilate_pixels)
    check_pixels_option("feather", feather_pixels)
    height, width = regenerate.shape
    rows, columns = regenerate.any(axis=1), regenerate.any(axis=0)
    y0, y1 = int(rows.argmax()), height - int(rows[::-1].argmax())
    x0, x1 = int(columns.argmax()), width - int(columns[::-1].argmax())
    grown = (min(width, x1 + dilate_pixels) - max(0, x0 - dilate_pixels), min(height, y1 + dilate_pixels) - max(0, y0 - dilate_pixels))
    if feather_pixels > max(grown):  # the blend weight would stay far below 1 everywhere
        raise InputError(f"--feather {feather_pixels} is wider than the region to regenerate ({grown[0]}x{grown[1]} pixels"
                         f"{' after --dilate' if dilate_pixels else ''}): the generated pixels would never blend in")
    check_window_side(grown, max_pixels)


def check_window_side(extent: tuple[int, int], max_pixels: int = MAX_PIXELS,
                      remedy: str = "make the region smaller or downscale the image") -> None:
    """Refuses a region spanning `extent` (W, H) pixels when the model's square window over it,
    at least max(W, H) a side, would have more than `max_pixels`: it is made at that size."""
    side = max(extent)
    if side * side > max_pixels:
        raise InputError(f"the region to generate spans {extent[0]}x{extent[1]} pixels: the model's square window over it "
                         f"would be {side}x{side} = {side * side:,} pixels, more than the limit of {max_pixels:,} "
                         f"(a side of at most {math.isqrt(max_pixels):,}); {remedy}")


def dilate(regenerate: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the region to regenerate by `pixels` in every direction: every pixel within that
    (Euclidean) distance of it. A distance transform, not a brush, so that time and memory do not
    grow with `pixels`."""
    import cv2
    check_pixels_option("dilate", pixels)
    if pixels == 0 or not regenerate.any():
        return regenerate.copy()
    distance = cv2.distanceTransform((~regenerate).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance <= pixels


def feather(regenerate: np.ndarray, pixels: int) -> np.ndarray:
    """Blend weight of the generated pixels, (H, W) float32: 0 exactly outside the region, rising
    to 1 over `pixels` inside it (0: a hard edge)."""
    import cv2
    check_pixels_option("feather", pixels)
    if pixels == 0:
        return regenerate.astype(np.float32)
    distance = cv2.distanceTransform(regenerate.astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(distance / float(pixels), 0.0, 1.0).astype(np.float32)


#: the blend band `default_feather` picks: this share of the narrowest region's width, at most
#: FEATHER_LIMIT pixels: wide enough to hide the seam on a photo, narrow enough that the middle of
#: every region is wholly generated and no band of half-old, half-new pixels shows a double image
FEATHER_SHARE = 0.25
FEATHER_LIMIT = 32
FEATHER_RULE = f"a quarter of the narrowest region's width, at most {FEATHER_LIMIT} pixels"


def default_feather(regenerate: np.ndarray, dilate_pixels: int = 0) -> int:
    """The --feather an edit of `regenerate` (H, W) bool gets when none is given (`FEATHER_RULE`):
    a region's width is twice the largest distance from its inside to its edge (after dilation;
    the image's border is no edge);
    the narrowest connected region decides, so that it too is fully generated in its middle."""
    import cv2

    region = dilate(regenerate, dilate_pixels)
    if not region.any():
        return 0
    # the image's border is no edge, as in `feather`: a region cut by it is as wide as its inside shows
    distance = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
    count, labels = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
    deepest = np.zeros(count, dtype=np.float32)
    np.maximum.at(deepest, labels[region], distance[region])
    width = 2.0 * float(deepest[1:].min())
    return int(min(FEATHER_LIMIT, max(region.shape), max(1, round(FEATHER_SHARE * width))))


# Colour matching (`match_colours`): the generated region's colours are compared with the input's
# along a ring of this many pixels inside the region's edge (at the model's resolution; scaled to the
# output), low-passed over about as many pixels, and Jacobi sweeps per pyramid level fill the offset in.
MATCH_RING = 3.0
MATCH_SWEEPS = 40
MATCH_OUTLIER = 12.0  # levels of 255 (RGB distance) from the ring's fitted cast: content, not a cast


def match_colours(generated: np.ndarray, original: np.ndarray, region: np.ndarray, known: np.ndarray,
                  ring: float = MATCH_RING) -> np.ndarray:
    """`generated` (H, W, 3) float32 with its `region` shifted by a smooth colour offset so that it
    meets the `known` pixels of `original` at the region's edge, as Poisson image editing would if the
    region's own gradients guided it: along a ring `ring` pixels wide inside the edge, the offset is
    the input's local colour (from masked blurs of the known pixels nearby) minus the generated one
    (the same over the region), and inside the ring it is the membrane (harmonic) interpolation of
    that, with reflecting edges where the region meets the image border. Ring pixels whose offset is
    far from a robust smooth fit of the ring's offsets (content cut by the edge) set none. Detail is
    the generated image's own; only a slowly varying colour shift is removed. (H, W) bool masks.
    A ring wider than `MATCH_RING` (an output larger than the model's view) is worked out at the
    scale where it is `MATCH_RING` pixels, and the offset resized back."""
    import cv2
    if not region.any() or not known.any():
        return generated
    margin = int(np.ceil(4 * ring)) + 1
    ys, xs = np.nonzero(region)
    height, width = region.shape
    y0, y1 = max(0, ys.min() - margin), min(height, ys.max() + 1 + margin)
    x0, x1 = max(0, xs.min() - margin), min(width, xs.max() + 1 + margin)
    inside, beside = region[y0:y1, x0:x1], known[y0:y1, x0:x1]
    crops = generated[y0:y1, x0:x1], original[y0:y1, x0:x1]
    shrink = ring / MATCH_RING
    if shrink > 1.5:
        size = (max(1, round((x1 - x0) / shrink)), max(1, round((y1 - y0) / shrink)))
        small = [cv2.resize(np.ascontiguousarray(a), size, interpolation=cv2.INTER_AREA) for a in (*crops, inside.astype(np.float32), beside.astype(np.float32))]
        fill = _colour_offset(small[0], small[1], small[2] > 0.5, small[3] > 0.999, MATCH_RING)
        fill = None if fill is None else cv2.resize(fill, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    else:
        fill = _colour_offset(*crops, inside, beside, ring)
    if fill is None:
        return generated
    result = generated.copy()
    window = result[y0:y1, x0:x1]
    window[inside] += fill[inside]
    return result


def _colour_offset(generated: np.ndarray, original: np.ndarray, inside: np.ndarray, beside: np.ndarray,
                   ring: float) -> np.ndarray | None:
    """`match_colours`' offset field over a crop, or None where nothing sets it."""
    import cv2
    if not inside.any() or not beside.any():
        return None
    # the ring: region pixels within `ring` of a known one
    distance = cv2.distanceTransform((~beside).astype(np.uint8), cv2.DIST_L2, 5)
    on_ring = inside & (distance <= ring)
    if not on_ring.any():
        return None
    offset = (_edge_colour(original, beside, ring) - _edge_colour(generated, inside, ring)).astype(np.float32)
    # A colour cast shifts the ring alike (or drifting slowly) wherever one surface (a background)
    # meets itself across the edge; where content crosses the edge (an object cut by the region,
    # drawn differently inside) the offsets scatter. So the cast is a robust smooth fit to the ring's
    # offsets, and only pixels near it set the offset: the membrane carries theirs across the others.
    ring_y, ring_x = np.nonzero(on_ring)
    cast = _smooth_cast(offset[on_ring], np.stack([ring_y, ring_x], axis=-1).astype(np.float32), MATCH_OUTLIER)
    anchors = np.zeros_like(on_ring)
    anchors[ring_y, ring_x] = np.linalg.norm(offset[on_ring] - cast, axis=-1) <= MATCH_OUTLIER
    if not anchors.any():
        return None
    return _membrane(np.where(anchors[..., None], offset, 0.0).astype(np.float32), anchors)


def _smooth_cast(offsets: np.ndarray, positions: np.ndarray, width: float, rounds: int = 6) -> np.ndarray:
    """The cast at each of N ring pixels: a robust fit of a plane in position to the (N, 3)
    offsets. It starts from the offsets near the densest cell of a `width` grid (the mode: robust
    where most of the ring is content, not cast), then reweights (Huber, scale `width`), so that a
    cast that drifts along the ring is followed and offsets far from the plane barely count."""
    cells, counts = np.unique(np.round(offsets / width).astype(np.int64), axis=0, return_counts=True)
    weight = (np.linalg.norm(offsets - cells[counts.argmax()] * width, axis=-1) <= width).astype(np.float64)
    centred = (positions - positions.mean(axis=0)) / max(float(positions.std()), 1.0)
    design = np.concatenate([np.ones((len(offsets), 1)), centred], axis=1)
    for _ in range(rounds):
        root = np.sqrt(weight)[:, None]
        coefficients = np.linalg.lstsq(design * root, offsets * root, rcond=None)[0]
        distance = np.linalg.norm(offsets - design @ coefficients, axis=-1)
        weight = np.minimum(1.0, width / np.maximum(distance, 1e-6))
    return (design @ coefficients).astype(np.float32)


def _edge_colour(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """The local colour of the `mask` side of an edge, extrapolated to each pixel: a masked blur's
    centroid lies inside the mask, about in proportion to the blur's width, so twice the blur at
    `sigma` minus the blur at 2·sigma cancels the bias a colour gradient would give."""
    return 2.0 * _masked_blur(values, mask, sigma) - _masked_blur(values, mask, 2.0 * sigma)


def _masked_blur(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of `values` over the `mask` pixels only (normalised convolution)."""
    import cv2
    weight = mask.astype(np.float32)
    blurred = cv2.GaussianBlur(values * weight[..., None], (0, 0), sigma)
    norm = cv2.GaussianBlur(weight, (0, 0), sigma)[..., None]
    return (blurred / np.maximum(norm, 1e-6)).astype(np.float32)


def _shrink_known(values: np.ndarray, known: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`values` and `known` at `size` (W, H): each coarse pixel the mean of the known values it covers,
    known where it covers any."""
    import cv2
    share = cv2.resize(known.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(values * known[..., None], size, interpolation=cv2.INTER_AREA) / np.maximum(share, 1e-6)[..., None]
    return coarse.astype(np.float32), share > 0


def _membrane(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """`values` kept where `known`, harmonic elsewhere (each pixel the mean of its 4 neighbours; edges
    reflect): Jacobi sweeps, started from the solution at half the resolution."""
    import cv2
    height, width = known.shape
    if known.all():
        return values
    if min(height, width) > 8:
        fill = cv2.resize(_membrane(*_shrink_known(values, known, ((width + 1) // 2, (height + 1) // 2))), (width, height),
                          interpolation=cv2.INTER_LINEAR)
    else:
        fill = np.broadcast_to(values[known].mean(axis=0), values.shape).astype(np.float32)
    fill = np.where(known[..., None], values, fill)
    for _ in range(MATCH_SWEEPS):
        edged = np.pad(fill, ((1, 1), (1, 1), (0, 0)), mode="edge")
        mean = (edged[:-2, 1:-1] + edged[2:, 1:-1] + edged[1:-1, :-2] + edged[1:-1, 2:]) * 0.25
        fill = np.where(known[..., None], values, mean)
    return fill


def check_pixels_option(name: str, pixels: int) -> None:
    """--dilate and --feather: whole pixels, no more than the longest side any accepted image can
    have (time and memory do not grow with them: a distance transform does the work)."""
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 0:
        raise InputError(f"--{name} must be a whole number of pixels >= 0, got {pixels}")
    if pixels > MAX_PIXELS:
        raise InputError(f"--{name} {pixels} is more than {MAX_PIXELS:,} pixels, longer than any image hmar reads")


# ---- outpainting ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Margins:
    left: int
    top: int
    right: int
    bottom: int


def parse_size(text: str) -> tuple[int, int]:
    """`WxH` → (W, H), whole numbers of pixels >= 1."""
    match = re.fullmatch(r"\s*(\d{1,30})\s*[xX×]\s*(\d{1,30})\s*", str(text))
    if not match:
        raise InputError(f"size must look like WIDTHxHEIGHT in whole pixels, e.g. 512x384, got {_shown(text)}")
    width, height = int(match[1]), int(match[2])
    if width == 0 or height == 0:
        raise InputError(f"size {width}x{height} has a side of 0 pixels: it must look like WIDTHxHEIGHT, e.g. 512x384")
    return width, height


def check_outpaint_options(*, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, expand: float | None = None,
                           to: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> None:
    """What `outpaint_margins` refuses whatever the image: not exactly one way to grow, a negative
    margin, an --expand that is not a finite factor above 1, or a margin, factor or size that no
    image could take within `max_pixels` (a strip of `right` pixels needs a model window at least
    that wide and as tall)."""
    sides = {"left": left, "top": top, "right": right, "bottom": bottom}
    if sum([any(sides.values()), expand is not None, to is not None]) != 1:
        raise InputError("give exactly one of --left/--right/--top/--bottom, --expand or --to")
    if any(value < 0 for value in sides.values()):
        raise InputError("margins must be >= 0 pixels, got " + ", ".join(f"{name} {value}" for name, value in sides.items()))
    longest = math.isqrt(max_pixels)
    for name, value in sides.items():
        if value > longest:
            raise InputError(f"--{name} {value} is more than {longest:,} pixels: the model's square window over the new "
                             f"strip would have more than the limit of {max_pixels:,} pixels; outpaint less at a time")
    if expand is not None:
        if not (math.isfinite(expand) and expand > 1.0):
            raise InputError(f"--expand must be more than 1 (1.5 = half as large again) and finite, got {expand}")
        if expand > longest:  # even a 1x1 image would outgrow the limit
            raise InputError(f"--expand {expand:g} makes any image more than {longest:,} pixels wide: more than the limit of "
                             f"{max_pixels:,} pixels")
    if to is not None:
        _check_canvas(to, max_pixels)


def _check_canvas(size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise InputError(f"the extended canvas {size[0]}x{size[1]} has {size[0] * size[1]:,} pixels, more than the limit of "
                         f"{max_pixels:,}")


def outpaint_margins(size: tuple[int, int], *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                     expand: float | None = None, to: tuple[int, int] | None = None,
                     max_pixels: int = MAX_PIXELS) -> Margins:
    """How far to extend an image of `size` (W, H): explicit sides, a factor `expand` on both
    dimensions (centred), or a target size `to` (centred). Exactly one way. Both the new canvas
    and the model's window over the new area (`check_window_side`) must stay within `max_pixels`."""
    check_outpaint_options(left=left, right=right, top=top, bottom=bottom, expand=expand, to=to, max_pixels=max_pixels)
    width, height = size
    sides = (left, top, right, bottom)
    if expand is not None:
        to = (round(width * expand), round(height * expand))
    if to is not None:
        new_width, new_height = to
        if new_width < width or new_height < height or (new_width, new_height) == (width, height):
            asked = f"--to {new_width}x{new_height}" if expand is None else f"--expand {expand:g} ({new_width}x{new_height}, rounded)"
            raise InputError(f"{asked} does not enlarge the {width}x{height} image (outpainting only grows the canvas)")
        extra_x, extra_y = new_width - width, new_height - height
        sides = (extra_x // 2, extra_y // 2, extra_x - extra_x // 2, extra_y - extra_y // 2)
    margins = Margins(*sides)
    new_size = (width + margins.left + margins.right, height + margins.top + margins.bottom)
    _check_canvas(new_size, max_pixels)
    check_window_side(_new_area_extent(margins, new_size), max_pixels, "grow the canvas less at a time")
    return margins


def _new_area_extent(margins: Margins, canvas: tuple[int, int]) -> tuple[int, int]:
    """Width and height of the bounding box of the strips added around the image: a strip on the
    left or right spans the canvas' height, one at the top or bottom its width."""
    vertical, horizontal = (margins.left, margins.right), (margins.top, margins.bottom)
    width = canvas[0] if any(horizontal) or all(vertical) else max(vertical)
    height = canvas[1] if any(vertical) or all(horizontal) else max(horizontal)
    return width, height


def extend_canvas(image: Image.Image, margins: Margins) -> tuple[Image.Image, np.ndarray]:
    """The image on a larger canvas (new area filled with repeated edge pixels) and the (H, W) bool
    mask of the new area, to regenerate."""
    import cv2
    pixels = cv2.copyMakeBorder(np.asarray(image.convert("RGB")), margins.top, margins.bottom, margins.left,
                                margins.right, cv2.BORDER_REPLICATE)
    regenerate = np.ones(pixels.shape[:2], dtype=bool)
    regenerate[margins.top:margins.top + image.height, margins.left:margins.left + image.width] = False
    return Image.fromarray(pixels, mode="RGB"), regenerate


# ---- writing ----------------------------------------------------------------------------------
def image_from_array(pixels: np.ndarray) -> Image.Image:
    """(H, W, 3) floats in [0, 1] → 8-bit RGB (rounded to the nearest level)."""
    levels = np.rint(np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0) * np.float32(255.0))
    return Image.fromarray(levels.astype(np.uint8), mode="RGB")


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
        raise InputError(f"--quality must be a whole number from 1 to 100, got {quality}")


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
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
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
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
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
            image = _to_rgb(image, WHITE)
    folder = _folder_of(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission
        raise WriteError(f"cannot write {path}: cannot make its folder {folder} ({exc.strerror or exc})") from None
    try:
        with atomic_write(path, overwrite=overwrite) as temporary, open(temporary, "wb") as stream:
            image.save(stream, format=kind, **options)
    except FileExistsError:
        raise OutputError(f"{path} exists; pass --overwrite to replace it") from None
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
