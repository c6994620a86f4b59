"""What a sampled batch computes once and what it computes per pass.

At batch 1 a pass over the blocks launches small kernels whose count, not their work, sets the time
(a CUDA graph replays each of them). What depends only on the batch's classes and the weights (each
block's and head's AdaLN modulations, each attention's fused qkv bias) is computed at the first pass
and kept in the batch's `sampling_cache`; these tests count it on the CPU: once per layer and batch
whatever the number of steps, with the same images as before (the conformance tests hold the
numbers). `recipes/benchmarks/sampling_launches.py` counts every launch of a d16 batch; here, under
Triton's interpreter with the CUDA sampling policy, it counts a tiny model's batch with each block's
last residual add folded into the next block's first norm and without: the fold saves exactly one
launch per block boundary of every pass (between the trunk and a branch too).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hmar.config import ModelConfig
from hmar.pipeline import Pipeline
from hmar.sampler import doubled, make_generator, sample
from hmar.schedule import schedule_for_steps
from hmar.transformer import AdaLNBlock, AdaLNHead
from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

# (family, shared AdaLN): the blocks' modulations from their own projection, or from the shared one
MODELS = [("hmar", False), ("hmar", True), ("var", False)]
# On CUDA the device's sampling policy runs: the fused block kernels, the fused draw, bf16, float16 decoder
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def _pipeline(family: str, shared_aln: bool, device: str = "cpu", kernels=None) -> Pipeline:
    # head dim 64: one the cosine-attention kernel takes
    transformer = dataclasses.replace(tiny_transformer_config(), family=family, shared_aln=shared_aln, depth=3, width=128)
    return Pipeline.random(ModelConfig(tiny_tokenizer_config(), transformer), device=device, seed=0, kernels=kernels)


def _schedule(pipe: Pipeline, steps: int) -> list[list[int]]:
    patch_nums = pipe.config.patch_nums
    return schedule_for_steps(patch_nums, steps if pipe.config.family == "hmar" else len(patch_nums))


def _sample(pipe: Pipeline, schedule, batch: int = 1):
    labels = torch.arange(batch, device=pipe.device) % pipe.num_classes
    return sample(pipe.tokenizer, pipe.transformer, labels, schedule, generator=make_generator(0, pipe.device),
                  amp_dtype=pipe.amp_dtype)


def _assert_identical(a, b) -> None:
    assert torch.equal(a.images, b.images) and torch.equal(a.f_hat, b.f_hat)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


class _Ops(TorchDispatchMode):
    """Counts ATen operators by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family, shared_aln", MODELS)
def test_a_batch_computes_each_layers_modulations_once_and_runs_its_blocks_every_pass(monkeypatch, family, shared_aln):
    pipe = _pipeline(family, shared_aln)
    modulations, passes = Counter(), Counter()
    block_modulation = AdaLNBlock.modulation
    monkeypatch.setattr(AdaLNBlock, "modulation", lambda self, cond: modulations.update([self]) or block_modulation(self, cond))
    heads = [m for m in pipe.transformer.modules() if isinstance(m, AdaLNHead)]
    blocks = [m for m in pipe.transformer.modules() if isinstance(m, AdaLNBlock)]
    hooks = [head.ada_lin.register_forward_hook(lambda m, i, o: modulations.update([m])) for head in heads]
    hooks += [block.register_forward_hook(lambda m, i, o: passes.update([m])) for block in blocks]
    try:
        schedule = _schedule(pipe, 7)
        _sample(pipe, schedule)
    finally:
        for hook in hooks:
            hook.remove()
    steps = sum(len(entry) for entry in schedule)
    assert steps > len(schedule) or family == "var"
    # every layer that ran computed its modulations exactly once; the trunk ran at every pass
    assert set(modulations) == set(blocks) | {head.ada_lin for head in heads}
    assert set(modulations.values()) == {1}
    assert max(passes.values()) == steps and set(passes) == set(blocks)


@pytest.mark.parametrize("family, shared_aln", MODELS)
def test_what_a_batch_computes_once_does_not_grow_with_its_steps(family, shared_aln):
    """The modulations' activations and the qkv biases' concatenations happen once per layer and batch:
    as many with few steps as with more, while the passes' own work grows."""
    pipe = _pipeline(family, shared_aln)
    counts = []
    for steps in (5, 9):  # both run the mask branch
        with _Ops() as ops:
            _sample(pipe, _schedule(pipe, steps))
        counts.append(ops.counts)
    once, more = counts
    assert once["silu"] == more["silu"] and once["cat"] == more["cat"]
    if family == "hmar":
        assert more["addmm"] > once["addmm"] and more["_scaled_dot_product_flash_attention_for_cpu"] > once["_scaled_dot_product_flash_attention_for_cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, shared_aln", MODELS)
