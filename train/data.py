"""Image folders in ImageNet layout, and the batches a run draws from them.

`root/<class name>/<image>`: class ids follow the sorted sub-folder names. Images are centre-cropped
to a square, resized to the model resolution and randomly flipped; an unreadable image is skipped and
counted, never fatal. Which samples (and flips) make up the batch of step s is a pure function of
(seed, s): a resumed run draws exactly the batches an uninterrupted run would, on any number of
processes (each process takes its contiguous share of the global batch).
"""
from __future__ import annotations

import signal

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hmar.errors import InputError
from hmar.train.errors import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jpe")


@dataclass(frozen=True)
class ImageFolder:
    """The files and labels of a data folder (scanned once, sorted, so every process agrees)."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    @classmethod
    def scan(cls, root: str | Path) -> "ImageFolder":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"data folder {root} does not exist or is not a folder")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise InputError(f"data folder {root} has no class sub-folders; expected ImageNet layout: {root}/<class name>/<image files>")
        files, labels, empty = [], [], []
        for label, name in enumerate(classes):
            found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                empty.append(name)
            files += found
            labels += [label] * len(found)
        if empty:
            shown = ", ".join(empty[:5]) + (", …" if len(empty) > 5 else "")
            raise InputError(f"{len(empty)} class folders in {root} hold no images ({shown}); image files end in {', '.join(IMAGE_SUFFIXES)}")
        return cls(root, tuple(classes), tuple(files), tuple(labels))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_training_image(path: Path, size: int, flip: bool) -> torch.Tensor | None:
    """(3, size, size) float in [-1, 1]: centre crop, resize, optional horizontal flip. None if unreadable.

    Not hmar.images.load_image: that one reads a user's picture whole and refuses a bad file with a
    message; a training sample is cropped to the model's square and an unreadable one is skipped.
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS if side > size else Image.BICUBIC)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1)


class BatchOrder:
    """The samples of every step: epochs are seeded permutations, laid end to end."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < batch_size * world_size:
            raise InputError(f"the data set has {size} images, fewer than one global batch ({batch_size} x {world_size} processes); lower the batch size")
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def batch(self, step: int) -> list[tuple[int, bool]]:
        """This process's (sample index, flip) pairs for `step` (0-based)."""
        global_batch = self.batch_size * self.world_size
        flips = np.random.default_rng([self.seed, step, 1]).random(global_batch) < 0.5
        first = self.rank * self.batch_size
        out = []
        for j in range(first, first + self.batch_size):
            position = step * global_batch + j
            epoch, offset = divmod(position, self.size)
            out.append((int(self._permutation(epoch)[offset]), bool(flips[j])))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size * self.world_size / self.size


class ImageBatches(torch.utils.data.Dataset):
    """Dataset keyed by (index, flip) pairs; a sample is (image or None, label)."""

    def __init__(self, folder: ImageFolder, size: int):
        self.folder, self.size = folder, size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor | None, int]:
        index, flip = key
        return load_training_image(self.folder.files[index], self.size, flip), self.folder.labels[index]


@dataclass
class ImageBatch:
    images: torch.Tensor  # (B', 3, H, W) in [-1, 1]: the readable images of the batch
    labels: torch.Tensor  # (B',)
    skipped: int  # unreadable images left out


def collate_readable(samples: Sequence[tuple[torch.Tensor | None, int]]) -> ImageBatch:
    readable = [(image, label) for image, label in samples if image is not None]
    skipped = len(samples) - len(readable)
    if not readable:
        return ImageBatch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return ImageBatch(torch.stack([i for i, _ in readable]), torch.tensor([l for _, l in readable]), skipped)


Batch = TypeVar("Batch")


def with_readable(batches: Iterable[Batch], start: int, root: Path, is_empty: Callable[[Batch], bool]) -> Iterator[tuple[Batch, Batch]]:
    """(batch, readable) per step: `readable` is the batch itself or, when none of its images could be
    read, the last batch that had some, so that every process still takes part in the step."""
    previous = None
    for step, batch in enumerate(batches, start):
        if not is_empty(batch):
            previous = batch
        elif previous is None:
            raise TrainingError(f"no image of the batch of step {step} could be read; check the data folder {root}")
        yield batch, previous


class _Steps(torch.utils.data.Sampler):
    def __init__(self, order: BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        return (self.order.batch(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGINT/SIGTERM to the training process. Ctrl-C or `timeout`
    signal the whole process group; a worker killed by it would crash the run before the trainer
    could write its checkpoint. Workers still exit when the trainer stops or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def image_batches(folder: ImageFolder, size: int, order: BatchOrder, start: int, stop: int, num_workers: int) -> Iterator[ImageBatch]:
    """The image batches of steps start up to (not including) stop, decoded by `num_workers` processes."""
    loader = torch.utils.data.DataLoader(
        ImageBatches(folder, size),
        batch_sampler=_Steps(order, start, stop),
        num_workers=num_workers,
        collate_fn=collate_readable,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
        # its own generator, so that starting the loader does not draw from the global RNG
        generator=torch.Generator().manual_seed(order.seed),
    )
    return iter(loader)
