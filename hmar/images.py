"""Image files in and out, for generation and the editing commands.

Reading: any image Pillow decodes, in any mode (RGBA, LA, palette, grayscale, 1-bit, CMYK, 16-bit),
turned upright by its EXIF orientation and flattened to 8-bit RGB: transparency is composited on
white (or dropped). Masks are read the same way but composited on black, then white (luminance above
50 %) means "regenerate". Every failure is an `InputError` that names the file and the problem, and
images above a pixel limit are refused before they are decoded (decompression bombs).

Colour matching (`match_colours`): a model that regenerates a region may shift its colours a little,
which shows as a box; the smooth offset that takes the generated border to the input's is added
inside the region. Which windows of the image the model sees, and how its outputs go back, is
`hmar.edit_window`.

Writing: PNG with text metadata, written to a temporary file beside the target and moved into place,
never replacing an existing file unless asked; output names from a template; grids.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from hmar.errors import HmarError, InputError
from hmar.file_mode import ordinary_file_mode

MAX_PIXELS = 120_000_000  # larger images are refused unread (Pillow's own hard limit is ~179 MP)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class OutputError(HmarError):
    """An output that cannot be written (exists without --overwrite, missing or read-only folder)."""


# ---- reading ----------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, *, alpha: str = "white", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file as upright 8-bit RGB. `alpha`: "white" composites transparency on white,
    "drop" discards it."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    image = _decode(Path(path), "image", max_pixels)
    return _to_rgb(image, WHITE if alpha == "white" else None)


@dataclass(frozen=True)
class Mask:
    regenerate: np.ndarray  # (H, W) bool: True where new pixels are generated
    notes: tuple[str, ...] = ()  # things the user should know (resizing…)


def load_mask(path: str | os.PathLike, size: tuple[int, int], *, max_pixels: int = MAX_PIXELS) -> Mask:
    """A mask file for an image of `size` (W, H): white (> 50 %) = regenerate, black = keep;
    transparent areas count as black. A mask of another size is resized to the image."""
    image = _decode(Path(path), "mask", max_pixels)
    gray = _to_rgb(image, BLACK).convert("L")
    notes = []
    if gray.size != tuple(size):
        notes.append(f"mask {Path(path).name} is {gray.size[0]}x{gray.size[1]} but the image is "
                     f"{size[0]}x{size[1]}: the mask was resized to the image")
        gray = gray.resize(tuple(size), Image.Resampling.BILINEAR)
    return Mask(np.asarray(gray) > 127, tuple(notes))


def _decode(path: Path, what: str, max_pixels: int) -> Image.Image:
    """Open, check the pixel count, decode fully and apply the EXIF orientation."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(path) as image:
                _check_pixels(path, what, image.size, max_pixels)
                image.load()
                return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise InputError(f"{what} {path} has more pixels than Pillow's safety limit allows (decompression bomb?)") from None
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
    values = values.astype(np.float64)
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
    """`x0,y0,x1,y1` (integers; x1 > x0, y1 > y0)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
        raise InputError(f"box must be four integers x0,y0,x1,y1, got {text!r}")
    box = Box(*(int(p) for p in parts))
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        raise InputError(f"box {text} is empty: it needs x1 > x0 and y1 > y0")
    return box


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True inside `box`, which must lie within an image of `size` (W, H)."""
    width, height = size
    if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        raise InputError(f"box {box.x0},{box.y0},{box.x1},{box.y1} reaches outside the {width}x{height} image "
                         f"(x must be within 0..{width}, y within 0..{height})")
    regenerate = np.zeros((height, width), dtype=bool)
    regenerate[box.y0:box.y1, box.x0:box.x1] = True
    return regenerate


def mask_notes(regenerate: np.ndarray) -> tuple[str, ...]:
    """Refuses a mask with nothing to regenerate; notes one that covers everything."""
    if not regenerate.any():
        raise InputError("the mask selects nothing to regenerate (it is all black): nothing to do")
    if regenerate.all():
        return ("the mask covers the whole image: this is the same as generating a new image",)
    return ()


def dilate(regenerate: np.ndarray, pixels: int) -> np.ndarray:
    """Grow the region to regenerate by `pixels` in every direction (a round brush)."""
    _check_pixels_option("dilate", pixels)
    if pixels == 0:
        return regenerate.copy()
    brush = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(regenerate.astype(np.uint8), brush).astype(bool)