def test_the_kept_values_give_what_computing_them_at_every_pass_gives(monkeypatch, family, shared_aln, device):
    """The same images and tokens, bit for bit, when every pass computes the layers' constants anew
    (a cache that keeps nothing), at batch 1 (the doubled input a view) and 3 (a copy)."""
    pipe = _pipeline(family, shared_aln, device)
    schedule = _schedule(pipe, 7)
    kept = [_sample(pipe, schedule, batch) for batch in (1, 3)]
    original = pipe.transformer.sampling_cache
    monkeypatch.setattr(pipe.transformer, "sampling_cache", lambda: _Forgetting(original()))
    for batch, a in zip((1, 3), kept):
        _assert_identical(a, _sample(pipe, schedule, batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["hmar", "var"])
def test_the_fused_draw_reads_the_heads_logits_as_float32_copies_of_them_give(monkeypatch, family):
    """The fused draw takes the heads' logits in their dtype and converts them itself: the same tokens
    and images as from float32 copies of them."""
    pipe = _pipeline(family, False, "cuda")
    assert pipe.policy.fused_draw and pipe.policy.amp_dtype is not None
    schedule = _schedule(pipe, 7)
    direct = _sample(pipe, schedule, 2)
    monkeypatch.setattr(type(pipe.transformer), "_sampling_logits", lambda self, logits: logits.float())
    _assert_identical(direct, _sample(pipe, schedule, 2))


class _Forgetting(dict):
    """Layer caches that forget the kept modulations and bias before every use (VAR's keys stay)."""

    def __getitem__(self, module):
        cache = super().__getitem__(module)
        cache.modulation = cache.qkv_bias = None
        return cache


def test_the_doubled_input_is_the_labels_rows_then_the_same_rows_a_view_at_batch_1():
    one = torch.randn(1, 5, 8)
    assert torch.equal(doubled(one), one.repeat(2, 1, 1)) and doubled(one).data_ptr() == one.data_ptr()
    three = torch.randn(3, 5, 8)
    assert torch.equal(doubled(three), three.repeat(2, 1, 1))


def _fold_launches_worker() -> dict:
    """Under the interpreter, per family: one batch-1 `sample` call's launches by the recipe's counter
    with the CUDA sampling policy, folded and unfolded, and the block passes and the stacks of them
    (one per head norm) that ran."""
    import importlib.util

    from tests.interpreter import ROOT

    spec = importlib.util.spec_from_file_location("sampling_launches", ROOT / "recipes" / "benchmarks" / "sampling_launches.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    results = {}
    for family in ("hmar", "var"):
        pipe = _pipeline(family, False, kernels=recipe.cuda_sampling_policy())
        model, schedule = pipe.transformer, _schedule(pipe, 7)
        calls = Counter()
        hooks = [m.register_forward_hook(lambda m, i, o, kind=type(m).__name__: calls.update([kind]))
                 for m in model.modules() if isinstance(m, (AdaLNBlock, AdaLNHead))]
        counts = {}
        for folds in (True, False):
            model.folds_residuals = folds
            calls.clear()
            counter = recipe.count_sampling_launches(pipe, torch.tensor([3]), schedule, amp_dtype=pipe.amp_dtype)
            counts["folded" if folds else "unfolded"] = {
                "total": counter.total, "addcmul": counter.by_op["aten.addcmul"], "adaln": counter.by_op["triton._adaln_fwd"],
                # the warm-up call and the counted one run the same passes
                "blocks": calls["AdaLNBlock"] // 2, "stacks": calls["AdaLNHead"] // 2}
        for hook in hooks:
            hook.remove()
        results[family] = {"policy": pipe.policy.compact(), **counts}
    return results


# fixture -> worker flag: conftest has the session's interpreter process run it ahead
INTERPRETER_WORKERS = {"fold_launches": "--fold-launches-worker"}


@pytest.fixture(scope="module")
def fold_launches():
    from tests.interpreter import run_interpreted

    return run_interpreted(__file__, INTERPRETER_WORKERS["fold_launches"])


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_folding_the_residual_adds_saves_a_launch_per_block_boundary_of_every_pass(fold_launches, family):
    result = fold_launches[family]
    folded, unfolded = result["folded"], result["unfolded"]
    assert "fused_adaln" in result["policy"] and folded["blocks"] == unfolded["blocks"] and folded["stacks"] == unfolded["stacks"]
    boundaries = folded["blocks"] - folded["stacks"]
    # 3 blocks a pass: 2 boundaries each
    assert folded["blocks"] == 3 * folded["stacks"] and boundaries == 2 * folded["stacks"] > 0, result
    assert unfolded["total"] - folded["total"] == boundaries, result
    # what goes: each block's own last add; what stays: one norm kernel per norm, and one add per pass
    assert unfolded["addcmul"] == folded["addcmul"] + boundaries and folded["addcmul"] >= folded["stacks"], result
    assert folded["adaln"] == unfolded["adaln"], result


if __name__ == "__main__" and sys.argv[1:] == ["--fold-launches-worker"]:
    print(json.dumps(_fold_launches_worker()))
