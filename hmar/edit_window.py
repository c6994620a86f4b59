"""The model's view of an edit: which square windows of an image the model sees, and the way back.

A model generates squares of one resolution (e.g. 256 px). Each connected group of regions to
regenerate gets its own window (`region_windows`): the group's bounding box grown by a context margin
(`Context`: pixels, or a fraction of the region's larger side; never less than `MIN_CONTEXT` of it, so
that the model always sees surroundings), made a square, at least the model's resolution when the
image is that large, and shifted to lie inside the image; it reaches past the image's edges (edge
pixels repeated) only where the region is wider than the image's shorter side, or where the image
has no other room for context. Regions whose windows overlap are one group, with one window around
them all. `Context()` (`--context full`) is the whole-image view instead: the largest centred square,
moved to contain the region and grown to fit it (`square_window`).

Every window is resized to the model's resolution (`plan_edit`). The model's outputs are resized back,
their colours optionally matched to the kept pixels (`hmar.colour_match.match_colours`), and blended in only
where the (dilated, feathered) region is, so that every other output pixel is the input's, bit for bit.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np  # cv2 is imported in the functions that use it: the CLI imports this module to start
from PIL import Image

from hmar.colour_match import MATCH_RING, match_colours
from hmar.errors import InputError, arg
from hmar.images import MAX_PIXELS
from hmar.regions import dilate, feather, mask_notes

MIN_CONTEXT = 0.125  # of the region's larger side, on each side: the least surroundings a window shows
MAX_FRACTION = 100.0  # a context fraction beyond this is a typo (the window is capped by the image anyway)
MAX_GROUPS = 16  # separate windows per image; a mask with more groups gets one window around them all
MAX_COMPONENTS = 4096  # separate regions worth grouping one by one (more: speckle, one window)
MAX_GROUPING_ROUNDS = 32  # merging windows that keeps reaching further regions: one window for all
NOTED_ENLARGEMENT = 2.0  # a window enlarged more than this from the model's resolution is noted


@dataclass(frozen=True)
class Context:
    """How much of the image around a region the model sees: `pixels` on each side, or `fraction`
    of the region's larger side; neither: the whole image (`full`)."""

    pixels: int | None = None
    fraction: float | None = None

    @property
    def full(self) -> bool:
        return self.pixels is None and self.fraction is None

    def margin(self, extent: int) -> int:
        """The margin around a region whose larger side is `extent` pixels."""
        wanted = self.pixels if self.pixels is not None else math.ceil(self.fraction * extent)
        return max(wanted, math.ceil(MIN_CONTEXT * extent))

    def __str__(self) -> str:
        if self.full:
            return "full"
        return str(self.pixels) if self.pixels is not None else f"{self.fraction:g}"


DEFAULT_CONTEXT = Context(fraction=0.5)


def parse_context(text: str) -> Context:
    """`full`, whole pixels (`64`) or a fraction of the region's larger side with a decimal point
    (`0.5`, `1.0`)."""
    value = str(text).strip().lower()
    if value == "full":
        return Context()
    if re.fullmatch(r"\d+", value):
        return Context(pixels=int(value))
    if re.fullmatch(r"\d+\.\d*|\.\d+", value) and float(value) <= MAX_FRACTION:
        return Context(fraction=float(value))
    raise InputError(f"{arg('context')} must be whole pixels (e.g. 64), a fraction of the region with a decimal point "
                     f"(e.g. 0.5, at most {MAX_FRACTION:g}) or full, got {text!r}")


