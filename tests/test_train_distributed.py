"""Two processes under torchrun (gloo, CPU) train like one process with their combined batch, with
the model replicated (DDP) or sharded (FSDP2); sharded runs write the same checkpoints and model
folders and resume exactly; a checkpoint written by one process, DDP or FSDP resumes under any of
them; two torchrun "nodes" joined by a c10d rendezvous train like one two-process torchrun."""
from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from hmar.train import Stage1Config, TokenizerTrainConfig, run_stage1
from hmar.train.checkpoint import CHECKPOINT
from hmar.train.metrics import read_metrics
from hmar.train.model_folders import load_model_folder
from tests.train_helpers import make_data, make_tokenizer_folder, quiet, spec_of, tiny_transformer_config

HELPER = Path(__file__).with_name("train_helpers.py")
ROOT = HELPER.parents[1]
STEPS = 3


TIMEOUT = 300
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun_command(spec: dict, *launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(HELPER), json.dumps(spec)]


def _torchrun(spec: dict) -> subprocess.CompletedProcess:
    command = _torchrun_command(spec, "--standalone", "--nproc_per_node", "2")
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data, tokenizer = make_data(root / "data"), make_tokenizer_folder(root / "tokenizer")
    # no label dropout: the per-process random streams differ, everything else must agree
    options = dict(data=str(data), tokenizer=str(tokenizer), steps=STEPS, cond_drop_rate=0.0, ema_decay=0.9, **quiet())
    return {"root": root, "data": data, "options": options}


@pytest.fixture(scope="module")
def one_process(workspace):
    out = workspace["root"] / "one"
    run_stage1(Stage1Config(model=tiny_transformer_config(), out=out, **{**workspace["options"], "batch_size": 4}))
    return out


def _stage1_spec(workspace, out: Path, **options) -> dict:
    """Stage 1 with 2 images per process: two processes make the one-process run's batch of 4."""
    return {"stage": "stage1", "model": spec_of(tiny_transformer_config()), **workspace["options"], "out": str(out), "batch_size": 2, **options}


def _two_processes(workspace, name: str, **options) -> Path:
    out = workspace["root"] / name
    done = _torchrun(_stage1_spec(workspace, out, **options))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_stage1(workspace):
    return _two_processes(workspace, "ddp")


@pytest.fixture(scope="module")
def fsdp_stage1(workspace):
    # a preview grid mid-run too: sampling a sharded model needs both processes
    return _two_processes(workspace, "fsdp", sharding="fsdp", sample_every=2)


def _same_structure(sharded, replicated, where: str = "") -> None:
    """Same keys, plain tensors of the same shapes and dtypes, values equal up to float rounding."""
    if isinstance(replicated, dict):
        assert set(sharded) == set(replicated), where
        for key in replicated:
            _same_structure(sharded[key], replicated[key], f"{where}/{key}")
    elif isinstance(replicated, (list, tuple)):
        assert len(sharded) == len(replicated), where
        for a, b in zip(sharded, replicated):
            _same_structure(a, b, where)
    elif torch.is_tensor(replicated):
        assert type(sharded) is torch.Tensor and sharded.shape == replicated.shape and sharded.dtype == replicated.dtype, where
        torch.testing.assert_close(sharded, replicated, rtol=1e-4, atol=1e-5, msg=where)
    else:
        assert sharded == replicated, where


def test_two_gloo_processes_match_one_process_with_the_global_batch(one_process, ddp_stage1):
    two = ddp_stage1
    assert [r["step"] for r in read_metrics(two)] == list(range(1, STEPS + 1))
    assert _losses(two) == pytest.approx(_losses(one_process), rel=1e-4)
    assert (two / "model" / "config.json").is_file()


def test_two_nodes_joined_by_a_c10d_rendezvous_train_like_two_processes_on_one(workspace, ddp_stage1):
    """The README's multi-node launch, with two torchrun agents on this machine as the two nodes.

    Each agent starts one process; the rendezvous gives them global ranks 0 and 1 (LOCAL_RANK is
    0 on both), and only global rank 0 writes into the shared run folder. Same ranks, batches and
    seeds as the two-process standalone run, and a sum of two numbers does not depend on order, so
    the losses agree exactly."""
    root, endpoint = workspace["root"], f"127.0.0.1:{_free_port()}"
    out, logs = root / "two_nodes", [root / f"two_nodes.node{i}.log" for i in range(2)]
    spec = _stage1_spec(workspace, out)
    nodes = []
    for i, log in enumerate(logs):
        # is_host: the first agent hosts the rendezvous store, the second connects to it
        launch = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                  "--rdzv_id", "two-nodes", "--rdzv_conf", f"is_host={int(i == 0)}", "--max_restarts", "0")
        with open(log, "w") as stream:
            nodes.append(subprocess.Popen(_torchrun_command(spec, *launch), cwd=ROOT, env=ENV, stdout=stream, stderr=subprocess.STDOUT))

    def outputs() -> str:
        return "\n".join(f"--- node {i} (exit {node.returncode}) ---\n{log.read_text()[-3000:]}" for i, (node, log) in enumerate(zip(nodes, logs)))
    try:
        for node in nodes:
            node.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
            node.wait()
        pytest.fail(f"the two nodes did not finish in {TIMEOUT} s\n{outputs()}")
    assert [node.returncode for node in nodes] == [0, 0], outputs()

    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert _losses(out) == _losses(ddp_stage1), outputs()
    assert [r["grad_norm"] for r in read_metrics(out)] == [r["grad_norm"] for r in read_metrics(ddp_stage1)]
    assert (out / "model" / "config.json").is_file()


