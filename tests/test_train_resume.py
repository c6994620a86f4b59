"""Resume: a run killed with SIGKILL (or stopped with SIGTERM) and resumed logs the losses of an
uninterrupted run, step for step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmar.train import Stage1Config, Stage2Config, run_stage1, run_stage2
from hmar.train.checkpoint import CHECKPOINT
from hmar.train.metrics import METRICS, read_metrics
from tests.train_helpers import make_data, make_tokenizer_folder, quiet, spec_of, tiny_transformer_config

HELPER = Path(__file__).with_name("train_helpers.py")
ROOT = HELPER.parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"root": root, "data": make_data(root / "data"), "tokenizer": make_tokenizer_folder(root / "tokenizer")}


def _options(workspace, out: Path) -> dict:
    # label dropout on and EMA on: their randomness and state must survive the restart too
    return dict(data=str(workspace["data"]), out=str(out), tokenizer=str(workspace["tokenizer"]), steps=STEPS,
                checkpoint_every=3, cond_drop_rate=0.5, ema_decay=0.9, **quiet())


def _start(spec: dict, new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(HELPER), json.dumps(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def _wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / METRICS).is_file() and any(r["step"] >= step for r in read_metrics(out)):
            return
        if process.poll() is not None:
            pytest.fail(f"training subprocess ended early: {process.stderr.read()[-2000:]}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"training subprocess never reached step {step}")


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    options = _options(workspace, workspace["root"] / "whole")
    run_stage1(Stage1Config(model=tiny_transformer_config(), **options))
    return _losses(Path(options["out"]))


def test_sigkill_after_a_checkpoint_then_resume_repeats_the_uninterrupted_losses(workspace, uninterrupted):
    out = workspace["root"] / "killed"
    options = _options(workspace, out)
    process = _start({"stage": "stage1", "model": spec_of(tiny_transformer_config()), "sleep_at_step": 4, **options})
    _wait_for_step(out, 4, process)  # step 3's checkpoint is written, step 4 logged, then it sleeps
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 3
    run_stage1(Stage1Config(model=tiny_transformer_config(), resume=True, **options))
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_sigterm_writes_a_checkpoint_and_stops_then_resume_finishes_the_same_run(workspace, uninterrupted):
    out = workspace["root"] / "terminated"
    options = _options(workspace, out)
    process = _start({"stage": "stage1", "model": spec_of(tiny_transformer_config()), "sleep_at_step": 4, "sleep_seconds": 2, **options})
    _wait_for_step(out, 4, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "continue with --resume" in stderr
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 4  # written at the signal, not at the next interval
    run_stage1(Stage1Config(model=tiny_transformer_config(), resume=True, **options))
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_sigterm_to_the_process_group_with_loader_workers_still_writes_the_checkpoint(workspace):
    # `timeout` and Ctrl-C signal the whole process group, DataLoader workers included
    out = workspace["root"] / "group"
    options = {**_options(workspace, out), "num_workers": 1}
    process = _start({"stage": "stage1", "model": spec_of(tiny_transformer_config()), "sleep_at_step": 4, "sleep_seconds": 2, **options},
                     new_session=True)
    _wait_for_step(out, 4, process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "continue with --resume" in stderr and "DataLoader worker" not in stderr
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 4


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def on_step(done: int, record: dict) -> None:
        if done == step:
            raise _Crash

    return on_step


def test_a_checkpoint_with_the_optimizer_state_in_torchs_own_layout_resumes_the_same(workspace, uninterrupted):
    """Optimizer.state_dict() numbers the parameters in the optimizer's order instead of naming them."""
    out = workspace["root"] / "positional"
    options = _options(workspace, out)
    with pytest.raises(_Crash):
        run_stage1(Stage1Config(model=tiny_transformer_config(), **options), _crash_at(4))
    state = torch.load(out / CHECKPOINT, weights_only=True)
    names = [name for group in state["optimizer"]["param_groups"] for name in group["params"]]
    position = {name: index for index, name in enumerate(names)}
    state["optimizer"] = {"state": {position[name]: values for name, values in state["optimizer"]["state"].items()},
                          "param_groups": [{**group, "params": [position[n] for n in group["params"]]} for group in state["optimizer"]["param_groups"]]}
    torch.save(state, out / CHECKPOINT)
    run_stage1(Stage1Config(model=tiny_transformer_config(), resume=True, **options))
    assert _losses(out) == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


def test_stage2_resume_after_a_crash_repeats_random_masks(workspace, uninterrupted):
    """In process: a run that dies after its step-2 checkpoint, resumed, matches an uninterrupted one."""
    init = workspace["root"] / "whole" / "model"
    base = dict(data=workspace["data"], init=init, checkpoint_every=2, steps=4, **quiet())
    run_stage2(Stage2Config(out=workspace["root"] / "s2_whole", **base))
    with pytest.raises(_Crash):
        run_stage2(Stage2Config(out=workspace["root"] / "s2_parts", **base), _crash_at(3))
    run_stage2(Stage2Config(out=workspace["root"] / "s2_parts", resume=True, **base))
    assert _losses(workspace["root"] / "s2_parts") == pytest.approx(_losses(workspace["root"] / "s2_whole"), rel=1e-6, abs=1e-7)


def test_resume_with_more_steps_continues_the_schedule(workspace, uninterrupted):
    init = workspace["root"] / "whole" / "model"
    base = dict(data=workspace["data"], init=init, checkpoint_every=2, **quiet())
    out = workspace["root"] / "s2_longer"
    run_stage2(Stage2Config(out=out, steps=2, **base))
    run_stage2(Stage2Config(out=out, steps=4, resume=True, **base))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["lr"] > records[3]["lr"] > 0  # cosine over the new total, not the old one's floor


def test_run_json_records_the_kernel_policy_the_run_started_with(workspace, uninterrupted):
    # the uninterrupted run trained on the CPU, where every stage takes the reference path
    from hmar.policy import KernelPolicy
    from hmar.train.checkpoint import read_run_options

    recorded = read_run_options(workspace["root"] / "whole")["kernels"]
    assert KernelPolicy.from_dict(recorded) == KernelPolicy.reference()
