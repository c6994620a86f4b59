"""A few steps of each stage on tiny synthetic data, what they write, and the run-folder rules."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hmar.config import ModelConfig
from hmar.pipeline import Pipeline
from hmar.train import Stage1Config, Stage2Config, TokenizerTrainConfig, run_stage1, run_stage2, run_tokenizer
from hmar.train.checkpoint import CHECKPOINT
from hmar.train.errors import TrainingError
from hmar.train.metrics import read_metrics
from hmar.train.model_folders import load_tokenizer
from tests.train_helpers import make_data, make_tokenizer_folder, quiet, tiny_tokenizer_config, tiny_transformer_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "data": make_data(root / "data"), "tokenizer": make_tokenizer_folder(root / "tokenizer")}


@pytest.fixture(scope="module")
def stage1_run(workspace):
    config = Stage1Config(data=workspace["data"], out=workspace["root"] / "s1", tokenizer=workspace["tokenizer"],
                          model=tiny_transformer_config(), steps=4, sample_every=2, ema_decay=0.9, **quiet())
    return run_stage1(config)


def test_tokenizer_stage_trains_restarts_dead_codes_and_exports(workspace):
    out = workspace["root"] / "tok"
    config = TokenizerTrainConfig(data=workspace["data"], out=out, model=tiny_tokenizer_config(), steps=3,
                                  dead_code_every=1, dead_code_threshold=1e9, **quiet())  # every code counts as dead
    result = run_tokenizer(config)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert {"reconstruction", "vq", "usage_per_scale/scale_3"} <= set(records[-1])
    assert torch.load(out / CHECKPOINT, weights_only=True)["extra"]["restarted_codes"] == 3 * 64
    tokenizer = load_tokenizer(result.exported)
    assert tokenizer.config == tiny_tokenizer_config()
    assert (out / "samples" / "final.png").is_file()


def test_stage1_logs_per_scale_numbers_and_writes_a_usable_model_folder(stage1_run):
    records = read_metrics(stage1_run.out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    for k in range(4):
        assert math.isfinite(last[f"loss_per_scale/scale_{k}"]) and 0 <= last[f"acc_per_scale/scale_{k}"] <= 1
    assert {"lr", "images_per_s", "grad_norm", "skipped_images"} <= set(last)
    assert (stage1_run.out / "samples" / "step_0000002.png").is_file()
    config = ModelConfig.load(stage1_run.exported / "config.json")
    assert config.sampling == {"steps": 4} and config.class_names[0] == "checkerboard"
    generation = Pipeline.from_folder(stage1_run.exported, device="cpu").generate([0, 9], seed=0)
    assert generation.images.shape == (2, 3, 64, 64)


def test_stage1_learns(workspace):
    # from a token cache: the same tokens as encoding each batch (stage1_run does), without re-encoding
    # the images at every one of the 30 steps
    config = Stage1Config(data=workspace["data"], out=workspace["root"] / "learn", tokenizer=workspace["tokenizer"],
                          model=tiny_transformer_config(), steps=30, lr=3e-3, warmup_steps=1, log_every=1,
                          token_cache=workspace["root"] / "learn_tokens.pt",
                          **{k: v for k, v in quiet().items() if k not in ("log_every", "warmup_steps")})
    run_stage1(config)
    losses = [r["loss"] for r in read_metrics(config.out)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_stage2_trains_only_the_mask_branch_and_exports_both_branches(workspace, stage1_run):
    out = workspace["root"] / "s2"
    cache = workspace["root"] / "tokens.pt"
    result = run_stage2(Stage2Config(data=workspace["data"], out=out, init=stage1_run.exported, steps=3, token_cache=cache, **quiet()))
    assert cache.is_file()
    before = load_file(stage1_run.exported / "hmar.safetensors")
    after = load_file(result.exported / "hmar.safetensors")
    frozen = [k for k in before if not k.startswith(("mask_blocks", "mask_head", "mask_embed"))]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    # the mask branch started as a copy of the next-scale branch and then moved
    assert not torch.equal(after["mask_head.weight"], before["ns_head.weight"])
    assert not torch.equal(after["mask_blocks.0.attn.mat_qkv.weight"], before["mask_blocks.0.attn.mat_qkv.weight"])
    data = json.loads((result.exported / "config.json").read_text())
    assert set(data) == {"tokenizer", "hmar", "files", "class_names"}
    assert data["files"] == {"tokenizer": "tokenizer.safetensors", "hmar": "hmar.safetensors"}
    last = read_metrics(out)[-1]
    assert "loss_per_scale/scale_1" in last and "loss_per_scale/scale_0" not in last
    pipe = Pipeline.from_folder(result.exported, device="cpu")
    assert pipe.generate([3], steps=8, seed=0).images.shape == (1, 3, 64, 64)

    # a second run reuses the cache; a cache of another tokenizer is refused
    other = make_tokenizer_folder(workspace["root"] / "other_tokenizer")
    torch.manual_seed(1)
    with pytest.raises(TrainingError, match="another tokenizer"):
        run_stage1(Stage1Config(data=workspace["data"], out=workspace["root"] / "s1_other", tokenizer=_perturbed(other),
                                model=tiny_transformer_config(), steps=1, token_cache=cache, **quiet()))


def _perturbed(folder):
    from safetensors.torch import save_file

    weights = load_file(folder / "tokenizer.safetensors")
    weights["quantize.embedding.weight"] += 1
    save_file(weights, str(folder / "tokenizer.safetensors"))
    return folder


def test_run_folders_are_never_overwritten_and_resume_checks_options(workspace, stage1_run):
    base = dict(data=workspace["data"], out=stage1_run.out, tokenizer=workspace["tokenizer"], model=tiny_transformer_config(), **quiet())
    with pytest.raises(TrainingError, match="exists and is not empty"):
        run_stage1(Stage1Config(steps=4, **base))
    with pytest.raises(TrainingError, match="other options"):
        run_stage1(Stage1Config(steps=5, lr=1.0, resume=True, **base))
    with pytest.raises(TrainingError, match="nothing to resume"):
        run_stage1(Stage1Config(steps=4, resume=True, **{**base, "out": workspace["root"] / "fresh"}))


def test_out_of_memory_names_the_knob(workspace, monkeypatch):
    from hmar.train.stage1 import NextScaleObjective

    def exhausted(self, *inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(NextScaleObjective, "forward", exhausted)
    with pytest.raises(TrainingError, match="--batch-size"):
        run_stage1(Stage1Config(data=workspace["data"], out=workspace["root"] / "oom", tokenizer=workspace["tokenizer"],
                                model=tiny_transformer_config(), steps=2, **quiet()))


def test_cuda_graph_steps_need_one_cuda_process(workspace):
    out = workspace["root"] / "graphed_on_cpu"
    with pytest.raises(TrainingError, match="--cuda-graph needs one training process on a CUDA device, not 1 on cpu"):
        run_stage1(Stage1Config(data=workspace["data"], out=out, tokenizer=workspace["tokenizer"], model=tiny_transformer_config(),
                                steps=2, cuda_graph=True, device="cpu", **quiet()))
    assert not out.exists()  # refused before the run folder is written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_stage1_trains_like_the_eager_one_and_resumes(workspace, tmp_path):
    """`--cuda-graph`: 3 eager warm-up steps, the capture, then replays; label dropout's random
    numbers reseeded before each replay; the learning rate (warm-up, then cosine) filled into the
    captured optimizer's tensor. Each step logs the eager run's loss and gradient norm (capturable
    AdamW keeps its step count on the device: the last bits may differ). Resuming swaps the two (the
    graphed run goes on eagerly, the eager one graphed, its learning rate a tensor again): both go on alike."""
    base = dict(data=workspace["data"], tokenizer=workspace["tokenizer"], model=tiny_transformer_config(), device="cuda",
                **quiet(warmup_steps=3))
    logs = {}
    for graphed in (False, True):
        out = tmp_path / f"graphed_{graphed}"
        run_stage1(Stage1Config(out=out, steps=7, cuda_graph=graphed, **base))
        logs[graphed] = read_metrics(out)
    for key in ("loss", "grad_norm", "lr"):
        eager, replayed = ([r[key] for r in logs[g]] for g in (False, True))
        torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=1e-3, atol=1e-5)
    assert len({r["lr"] for r in logs[True]}) > 3  # the schedule moved the captured learning rate

    resumed = {}
    for graphed in (False, True):  # each run resumed the other way: a graphed run from the eager checkpoint and back
        out = tmp_path / f"graphed_{graphed}"
        run_stage1(Stage1Config(out=out, steps=12, resume=True, cuda_graph=not graphed, **base))
        resumed[graphed] = [r["loss"] for r in read_metrics(out)][7:]
    assert len(resumed[True]) == len(resumed[False]) == 5
    torch.testing.assert_close(torch.tensor(resumed[True]), torch.tensor(resumed[False]), rtol=1e-3, atol=1e-5)