def test_fsdp_trains_like_one_process_and_writes_the_same_checkpoint_and_model(one_process, fsdp_stage1):
    records = read_metrics(fsdp_stage1)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert _losses(fsdp_stage1) == pytest.approx(_losses(one_process), rel=1e-4)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in read_metrics(one_process)], rel=1e-4)
    # whole tensors, not shards: the format of an unsharded run (so either sharding can resume it)
    _same_structure(torch.load(fsdp_stage1 / CHECKPOINT, weights_only=True), torch.load(one_process / CHECKPOINT, weights_only=True))
    sharded, replicated = load_model_folder(fsdp_stage1 / "model")[2], load_model_folder(one_process / "model")[2]
    _same_structure(sharded.state_dict(), replicated.state_dict())  # the EMA weights, gathered
    assert (fsdp_stage1 / "samples" / "step_0000002.png").is_file() and (fsdp_stage1 / "samples" / "final.png").is_file()


def test_fsdp_stage2_resumed_after_a_crash_repeats_the_uninterrupted_run(workspace, fsdp_stage1):
    """Stage 2 freezes the sharded trunk but back-propagates through it; its masks are random."""
    root = workspace["root"]
    base = {"stage": "stage2", "data": str(workspace["data"]), "init": str(fsdp_stage1 / "model"), "sharding": "fsdp",
            **quiet(batch_size=2, steps=4, checkpoint_every=2, ema_decay=0.9)}
    whole = _torchrun({**base, "out": str(root / "s2_whole")})
    assert whole.returncode == 0, whole.stderr[-3000:]

    crashed = _torchrun({**base, "out": str(root / "s2_parts"), "fail_at_step": 3})
    assert crashed.returncode != 0 and "crash requested at step 3" in crashed.stderr
    assert torch.load(root / "s2_parts" / CHECKPOINT, weights_only=True)["step"] == 2
    shutil.copy(root / "s2_parts" / CHECKPOINT, root / "step2.pt")

    resumed = _torchrun({**base, "out": str(root / "s2_parts"), "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(root / "s2_parts")] == [1, 2, 3, 4]
    assert _losses(root / "s2_parts") == pytest.approx(_losses(root / "s2_whole"), rel=1e-6, abs=1e-7)

    # the step-2 checkpoint again, resumed replicated instead of sharded
    shutil.copy(root / "step2.pt", root / "s2_parts" / CHECKPOINT)
    other = _torchrun({**base, "out": str(root / "s2_parts"), "resume": True, "sharding": "ddp"})
    assert other.returncode == 0, other.stderr[-3000:]
    assert _losses(root / "s2_parts") == pytest.approx(_losses(root / "s2_whole"), rel=1e-5)


def _checkpoint(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, weights_only=True)


def test_a_one_process_checkpoint_resumes_sharded_as_it_does_replicated(workspace, one_process):
    """Two processes continue the one-process run by two steps: FSDP cuts its whole tensors (weights,
    AdamW moments, EMA) into shards where DDP copies them whole, and the two continue alike."""
    runs = {}
    for sharding in ("ddp", "fsdp"):
        out = runs[sharding] = workspace["root"] / f"one_to_{sharding}"
        shutil.copytree(one_process, out)
        done = _torchrun(_stage1_spec(workspace, out, batch_size=4, steps=STEPS + 2, sharding=sharding, resume=True))
        assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(runs["fsdp"])] == list(range(1, STEPS + 3))
    assert _losses(runs["fsdp"]) == pytest.approx(_losses(runs["ddp"]), rel=1e-5)
    # the last step changed the weights by the loaded moments, and the EMA by the loaded averages
    _same_structure(_checkpoint(runs["fsdp"]), _checkpoint(runs["ddp"]))


def test_an_fsdp_checkpoint_resumes_in_one_process_as_a_ddp_one_does(workspace, ddp_stage1, fsdp_stage1):
    runs = {}
    for name, source in (("ddp", ddp_stage1), ("fsdp", fsdp_stage1)):
        out = runs[name] = workspace["root"] / f"{name}_to_one"
        shutil.copytree(source, out)
        options = {**workspace["options"], "batch_size": 2, "steps": STEPS + 2, "resume": True}
        run_stage1(Stage1Config(model=tiny_transformer_config(), out=out, **options))
    assert [r["step"] for r in read_metrics(runs["fsdp"])] == list(range(1, STEPS + 3))
    assert _losses(runs["fsdp"]) == pytest.approx(_losses(runs["ddp"]), rel=1e-4)
    _same_structure(_checkpoint(runs["fsdp"]), _checkpoint(runs["ddp"]))


def test_closing_frees_what_holds_the_group_before_ending_it(monkeypatch):
    """Objects in reference cycles (as FSDP's state is with its modules, holding the group's
    communicators) are collected before the group ends; the processes wait for each other first only
    when all of them ended the run the same way."""
    from hmar.train import distributed

    class Holder:
        pass

    calls = []
    for together in (True, False):
        holder = Holder()
        holder.cycle = holder
        alive = weakref.ref(holder)
        del holder
        monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append(("barrier", alive() is None)))
        monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append(("destroy", alive() is None)))
        gc.disable()  # only `close` may collect the cycle
        try:
            distributed.Processes(0, 2, 0, torch.device("cpu"), owns_group=True).close(together)
        finally:
            gc.enable()
    assert calls == [("barrier", True), ("destroy", True), ("destroy", True)]


def test_the_tokenizer_stage_refuses_fsdp(tmp_path):
    # its dead-code restarts write into the whole codebook on every process
    with pytest.raises(ValueError, match="tokenizer stage trains with sharding 'ddp' only"):
        TokenizerTrainConfig(data=tmp_path, out=tmp_path / "run", sharding="fsdp")
