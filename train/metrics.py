"""What a run reports: one JSON line per logged step, and a rich progress bar on the terminal."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends records to `metrics.jsonl`; on resume, drops records past the checkpoint's step so that
    the file reads as one uninterrupted run."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = out / METRICS
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """Steps done, loss, images/s, elapsed and ETA. Silent when disabled (other ranks, tests)."""

    def __init__(self, enabled: bool, stage: str, total: int, start: int):
        self.progress = None
        if enabled:
            self.progress = Progress(
                TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self.task = self.progress.add_task(stage, total=total, completed=start, loss="-", speed="-")

    def __enter__(self) -> "ProgressBar":
        if self.progress:
            self.progress.start()
        return self

    def update(self, step: int, loss: float | None = None, images_per_s: float | None = None) -> None:
        if self.progress:
            fields = {}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            if images_per_s is not None:
                fields["speed"] = f"{images_per_s:.1f}"
            self.progress.update(self.task, completed=step, **fields)

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()


class Throughput:
    """Images per second over the steps since the last reading."""

    def __init__(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return rate
