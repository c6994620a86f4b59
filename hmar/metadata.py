"""The settings stored with every image hmar makes (PNG text, or EXIF for JPEG and WebP): everything
that decides its pixels, so that the same settings on the same kind of device repeat it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import hmar
from hmar.classes import display_name
from hmar.schedule import format_schedule

if TYPE_CHECKING:  # the CLI imports this module to start, before torch
    from hmar.pipeline import Pipeline, SamplingSettings


def settings_metadata(pipe: Pipeline, settings: SamplingSettings, labels: Sequence[int | None]) -> dict[str, str]:
    """Everything besides the image's own class that decides the pixels. One random stream runs
    through all images of a request, so an image depends on the classes drawn with it:
    `hmar:classes` lists them all, in order (none: the null class), and repeating them with the
    same settings on the same kind of device and kernels repeats every image."""
    return {
        "Software": f"hmar {hmar.__version__}", "hmar:model": pipe.name, "hmar:seed": str(settings.seed),
        "hmar:cfg": str(settings.cfg), "hmar:top_k": str(settings.top_k), "hmar:top_p": str(settings.top_p),
        "hmar:schedule": format_schedule(settings.schedule), "hmar:batch_size": str(settings.batch_size),
        "hmar:classes": ",".join("none" if label is None else str(label) for label in labels),
        "hmar:device": pipe.device.type, "hmar:kernels": pipe.policy.compact(),
    }


def image_metadata(pipe: Pipeline, label: int | None, index: int) -> dict[str, str]:
    """An image's own part of its metadata: its class (None: the null class) and its place among
    the request's images."""
    name = display_name(pipe.num_classes if label is None else label, pipe.num_classes, pipe.config.class_names)
    return {"hmar:class": "none" if label is None else str(label), "hmar:class_name": name, "hmar:index": str(index)}
