"""What a run reports: one JSON line per logged step, and its progress on stderr (a bar on a terminal)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hmar.atomic import atomic_write
from hmar.train.errors import TrainingError, note

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends records to `metrics.jsonl`; on resume, drops records past the checkpoint's step so that
    the file reads as one uninterrupted run."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = out / METRICS
        if resume_step is not None and self.path.exists():
            records, partial = _parse(self.path)
            if partial:
                note(f"dropped the incomplete last line of {self.path} (the run stopped while writing it)")
            kept = "".join(line + "\n" for line, record in records if record.get("step", 0) <= resume_step)
            with atomic_write(self.path, overwrite=True) as temporary:
                temporary.write_text(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The records of a run; a last line still being written (or cut by a crash) is left out."""
    return [record for _, record in _parse(Path(out) / METRICS)[0]]


def _parse(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """(line, record) pairs, and whether an incomplete last line was left out. Only the last line
    may be incomplete (a crash or a full disk while appending it); a bad line elsewhere means the
    file was damaged otherwise: an error."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        elif number < len(lines):
            raise TrainingError(f"{path} line {number} is not a metrics record; repair or delete the file")
    return records, len(records) < len(lines)


class ProgressBar:
    """Steps done, loss, images/s, elapsed and ETA on stderr: a live bar on a terminal, else (a log
    file, a batch job) a plain line per tenth of the run and at least every LOG_SECONDS. Silent when
    disabled (other ranks, tests)."""

    LOG_SECONDS = 60.0

    def __init__(self, enabled: bool, stage: str, total: int, start: int):
        self.progress, self.log = None, False
        self.stage, self.total, self.start = stage, total, start
        if not enabled:
            return
        console = Console(stderr=True)
        if console.is_terminal:
            self.progress = Progress(
                TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
            )
            self.task = self.progress.add_task(stage, total=total, completed=start, loss="-", speed="-")
        else:
            self.log, self.began = True, time.monotonic()
            self.last_time, self.last_tenth, self.fields = self.began, 10 * start // total, {"loss": "-", "speed": "-"}

    def __enter__(self) -> "ProgressBar":
        if self.progress:
            self.progress.start()
        return self

    def update(self, step: int, loss: float | None = None, images_per_s: float | None = None) -> None:
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if images_per_s is not None:
            fields["speed"] = f"{images_per_s:.1f}"
        if self.progress:
            self.progress.update(self.task, completed=step, **fields)
        elif self.log:
            self.fields.update(fields)
            now, tenth = time.monotonic(), 10 * step // self.total
            if tenth > self.last_tenth or now - self.last_time >= self.LOG_SECONDS:
                self.last_time, self.last_tenth = now, tenth
                print(self._line(step, now), file=sys.stderr, flush=True)

    def _line(self, step: int, now: float) -> str:
        elapsed = now - self.began
        done = step - self.start
        eta = _clock(elapsed / done * (self.total - step)) if done > 0 else "-"
        return (f"{self.stage}: step {step}/{self.total}, loss {self.fields['loss']}, {self.fields['speed']} img/s, "
                f"{_clock(elapsed)} elapsed, ETA {eta}")

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
