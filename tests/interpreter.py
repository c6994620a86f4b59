"""Running a test file's worker under Triton's interpreter: TRITON_INTERPRET=1 must be set before
Triton decorates the kernels, so the worker is a fresh process that runs the test file as
``__main__`` with a flag; its last stdout line is the JSON of its results.

The worker imports the project under its installed names only (``hmar.kernels``, ``hmar.train``):
the repository root is not on its path, or ``kernels/`` would also import as a second, top-level
``kernels`` package. Only the ``tests`` package is made importable, for the shared test helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run by `python -c` (whose path starts with the working directory, which may be the root): drop
# the root from the path, register `tests` from its folder, and run the test file under its package
# name.
_BOOT = """
import importlib.util, os, runpy, sys
root, module, flag = sys.argv[1:]
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != root]
tests = os.path.join(root, "tests")
spec = importlib.util.spec_from_file_location("tests", os.path.join(tests, "__init__.py"), submodule_search_locations=[tests])
sys.modules["tests"] = package = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package)
sys.argv[1:] = [flag]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_interpreted(script: str, flag: str, timeout: int = 900) -> dict:
    path = Path(script).resolve()
    if path.parent != ROOT / "tests":
        raise ValueError(f"{script} is not a test file of {ROOT / 'tests'}")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-c", _BOOT, os.path.realpath(ROOT), f"tests.{path.stem}", flag]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