def feather(regenerate: np.ndarray, pixels: int) -> np.ndarray:
    """Blend weight of the generated pixels, (H, W) float32: 0 exactly outside the region, rising
    to 1 over `pixels` inside it (0: a hard edge)."""
    _check_pixels_option("feather", pixels)
    if pixels == 0:
        return regenerate.astype(np.float32)
    distance = cv2.distanceTransform(regenerate.astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(distance / float(pixels), 0.0, 1.0).astype(np.float32)


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
    weight = mask.astype(np.float32)
    blurred = cv2.GaussianBlur(values * weight[..., None], (0, 0), sigma)
    norm = cv2.GaussianBlur(weight, (0, 0), sigma)[..., None]
    return (blurred / np.maximum(norm, 1e-6)).astype(np.float32)


def _shrink_known(values: np.ndarray, known: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`values` and `known` at `size` (W, H): each coarse pixel the mean of the known values it covers,
    known where it covers any."""
    share = cv2.resize(known.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(values * known[..., None], size, interpolation=cv2.INTER_AREA) / np.maximum(share, 1e-6)[..., None]
    return coarse.astype(np.float32), share > 0


def _membrane(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """`values` kept where `known`, harmonic elsewhere (each pixel the mean of its 4 neighbours; edges
    reflect): Jacobi sweeps, started from the solution at half the resolution."""
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


def _check_pixels_option(name: str, pixels: int) -> None:
    if int(pixels) != pixels or pixels < 0:
        raise InputError(f"--{name} must be a whole number of pixels >= 0, got {pixels}")


# ---- outpainting ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Margins:
    left: int
    top: int
    right: int
    bottom: int


def parse_size(text: str) -> tuple[int, int]:
    """`WxH` → (W, H)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise InputError(f"size must look like WIDTHxHEIGHT, e.g. 512x384, got {text!r}")
    return int(match[1]), int(match[2])


def outpaint_margins(size: tuple[int, int], *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                     expand: float | None = None, to: tuple[int, int] | None = None,
                     max_pixels: int = MAX_PIXELS) -> Margins:
    """How far to extend an image of `size` (W, H): explicit sides, a factor `expand` on both
    dimensions (centred), or a target size `to` (centred). Exactly one way."""
    width, height = size
    sides = (left, top, right, bottom)
    chosen = [bool(any(sides)), expand is not None, to is not None]
    if sum(chosen) != 1:
        raise InputError("give exactly one of --left/--right/--top/--bottom, --expand or --to")
    if any(s < 0 for s in sides):
        raise InputError(f"margins must be >= 0 pixels, got left {left}, top {top}, right {right}, bottom {bottom}")
    if expand is not None:
        if not expand > 1.0:
            raise InputError(f"--expand must be more than 1 (1.5 = half as large again), got {expand}")
        to = (round(width * expand), round(height * expand))
    if to is not None:
        new_width, new_height = to
        if new_width < width or new_height < height or (new_width, new_height) == (width, height):
            raise InputError(f"--to {new_width}x{new_height} does not enlarge the {width}x{height} image "
                             f"(outpainting only grows the canvas)")
        extra_x, extra_y = new_width - width, new_height - height
        sides = (extra_x // 2, extra_y // 2, extra_x - extra_x // 2, extra_y - extra_y // 2)
    margins = Margins(*sides)
    new_size = (width + margins.left + margins.right, height + margins.top + margins.bottom)
    if new_size[0] * new_size[1] > max_pixels:
        raise InputError(f"the extended canvas {new_size[0]}x{new_size[1]} has more than {max_pixels:,} pixels")
    return margins


def extend_canvas(image: Image.Image, margins: Margins) -> tuple[Image.Image, np.ndarray]:
    """The image on a larger canvas (new area filled with repeated edge pixels) and the (H, W) bool
    mask of the new area, to regenerate."""
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


def output_paths(template: str, count: int) -> list[Path]:
    """One path per image: `{i}` in the template is the index; else one image keeps the name and
    several get `-0`, `-1` … before the suffix."""
    if Path(template).suffix.lower() != ".png":
        raise InputError(f"output must be a .png file, got {template!r}")
    if "{i}" in template:
        return [Path(template.replace("{i}", str(i))) for i in range(count)]
    path = Path(template)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work when an output exists (without `overwrite`) or its folder is unusable."""
    for path in paths:
        if path.is_dir():
            raise OutputError(f"output {path} is a folder; give a file name ending in .png")
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
        folder = _folder_of(path)
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"output folder {folder} is not writable")


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict[str, str], overwrite: bool = False) -> None:
    """Write a PNG with text `metadata` atomically: a temporary file beside the target, then a
    rename. Without `overwrite` an existing file is never replaced (also not one that appears
    meanwhile)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    folder = _folder_of(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}") from None
    try:
        os.fchmod(handle, ordinary_file_mode())
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(temporary, path)
        else:
            _move_without_replacing(Path(temporary), path)
    except OSError as exc:  # a full disk, a folder in the way…: the user's to fix, not a bug
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def _move_without_replacing(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # atomic, and fails if the target exists
    except FileExistsError:
        raise OutputError(f"{target} exists; pass --overwrite to replace it") from None
    except OSError:  # file systems without hard links: check, then rename
        if target.exists():
            raise OutputError(f"{target} exists; pass --overwrite to replace it") from None
        os.replace(source, target)


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
