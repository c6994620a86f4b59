"""Checkpoints a run can resume from, written so that a crash never leaves a broken one.

A checkpoint holds everything that decides the rest of the run: the model (trained and frozen
parts), optimiser, scheduler, EMA, stage extras and the step. Data order and random numbers are
functions of (seed, step), so the step restores them. It is written to a temporary file beside the
target, flushed to disk and renamed into place. SIGTERM / SIGINT ask the loop to write one and stop
at the end of the current step.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from hmar.train.errors import TrainingError

CHECKPOINT = "checkpoint.pt"
RUN_OPTIONS = "run.json"
# Options a resumed run may change; any other difference is refused. (Checkpoints hold whole tensors
# under either sharding, see hmar.train.sharding.)
RESUMABLE_CHANGES = frozenset({"steps", "resume", "progress", "log_every", "checkpoint_every", "sample_every", "num_workers", "device", "compile", "sharding",
                               "cuda_graph"})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}; nothing to resume (start without --resume)")
    try:
        # memory-mapped: the processes of a machine share one copy of the file's pages
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise TrainingError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}") from None


def check_run_folder(out: Path, options: dict[str, Any], resume: bool) -> None:
    """A new run needs an empty (or new) folder; a resumed one its own folder with the same options.
    Read-only, so that every process can check before any of them writes."""
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise TrainingError(f"run folder {out} exists and is not empty; pass --resume to continue that run or choose another --out")
        return
    if not (out / CHECKPOINT).is_file():
        raise TrainingError(f"no checkpoint in {out}; nothing to resume (start without --resume)")
    record = out / RUN_OPTIONS
    previous = json.loads(record.read_text()) if record.is_file() else {}
    changed = sorted(k for k in set(options) | set(previous) if k not in RESUMABLE_CHANGES and options.get(k) != previous.get(k))
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {options.get(k)!r}" for k in changed[:3])
        raise TrainingError(f"--resume with other options than the run in {out} was started with ({detail}); resume with the same options")


def start_run_folder(out: Path, options: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_OPTIONS).write_text(json.dumps(options, indent=2) + "\n")


class StopRequest:
    """Catches SIGTERM and SIGINT while installed: the loop checks `requested` after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
