"""The region an edit regenerates: boxes, the checks on a mask, its growth (dilate) and blend band
(feather), and outpainting's larger canvas with its new area.

Every size that would make the model's window over a region, or an outpaint canvas, larger than
`hmar.images.MAX_PIXELS` is refused before anything of that size is made.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np  # cv2 is imported in the functions that use it: the CLI imports this module to start
from PIL import Image

from hmar.errors import InputError, arg
from hmar.images import MAX_PIXELS


# ---- boxes and masks --------------------------------------------------------------------------
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
    bool cannot do: nothing to regenerate, a bad dilate or feather, or a region
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
        raise InputError(f"{arg('feather', feather_pixels)} is wider than the region to regenerate ({grown[0]}x{grown[1]} pixels"
                         f"{' after ' + arg('dilate') if dilate_pixels else ''}): the generated pixels would never blend in")
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


def check_pixels_option(name: str, pixels: int) -> None:
    """dilate and feather: whole pixels, no more than the longest side any accepted image can
    have (time and memory do not grow with them: a distance transform does the work)."""
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 0:
        raise InputError(f"{arg(name)} must be a whole number of pixels >= 0, got {pixels}")
    if pixels > MAX_PIXELS:
        raise InputError(f"{arg(name, pixels)} is more than {MAX_PIXELS:,} pixels, longer than any image hmar reads")


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
    """The feather an edit of `regenerate` (H, W) bool gets when none is given (`FEATHER_RULE`):
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
    margin, an expand that is not a finite factor above 1, or a margin, factor or size that no
    image could take within `max_pixels` (a strip of `right` pixels needs a model window at least
    that wide and as tall)."""
    sides = {"left": left, "top": top, "right": right, "bottom": bottom}
    if sum([any(sides.values()), expand is not None, to is not None]) != 1:
        raise InputError(f"give exactly one of {'/'.join(map(arg, ('left', 'right', 'top', 'bottom')))}, {arg('expand')} or {arg('to')}")
    if any(value < 0 for value in sides.values()):
        raise InputError("margins must be >= 0 pixels, got " + ", ".join(arg(name, value) for name, value in sides.items()))
    longest = math.isqrt(max_pixels)
    for name, value in sides.items():
        if value > longest:
            raise InputError(f"{arg(name, value)} is more than {longest:,} pixels: the model's square window over the new "
                             f"strip would have more than the limit of {max_pixels:,} pixels; outpaint less at a time")
    if expand is not None:
        if not (math.isfinite(expand) and expand > 1.0):
            raise InputError(f"{arg('expand')} must be more than 1 (1.5 = half as large again) and finite, got {expand}")
        if expand > longest:  # even a 1x1 image would outgrow the limit
            raise InputError(f"{arg('expand', f'{expand:g}')} makes any image more than {longest:,} pixels wide: more than the limit of "
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
            asked = (arg("to", f"{new_width}x{new_height}") if expand is None else
                     f"{arg('expand', f'{expand:g}')} ({new_width}x{new_height}, rounded)")
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
