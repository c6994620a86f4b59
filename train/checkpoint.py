"""Checkpoints a run can resume from, written so that a crash never leaves a broken one.

A checkpoint holds everything that decides the rest of the run: the model (trained and frozen
parts), optimiser, scheduler, EMA, stage extras and the step. Data order and random numbers are
functions of (seed, step), so the step restores them. It is written with `hmar.atomic.atomic_write`
and flushed to disk. SIGTERM / SIGINT ask the loop to write one and stop at the end of the current
step.
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from hmar.atomic import atomic_write
from hmar.train.errors import TrainingError
from hmar.train.metrics import METRICS

CHECKPOINT = "checkpoint.pt"
RUN_OPTIONS = "run.json"
SAMPLES = "samples"
# What a run folder holds before the first checkpoint is written.
STARTED_FILES = frozenset({RUN_OPTIONS, METRICS, SAMPLES})
# Options a resumed run may change; any other difference is refused. (Checkpoints hold whole tensors
# under either sharding, see hmar.train.sharding; a run folder may be moved or copied, and `out` is
# where it is now.)
RESUMABLE_CHANGES = frozenset({"steps", "resume", "progress", "log_every", "checkpoint_every", "sample_every", "num_workers", "device", "compile", "sharding",
                               "cuda_graph", "out", "kernels"})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    try:
        with atomic_write(path, overwrite=True, durable=True) as temporary:
            torch.save(state, temporary)
    except OSError as exc:
        raise TrainingError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}; nothing to resume (start without --resume)")
    try:
        # memory-mapped: the processes of a machine share one copy of the file's pages
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise TrainingError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}") from None


def check_run_folder(out: Path, options: dict[str, Any], resume: bool) -> None:
    """A new run needs an empty (or new) folder, or one a start left before its first checkpoint;
    a resumed one its own folder with the same options. Read-only, so that every process can check
    before any of them writes."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"run folder {out} is a file; choose another --out")
    if not resume:
        if out.exists() and any(out.iterdir()) and not _failed_start(out):
            raise TrainingError(f"run folder {out} exists and is not empty; pass --resume to continue that run or choose another --out")
        return
    if not (out / CHECKPOINT).is_file():
        raise TrainingError(f"no checkpoint in {out}; nothing to resume (start without --resume)")
    previous = read_run_options(out)
    changed = sorted(k for k in set(options) | set(previous) if k not in RESUMABLE_CHANGES and options.get(k) != previous.get(k))
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {options.get(k)!r}" for k in changed[:3])
        raise TrainingError(f"--resume with other options than the run in {out} was started with ({detail}); resume with the same options")


def read_run_options(out: Path) -> dict[str, Any]:
    record = out / RUN_OPTIONS
    try:
        options = json.loads(record.read_text())
    except FileNotFoundError:
        raise TrainingError(f"{record} is missing: the options the run was started with are unknown; start a new run with another --out") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"cannot read {record} ({exc}): the options the run was started with are unknown; "
                            f"restore the file or start a new run with another --out") from None
    if not isinstance(options, dict):
        raise TrainingError(f"{record} holds no run options (a JSON object); restore the file or start a new run with another --out")
    return options


def _failed_start(out: Path) -> bool:
    """A folder holding only what a start writes before its first checkpoint (its run.json first):
    nothing to resume, nothing exported, so a new start may take it over."""
    if not (out / RUN_OPTIONS).is_file() or (out / CHECKPOINT).exists():
        return False
    return {p.name for p in out.iterdir()} <= STARTED_FILES


def _remove_started_files(out: Path) -> None:
    for name in STARTED_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def discard_failed_start(out: Path, created: bool) -> None:
    """After a new run failed before its first checkpoint: remove what it wrote (and `out` when the
    start created it), so that the folder is as it was."""
    if out.is_dir() and _failed_start(out):
        _remove_started_files(out)
        if created and not any(out.iterdir()):
            out.rmdir()


def start_run_folder(out: Path, options: dict[str, Any]) -> None:
    if out.is_dir() and _failed_start(out):  # what a start killed before it could clean up left behind
        _remove_started_files(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / RUN_OPTIONS, overwrite=True) as temporary:
        temporary.write_text(json.dumps(options, indent=2) + "\n")


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
