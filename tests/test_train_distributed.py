"""Two processes under torchrun (gloo, CPU) train like one process with their combined batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmar.train import Stage1Config, run_stage1
from hmar.train.metrics import read_metrics
from tests.test_train_helpers import make_data, make_tokenizer_folder, quiet, spec_of, tiny_transformer_config

HELPER = Path(__file__).with_name("test_train_helpers.py")
ROOT = HELPER.parents[1]


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path):
    data, tokenizer = make_data(tmp_path / "data"), make_tokenizer_folder(tmp_path / "tokenizer")
    # no label dropout: the per-process random streams differ, everything else must agree
    options = dict(data=str(data), tokenizer=str(tokenizer), steps=3, cond_drop_rate=0.0, **quiet())
    spec = {"stage": "stage1", "model": spec_of(tiny_transformer_config()), **options, "out": str(tmp_path / "two"), "batch_size": 2}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HELPER), json.dumps(spec)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run_stage1(Stage1Config(model=tiny_transformer_config(), out=tmp_path / "one", **{**options, "batch_size": 4}))
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert (tmp_path / "two" / "model" / "config.json").is_file()
