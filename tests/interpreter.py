"""Running a test file's worker under Triton's interpreter: TRITON_INTERPRET=1 must be set before
Triton decorates the kernels, so the worker is a fresh process (the test file run as a script with a
flag, with the repository root on its path so that it can import `tests.*`); its last stdout line is
the JSON of its results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, flag: str, timeout: int = 900) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, script, flag], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