@dataclass(frozen=True)
class Window:
    """A square of the image in pixels; it may reach past the image edges (edge pixels repeat)."""

    x0: int
    y0: int
    side: int

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 (x1, y1 exclusive)."""
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side


Bounds = tuple[int, int, int, int]  # x0, y0, x1, y1 of a region, x1 and y1 exclusive


def square_window(size: tuple[int, int], regenerate: np.ndarray) -> Window:
    """The centred square of side min(W, H), moved to contain the region, grown to fit it if needed."""
    width, height = size
    ys, xs = np.nonzero(regenerate)
    if xs.size == 0:  # nothing to contain: the centred square
        left, top, right, bottom = width // 2, height // 2, width // 2, height // 2
    else:
        left, top, right, bottom = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    side = max(min(width, height), right - left, bottom - top)
    return Window(_place(left, right, side, width), _place(top, bottom, side, height), side)


def context_window(size: tuple[int, int], bounds: Bounds, resolution: int, context: Context) -> Window:
    """The square around a region of `bounds` in an image of `size` (W, H), grown by `context`: at
    least `resolution` wide when the image allows, no wider than the whole-image view unless the
    image has no other room for `MIN_CONTEXT` of surroundings, shifted inside the image."""
    width, height = size
    left, top, right, bottom = bounds
    largest = max(right - left, bottom - top)
    whole = max(min(width, height), largest)
    side = min(max(largest + 2 * context.margin(largest), resolution), whole)
    side = max(side, _least_side(size, bounds))
    return Window(_place(left, right, side, width), _place(top, bottom, side, height), side)


def _least_side(size: tuple[int, int], bounds: Bounds) -> int:
    """The smallest square that holds the region and `MIN_CONTEXT` of surroundings on both sides
    along one axis (as much as the image has, where it has less)."""
    left, top, right, bottom = bounds
    spans = ((right - left, size[0]), (bottom - top, size[1]))
    largest = max(span for span, _ in spans)
    room = 2 * math.ceil(MIN_CONTEXT * largest)
    sides = [span + min(room, extent - span) for span, extent in spans if extent > span]
    return max(largest, min(sides)) if sides else largest


def _place(start: int, stop: int, side: int, extent: int) -> int:
    """Start of a span of `side` covering [start, stop) and as much of [0, extent) as possible."""
    if side >= extent:
        return (extent - side) // 2
    return int(np.clip(round((start + stop - side) / 2), 0, extent - side))


@dataclass
class RegionGroups:
    """The regions of a mask grouped for the model: one window per group."""

    windows: list[Window]
    groups: np.ndarray  # (H, W) uint8: 0 where nothing is regenerated, g + 1 in group g's regions
    notes: tuple[str, ...] = ()


def region_windows(regenerate: np.ndarray, resolution: int, context: Context = DEFAULT_CONTEXT) -> RegionGroups:
    """Group the connected regions of `regenerate` (H, W) bool whose windows overlap (in the image)
    and give each group its window; `context.full`: one whole-image window for all."""
    import cv2
    height, width = regenerate.shape
    _, labels, stats, _ = cv2.connectedComponentsWithStats(regenerate.astype(np.uint8), connectivity=8)
    boxes = np.concatenate([stats[1:, :2], stats[1:, :2] + stats[1:, 2:4]], axis=1).astype(np.int64)  # x0, y0, x1, y1
    notes = ()
    if len(boxes) == 0:
        return RegionGroups([], np.zeros((height, width), dtype=np.uint8))
    if context.full or len(boxes) == 1:
        group_of = np.zeros(len(boxes), dtype=np.int64)
    elif len(boxes) > MAX_COMPONENTS:
        group_of = np.zeros(len(boxes), dtype=np.int64)
        notes = (f"the mask has {len(boxes):,} separate regions: they are regenerated in one window around them all",)
    else:
        group_of = _group(boxes, (width, height), resolution, context)
        if group_of is None or group_of.max() + 1 > MAX_GROUPS:
            many = "many" if group_of is None else group_of.max() + 1
            notes = (f"the mask has {many} separate groups of regions, more than {MAX_GROUPS}: "
                     f"they are regenerated in one window around them all",)
            group_of = np.zeros(len(boxes), dtype=np.int64)
    lookup = np.concatenate([[0], group_of + 1]).astype(np.uint8)
    groups = lookup[labels]
    if context.full:
        return RegionGroups([square_window((width, height), groups > 0)], groups, notes)
    windows = _windows(boxes, group_of, (width, height), resolution, context)
    return RegionGroups(windows, groups, notes)


def _group(boxes: np.ndarray, size: tuple[int, int], resolution: int, context: Context) -> np.ndarray | None:
    """Group index of each of the (N, 4) region `boxes`: regions whose windows overlap inside the
    image share a group, and a group's window (around all its regions) may reach further ones, so
    this repeats until no two windows overlap (None: not within `MAX_GROUPING_ROUNDS`). Overlap is
    found by painting each window, one pixel short of its far edges, into a map of the image:
    overlapping windows then touch, abutting ones do not."""
    import cv2
    width, height = size
    group_of = np.arange(len(boxes))
    for _ in range(MAX_GROUPING_ROUNDS):
        count = int(group_of.max()) + 1
        painted = np.zeros((height, width), dtype=np.uint8)
        corners = []
        for window in _windows(boxes, group_of, size, resolution, context):
            x0, y0, x1, y1 = window.bounds
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
            painted[y0:max(y0 + 1, y1 - 1), x0:max(x0 + 1, x1 - 1)] = 1
            corners.append((y0, x0))
        _, touching = cv2.connectedComponents(painted, connectivity=8)
        merged = np.array([touching[y, x] for y, x in corners])
        _, merged = np.unique(merged, return_inverse=True)
        if merged.max() + 1 == count:
            return group_of
        group_of = merged[group_of]
    return None


def _windows(boxes: np.ndarray, group_of: np.ndarray, size: tuple[int, int], resolution: int, context: Context) -> list[Window]:
    """Each group's window, around the bounding box of its regions."""
    count = int(group_of.max()) + 1
    starts = np.full((count, 2), np.iinfo(np.int64).max)
    stops = np.full((count, 2), np.iinfo(np.int64).min)
    np.minimum.at(starts, group_of, boxes[:, :2])
    np.maximum.at(stops, group_of, boxes[:, 2:])
    return [context_window(size, (int(x0), int(y0), int(x1), int(y1)), resolution, context)
            for (x0, y0), (x1, y1) in zip(starts, stops)]


