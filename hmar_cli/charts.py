"""Bar charts of benchmark results as PNG (`hmar bench … --chart PATH`), drawn with Pillow.

A chart is a title and groups of bars (one group per shape or task, one bar per implementation or
model family), drawn horizontally with the value written beside each bar. Each group is scaled to its
own largest value: groups of one chart may differ by orders of magnitude (attention at 256 and
1024 px), and what a chart compares is the bars within a group.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from hmar.outputs import save_image

Bar = tuple[str, float]
Group = tuple[str, Sequence[Bar]]

WIDTH, ROW, GAP, MARGIN, LABEL_WIDTH, VALUE_WIDTH = 1000, 24, 10, 16, 260, 110
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only its fixed bitmap font
        return ImageFont.load_default()


def bar_chart(title: str, groups: Sequence[Group], unit: str = "ms") -> Image.Image:
    """The chart as an RGB image. The same bar label has the same colour in every group."""
    colours: dict[str, str] = {}
    rows = 2 + sum(1 + len(bars) for _, bars in groups)  # title, a heading per group, its bars
    image = Image.new("RGB", (WIDTH, 2 * MARGIN + rows * ROW + len(groups) * GAP), "white")
    draw, text, heading = ImageDraw.Draw(image), _font(14), _font(16)
    draw.text((MARGIN, MARGIN), title, fill="black", font=heading)
    y = MARGIN + 2 * ROW
    bar_space = WIDTH - 2 * MARGIN - LABEL_WIDTH - VALUE_WIDTH
    for name, bars in groups:
        draw.text((MARGIN, y), name, fill="black", font=heading)
        y += ROW
        largest = max((value for _, value in bars), default=0.0) or 1.0
        for label, value in bars:
            colour = colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
            left = MARGIN + LABEL_WIDTH
            draw.text((MARGIN + 12, y + 4), label, fill="black", font=text)
            draw.rectangle((left, y + 3, left + max(1, round(bar_space * value / largest)), y + ROW - 3), fill=colour)
            draw.text((left + bar_space + 8, y + 4), f"{value:.4g} {unit}", fill="black", font=text)
            y += ROW
        y += GAP
    return image


def write_chart(path: Path, title: str, groups: Sequence[Group], metadata: dict[str, str], overwrite: bool, unit: str = "ms") -> None:
    """Write the chart as a PNG (atomically, as every hmar output) with `metadata` as PNG text."""
    save_image(bar_chart(title, groups, unit), path, {"title": title, **metadata}, overwrite=overwrite)
