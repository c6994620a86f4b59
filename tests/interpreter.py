"""Running test files' workers under Triton's interpreter.

TRITON_INTERPRET=1 must be set before Triton decorates the kernels, so the workers run in another
process. A worker is a test module run as ``__main__`` with a flag (e.g. ``--interpret-worker``);
its last stdout line is the JSON of its results. A module lists its workers in
``INTERPRETER_WORKERS`` (fixture name -> flag); in a run without pytest-xdist workers (`-n 0`),
once collection ends, conftest starts one process that runs every worker the selected tests need,
one after another, and moves those tests last: the process computes on a second core while the
other tests run, and pays for importing torch and Triton once. A worker nobody scheduled (under
xdist, whose other worker keeps the second core busy; a helper calling this directly) gets a
process of its own.

The workers import the project under its installed names only (``hmar.kernels``, ``hmar.train``):
the repository root is not on their path, or ``kernels/`` would also import as a second, top-level
``kernels`` package. Only the ``tests`` package is made importable, for the shared test helpers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TIMEOUT = 900  # seconds per worker


def module_of(script: str) -> str:
    """The package name of a test file of this folder (`tests.test_adaln` for .../tests/test_adaln.py)."""
    path = Path(script).resolve()
    if path.parent != TESTS:
        raise ValueError(f"{script} is not a test file of {TESTS}")
    return f"tests.{path.stem}"


class _Process:
    """One interpreter process running `jobs` ((module, flag) pairs) in order; each result lands in
    its own file of a temporary folder as soon as it is done."""

    def __init__(self, jobs: list[tuple[str, str]]):
        self.jobs = list(jobs)
        self.folder = Path(tempfile.mkdtemp(prefix="hmar-interpreter-"))
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        command = [sys.executable, __file__, str(self.folder), *(part for job in self.jobs for part in job)]
        with open(self.folder / "log", "w") as log:  # a file, not a pipe: nobody reads while it runs
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        self.started = time.monotonic()

    def result(self, job: tuple[str, str]) -> dict:
        index = self.jobs.index(job)
        path = self.folder / f"{index}.json"
        deadline = self.started + TIMEOUT * (index + 1)
        while not path.exists():
            if self.proc.poll() is not None and not path.exists():
                raise AssertionError(f"the interpreter process exited ({self.proc.returncode}) before {job}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"{job} under the interpreter took longer than {TIMEOUT} s")
            time.sleep(0.1)
        record = json.loads(path.read_text())
        assert "error" not in record, f"{job} failed under the interpreter:\n{record['error']}"
        return record["result"]

    def _log_tail(self) -> str:
        return (self.folder / "log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_shared: _Process | None = None


def start(jobs: list[tuple[str, str]]) -> None:
    """Start the session's interpreter process on `jobs` (conftest, after collection)."""
    global _shared
    stop()
    if jobs:
        _shared = _Process(jobs)


def stop() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


def run_interpreted(script: str, flag: str) -> dict:
    """The results of `script`'s worker `flag`: from the session's process if it was scheduled there,
    else from a process of its own."""
    job = (module_of(script), flag)
    if _shared is not None and job in _shared.jobs:
        return _shared.result(job)
    process = _Process([job])
    try:
        return process.result(job)
    finally:
        process.close()


def _serve(folder: Path, jobs: list[tuple[str, str]]) -> None:
    """The interpreter process: run each worker as `__main__`, its stdout captured, and write
    {"result": ...} or {"error": traceback} to <folder>/<index>.json."""
    import contextlib
    import importlib.util
    import io
    import runpy
    import traceback

    # the path holds this file's folder (and maybe the root, through PYTHONPATH): drop both and
    # register `tests` as the package it is
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() not in (ROOT, TESTS)]
    spec = importlib.util.spec_from_file_location("tests", TESTS / "__init__.py", submodule_search_locations=[str(TESTS)])
    sys.modules["tests"] = package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)

    import torch

    for index, (module, flag) in enumerate(jobs):
        # each worker starts from the same state, whatever ran before it in this process
        torch.manual_seed(0)
        torch._dynamo.reset()
        sys.argv[1:] = [flag]
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            record = {"result": json.loads(stdout.getvalue().strip().splitlines()[-1])}
        except Exception:
            record = {"error": traceback.format_exc()[-4000:]}
        partial = folder / f"{index}.partial"
        partial.write_text(json.dumps(record))
        partial.rename(folder / f"{index}.json")  # whole or absent for the reader
        sys.stdout.flush()


if __name__ == "__main__":
    args = sys.argv[2:]
    _serve(Path(sys.argv[1]), list(zip(args[0::2], args[1::2])))
