"""A class-conditional toy data set anyone can regenerate offline: shapes and patterns.

Ten visually distinct classes, each image with random colours, pose (position, size, rotation) and
background (a flat colour or a two-colour gradient). Image i of class c depends only on
(seed, c, i), so the same call writes the same files on any machine. Written in ImageNet layout
(`root/<class>/<class>_<i>.png`), ready for `hmar train`.
"""
from __future__ import annotations

import math
import multiprocessing
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from hmar.atomic import atomic_write
from hmar.config import MAX_IMAGES_PER_CLASS, MAX_WORKERS
from hmar.errors import InputError

SUPERSAMPLE = 4  # shapes are drawn this much larger, then downsampled: smooth edges

Colour = tuple[int, int, int]


def _colour(rng: np.random.Generator) -> Colour:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _distinct_colour(rng: np.random.Generator, other: Colour, min_distance: float = 160.0) -> Colour:
    """A random colour far enough from `other` that the foreground stands out."""
    while True:
        colour = _colour(rng)
        if math.dist(colour, other) >= min_distance:
            return colour


def background(rng: np.random.Generator, size: int) -> tuple[Image.Image, Colour]:
    """A flat colour or a linear gradient between two colours at a random angle; returns its mean colour."""
    first = _colour(rng)
    if rng.random() < 0.5:
        return Image.new("RGB", (size, size), first), first
    second = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(first, rng.integers(-60, 61, size=3)))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    pixels = np.array(first)[None, None] * (1 - t[..., None]) + np.array(second)[None, None] * t[..., None]
    mean = tuple(int(c) for c in pixels.reshape(-1, 3).mean(0))
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB"), mean


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _regular_polygon(n: int, radius: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (a star when `inner` gives the radius of the inner vertices)."""
    count = 2 * n if inner else n
    return [
        ((inner if inner and i % 2 else radius) * math.cos(2 * math.pi * i / count - math.pi / 2),
         (inner if inner and i % 2 else radius) * math.sin(2 * math.pi * i / count - math.pi / 2))
        for i in range(count)
    ]


# Each class draws on a supersampled canvas: (draw, rng, cx, cy, radius, angle, colour, background colour).
Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator, float, float, float, float, Colour, Colour], None]


def _circle(d, rng, cx, cy, r, angle, fg, bg):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)


def _square(d, rng, cx, cy, r, angle, fg, bg):
    d.polygon(_rotated([(-r, -r), (r, -r), (r, r), (-r, r)], cx, cy, angle), fill=fg)


def _triangle(d, rng, cx, cy, r, angle, fg, bg):
    d.polygon(_rotated(_regular_polygon(3, r * 1.2), cx, cy, angle), fill=fg)


def _star(d, rng, cx, cy, r, angle, fg, bg):
    d.polygon(_rotated(_regular_polygon(5, r * 1.2, inner=r * 0.5), cx, cy, angle), fill=fg)


def _cross(d, rng, cx, cy, r, angle, fg, bg):
    w = r * 0.35
    for shape in ([(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]):
        d.polygon(_rotated(shape, cx, cy, angle), fill=fg)


def _ring(d, rng, cx, cy, r, angle, fg, bg):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    inner = r * 0.55
    d.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=bg)


def _crescent(d, rng, cx, cy, r, angle, fg, bg):
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
    d.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=bg)


def _stripes(d, rng, cx, cy, r, angle, fg, bg):
    """Parallel bands over the whole image at a random angle and period."""
    size = d.im.size[0]
    period = size / rng.uniform(3, 6)
    for k in range(-12, 13):
        off = k * period
        band = [(-2 * size, off), (2 * size, off), (2 * size, off + period / 2), (-2 * size, off + period / 2)]
        d.polygon(_rotated(band, cx, cy, angle), fill=fg)


def _checkerboard(d, rng, cx, cy, r, angle, fg, bg):
    size = d.im.size[0]
    cell = size / rng.uniform(3, 5)
    for i in range(-8, 9):
        for j in range(-8, 9):
            if (i + j) % 2 == 0:
                square = [(i * cell, j * cell), ((i + 1) * cell, j * cell), ((i + 1) * cell, (j + 1) * cell), (i * cell, (j + 1) * cell)]
                d.polygon(_rotated(square, cx, cy, angle), fill=fg)


def _polka_dots(d, rng, cx, cy, r, angle, fg, bg):
    """A rotated grid of small discs over the whole image."""
    size = d.im.size[0]
    spacing = size / rng.uniform(3, 5)
    dot = spacing * 0.22
    ox, oy = rng.uniform(0, spacing, size=2)
    for i in range(-6, 7):
        for j in range(-6, 7):
            x, y = _rotated([(i * spacing + ox, j * spacing + oy)], size / 2, size / 2, angle)[0]
            d.ellipse((x - dot, y - dot, x + dot, y + dot), fill=fg)


CLASSES: dict[str, Painter] = {
    "checkerboard": _checkerboard,
    "circle": _circle,
    "crescent": _crescent,
    "cross": _cross,
    "polka_dots": _polka_dots,
    "ring": _ring,
    "square": _square,
    "star": _star,
    "stripes": _stripes,
    "triangle": _triangle,
}


def render(class_name: str, index: int, seed: int = 0, size: int = 64) -> Image.Image:
    """Image `index` of a class: a pure function of (seed, class, index, size)."""
    if class_name not in CLASSES:
        raise InputError(f"unknown synthetic class {class_name!r}; known: {', '.join(CLASSES)}")
    class_id = list(CLASSES).index(class_name)
    rng = np.random.default_rng([seed, class_id, index])
    big = size * SUPERSAMPLE
    canvas, mean_bg = background(rng, big)
    fg = _distinct_colour(rng, mean_bg)
    radius = big * rng.uniform(0.18, 0.32)
    margin = radius * 1.1
    cx, cy = rng.uniform(margin, big - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    CLASSES[class_name](ImageDraw.Draw(canvas), rng, cx, cy, radius, angle, fg, mean_bg)
    return canvas.resize((size, size), Image.LANCZOS)


def write_dataset(root: str | Path, images_per_class: int = 500, size: int = 64, seed: int = 0,
                  classes: list[str] | None = None, workers: int = 1) -> Path:
    """Write the data set as PNGs in ImageNet layout under `root` (created; must not hold images yet).
    `workers` processes render in parallel; the files do not depend on it (each image is a pure
    function of seed, class, index and size)."""
    if not 64 <= size <= 512:
        raise InputError(f"synthetic images are 64 to 512 px, got {size}")
    if not 0 < images_per_class <= MAX_IMAGES_PER_CLASS:
        raise InputError(f"images per class must be between 1 and {MAX_IMAGES_PER_CLASS}, got {images_per_class}")
    if not 0 < workers <= MAX_WORKERS:
        raise InputError(f"workers must be between 1 and {MAX_WORKERS}, got {workers}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} exists and is not empty; choose a new folder for the synthetic data set")
    jobs = []
    for name in classes or list(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        jobs += [(root / name / f"{name}_{i:05d}.png", name, i, seed, size) for i in range(images_per_class)]
    if workers == 1:
        for job in jobs:
            _write_one(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=64)
    return root


def _write_one(job: tuple[Path, str, int, int, int]) -> None:
    path, name, index, seed, size = job
    with atomic_write(path) as temporary:
        render(name, index, seed, size).save(temporary, format="PNG")