def crop_window(pixels: np.ndarray, window: Window) -> np.ndarray:
    """The window's pixels of an (H, W, …) array, edge pixels repeated outside the image."""
    import cv2
    height, width = pixels.shape[:2]
    pad = (max(0, -window.y0), max(0, window.y0 + window.side - height),
           max(0, -window.x0), max(0, window.x0 + window.side - width))
    if any(pad):
        pixels = cv2.copyMakeBorder(pixels, *pad, cv2.BORDER_REPLICATE)
    y0, x0 = window.y0 + pad[0], window.x0 + pad[2]
    return pixels[y0:y0 + window.side, x0:x0 + window.side]


def _resize(pixels: np.ndarray, side: int) -> np.ndarray:
    import cv2
    shrinking = side < pixels.shape[0]
    return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _resize_mask(share: np.ndarray, side: int) -> np.ndarray:
    """A 0/1 float mask resized so that any output pixel touching the region gets a share > 0."""
    import cv2
    shrinking = side < share.shape[0]
    return cv2.resize(share, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@dataclass
class View:
    """One window as the model sees it."""

    window: Window
    image: np.ndarray  # (S, S, 3) uint8: the window at the model's resolution
    keep: np.ndarray  # (S, S) bool: pixels whose tokens are forced (False = regenerate)

    @property
    def enlargement(self) -> float:
        """How many image pixels one model pixel becomes."""
        return self.window.side / self.image.shape[0]


@dataclass
class EditPlan:
    """An edit of one image: what the model sees, and how its outputs go back."""

    original: Image.Image  # RGB, the full input
    alpha: np.ndarray  # (H, W) float32 blend weight of generated pixels; 0 = the input pixel, exactly
    groups: np.ndarray  # (H, W) uint8: g + 1 where view g's pixels go, 0 elsewhere
    views: list[View]
    notes: tuple[str, ...] = field(default=())
    colour_matching: bool = False  # shift the generated region's colours to meet the input at its edge

    @property
    def model_images(self) -> np.ndarray:
        """(G, S, S, 3) uint8, one per view."""
        return np.stack([view.image for view in self.views])

    @property
    def model_keeps(self) -> np.ndarray:
        """(G, S, S) bool, one per view."""
        return np.stack([view.keep for view in self.views])

    def composite(self, generated: Sequence[Image.Image | np.ndarray]) -> Image.Image:
        """The model's (S, S) outputs, one per view, placed back at the original size: generated
        pixels (colour matched, if planned) blended in by `alpha` inside their view's regions, all
        others the input's own."""
        if len(generated) != len(self.views):
            raise ValueError(f"expected {len(self.views)} generated images (one per view), got {len(generated)}")
        original = np.asarray(self.original)
        result = original.copy()
        height, width = original.shape[:2]
        for g, (view, image) in enumerate(zip(self.views, generated)):
            pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
            if pixels.shape != view.image.shape or pixels.dtype != np.uint8:
                raise ValueError(f"generated image must be uint8 {view.image.shape}, got {pixels.dtype} {pixels.shape}")
            wx0, wy0, wx1, wy1 = view.window.bounds
            x0, y0, x1, y1 = max(0, wx0), max(0, wy0), min(width, wx1), min(height, wy1)
            inside = np.s_[y0:y1, x0:x1]
            full = _resize(pixels, view.window.side)[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0].astype(np.float32)
            region = self.groups[inside] == g + 1
            before = original[inside]
            if self.colour_matching:
                known = self.alpha[inside] == 0  # other views' regions never reach into this window
                full = match_colours(full, before.astype(np.float32), region, known, MATCH_RING * view.enlargement)
            weight = self.alpha[inside][..., None]
            blended = np.rint(np.clip(weight * full + (1.0 - weight) * before, 0, 255)).astype(np.uint8)
            result[inside] = np.where(region[..., None], blended, before)
        return Image.fromarray(result, mode="RGB")


def plan_edit(image: Image.Image, regenerate: np.ndarray, resolution: int, *, dilate_pixels: int = 0,
              feather_pixels: int = 0, colour_matching: bool = False, context: Context = DEFAULT_CONTEXT,
              max_pixels: int = MAX_PIXELS) -> EditPlan:
    """Prepare an edit of `image` (RGB) regenerating `regenerate` (H, W) bool at a model of
    `resolution` px: dilate, feather, choose the windows (`region_windows`), resize; `colour_matching`:
    see `match_colours`. A window of more than `max_pixels` is refused before it is made."""
    if regenerate.shape != (image.height, image.width):
        raise ValueError(f"mask shape {regenerate.shape} does not match the image {image.height}x{image.width}")
    mask_notes(regenerate)  # refuses an empty mask
    grown = dilate(regenerate, dilate_pixels)
    notes = list(mask_notes(grown))
    alpha = feather(grown, feather_pixels)
    grouped = region_windows(grown, resolution, context)
    notes += grouped.notes
    for window in grouped.windows:
        if window.side * window.side > max_pixels:
            raise InputError(f"the model's view of this region would be {window.side}x{window.side} pixels, more than the "
                             f"limit of {max_pixels:,}: make the region (or the outpainted margin) smaller")
    image = image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.asarray(image)
    views = []
    for g, window in enumerate(grouped.windows):
        model_image = _resize(crop_window(pixels, window), resolution)
        share = _resize_mask((crop_window(grouped.groups, window) == g + 1).astype(np.float32), resolution)
        views.append(View(window, np.ascontiguousarray(model_image), share <= 1e-6))
    notes += _enlargement_note(views, grouped.groups, context)
    return EditPlan(image, alpha, grouped.groups, views, tuple(notes), colour_matching)


def _enlargement_note(views: list[View], groups: np.ndarray, context: Context) -> tuple[str, ...]:
    """One note about the most enlarged view, if any is enlarged more than `NOTED_ENLARGEMENT`."""
    worst = max(range(len(views)), key=lambda g: views[g].enlargement)
    view = views[worst]
    if view.enlargement <= NOTED_ENLARGEMENT:
        return ()
    ys, xs = np.nonzero(groups == worst + 1)
    width, height = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    scale = view.enlargement
    remedy = (f"a smaller region, or the default context window instead of {arg('context', 'full')}" if context.full else
              f"a smaller region or a smaller {arg('context')} (now {context}; at least {MIN_CONTEXT:g} of the region is kept)")
    return (f"the {width}x{height} region is generated at {max(1, round(width / scale))}x{max(1, round(height / scale))} "
            f"pixels by the {view.image.shape[0]} px model and enlarged {scale:.1f}x: {remedy} would keep more detail",)
