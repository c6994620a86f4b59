"""The transformer blocks' fused kernels on CUDA compute what PyTorch's ops compute: `hmar.kernels.adaln`
for each block's two modulated LayerNorms and the gated residual add between them (and the heads'
norms), `hmar.kernels.cosine_qkv` for the attention inputs, and when sampling on CUDA the MLP's GELU in its
first matmul's epilogue (`torch._addmm_activation`); in sampling (no gradients, eager) and in
training (eager or compiled, drop path folded into the per-sample gains).

CPU: a worker under Triton's interpreter (`tests.interpreter`) runs tiny HMAR and VAR transformers
with a kernel policy that switches the kernels on as on CUDA, and with the reference policy:
- sampling (no gradients): every block and head takes the kernels; logits agree to float32 rounding;
- a training forward and backward with drop path: the same samples' branches are dropped (the same
  random draws), logits and every parameter's gradient agree to float32 rounding;
- each block's last residual add folded into the next block's first norm (`folds_residuals`, on with
  the kernels) against each block adding its own: sampling logits, and a training step's logits and
  gradients (HMAR's two branches, VAR; drop path off and on), agree to float32 rounding, and the
  fold leaves only the first block's first norm and the head's without a residual; blocks compiled
  one region each (fullgraph) give what eager blocks give.
(The GELU epilogue is checked on the GPU only: on the CPU `torch._addmm_activation` applies the exact
GELU, on CUDA the tanh approximation the models use.)
GPU (marked `gpu`): a d16-wide model in bf16 autocast with bf16 Linear weights (as the sampler runs
it), sampling forward, fused (GELU epilogue included) against PyTorch's ops, to bf16 rounding; and
the MLP with the epilogue against `F.gelu(..., approximate="tanh")`. The fold at d16's width in bf16
autocast: sampling (bf16 Linear weights) and a training step (drop path on), folded against unfolded.
"""
from __future__ import annotations

import json
import sys
from unittest import mock

import pytest
import torch

from hmar.policy import KernelPolicy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The blocks' kernels as CUDA runs them, on the CPU under the interpreter. No GELU epilogue: on the
# CPU `torch._addmm_activation` applies the exact GELU, on CUDA the tanh approximation the models use.
INTERPRETED = KernelPolicy(fused_adaln=True, fused_cosine_qkv=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _counting_kernels():
    """Patches that count the calls of the blocks' kernels (the models reach them through their
    modules, so the patched functions are what they call)."""
    import hmar.kernels.adaln as adaln
    import hmar.kernels.cosine_qkv as cosine_qkv

    calls = {"modulated": 0, "residual": 0, "cosine_qkv": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    patches = [mock.patch.object(adaln, "modulated_layer_norm", counting("modulated", adaln.modulated_layer_norm)),
               mock.patch.object(adaln, "residual_modulated_layer_norm", counting("residual", adaln.residual_modulated_layer_norm)),
               mock.patch.object(cosine_qkv, "cosine_qkv", counting("cosine_qkv", cosine_qkv.cosine_qkv))]
    return patches, calls


def _run(model, policy, patches, fn):
    model.set_policy(policy)
    for p in patches:
        p.start()
    try:
        return fn()
    finally:
        for p in patches:
            p.stop()
        model.set_policy(KernelPolicy.reference())


def _sampling_forward(model, labels, teacher, fused_policy):
    """Logits with the fused policy and with the reference one (no gradients), and the fused run's kernel calls."""
    patches, calls = _counting_kernels()
    with torch.no_grad():
        fused = _run(model, fused_policy, patches, lambda: model.forward_next_scale(labels, teacher))
        plain = _run(model, KernelPolicy.reference(), [], lambda: model.forward_next_scale(labels, teacher))
    return fused, plain, calls


def _training_step(model, labels, teacher, seed: int):
    def step():
        model.zero_grad()
        torch.manual_seed(seed)  # drop path's draws
        logits = model.forward_next_scale(labels, teacher)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    patches, calls = _counting_kernels()
    fused, fused_grads = _run(model, INTERPRETED, patches, step)
    plain, plain_grads = _run(model, KernelPolicy.reference(), [], step)
    return {"calls": calls, "logits": _relative(fused, plain), "same_parameters": sorted(fused_grads) == sorted(plain_grads),
            "grads": max(_relative(fused_grads[n], plain_grads[n]) for n in plain_grads if plain_grads[n].norm() > 0)}


def _branch_forwards(model, z_channels: int, batch: int, attention=None, device: str = "cpu") -> dict:
    """Each branch's teacher-forced forward on fixed inputs: name -> () -> logits."""
    gen = torch.Generator().manual_seed(1)
    rest = sum(model.block_sizes[1:])
    labels = torch.arange(batch, device=device) % model.num_classes
    teacher = torch.randn(batch, rest, z_channels, generator=gen).to(device)
    forwards = {"next_scale": lambda: model.forward_next_scale(labels, teacher, attention)}
    if model.has_mask_branch:
        own, masked = torch.randn(batch, rest, z_channels, generator=gen).to(device), (torch.rand(batch, rest, generator=gen) < 0.5).to(device)
        forwards["masked"] = lambda: model.forward_masked(labels, teacher, own, masked, attention)
    return forwards


def _folded_and_unfolded(model, policy, fn):
    """fn() on the fused path with the residual adds folded and unfolded, and the kernel calls of each."""
    runs = {}
    for folds in (True, False):
        patches, calls = _counting_kernels()

        def folded_or_not():
            model.folds_residuals = folds
            return fn()
        runs[folds] = (_run(model, policy, patches, folded_or_not), calls)
    return runs


def _fold_comparison(model, z_channels: int) -> dict:
    """Folded against unfolded: sampling logits (eval, no gradients), and per drop path rate a training
    step's logits and gradients; the kernel calls of a sampling forward."""
    from hmar.transformer import AdaLNBlock

    results = {"blocks": {name: len(getattr(model, name)) for name in ("base_blocks", "ns_blocks", "mask_blocks", "blocks")
                          if hasattr(model, name)}}
    for name, forward in _branch_forwards(model, z_channels, batch=4).items():
        model.eval()
        with torch.no_grad():
            runs = _folded_and_unfolded(model, INTERPRETED, forward)
        (folded, folded_calls), (unfolded, unfolded_calls) = runs[True], runs[False]
        entry = {"sampling": {"logits": _relative(folded, unfolded), "folded_calls": folded_calls, "unfolded_calls": unfolded_calls}}
        model.train()
        blocks = [m for m in model.modules() if isinstance(m, AdaLNBlock)]
        rates = [b.drop_path_rate for b in blocks]
        for dropping in (False, True):
            for block, rate in zip(blocks, rates):
                block.drop_path_rate = rate if dropping else 0.0

            def step():
                model.zero_grad()
                torch.manual_seed(3)  # drop path's draws
                logits = forward()
                logits.square().mean().backward()
                return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            runs = _folded_and_unfolded(model, INTERPRETED, step)
            (folded, folded_grads), _ = runs[True]
            (unfolded, unfolded_grads), _ = runs[False]
            entry["drop_path" if dropping else "no_drop_path"] = {
                "logits": _relative(folded, unfolded), "same_parameters": sorted(folded_grads) == sorted(unfolded_grads),
                "grads": max(_relative(folded_grads[n], unfolded_grads[n]) for n in unfolded_grads if unfolded_grads[n].norm() > 0)}
        results[name] = entry
    return results


def _compiled_fold(model, z_channels: int) -> dict:
    """A folded training step (bf16 autocast, drop path on) with the blocks and heads compiled one
    region each as `hmar.compile` does, but fullgraph through the aot_eager backend, against eager."""
    from torch._dynamo.utils import counters

    from hmar.attention import block_sparse_kernel
    from hmar.transformer import AdaLNBlock, AdaLNHead

    # the attention kernel's custom operator, as training on CUDA runs it
    forward = _branch_forwards(model, z_channels, batch=2, attention=block_sparse_kernel)["next_scale"]

    def step():
        model.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = forward().float()
        logits.square().mean().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.train()
    model.set_policy(INTERPRETED)
    eager_logits, eager_grads = step()
    torch._dynamo.reset()
    counters.clear()
    for region in [m for m in model.modules() if isinstance(m, (AdaLNBlock, AdaLNHead))]:
        region.compile(backend="aot_eager", fullgraph=True, dynamic=False)
    patches, calls = _counting_kernels()
    compiled_logits, compiled_grads = _run(model, INTERPRETED, patches, step)
    torch._dynamo.reset()
    return {"logits": _relative(compiled_logits, eager_logits), "grads": _relative(compiled_grads, eager_grads),
            "graph_breaks": sum(counters["graph_break"].values()), "graphs": int(counters["stats"]["unique_graphs"]), "calls": calls}


def _worker() -> dict:
    import dataclasses

    from hmar.config import ModelConfig
    from hmar.pipeline import Pipeline
    from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

    results = {}
    for family in ("hmar", "var"):
        transformer = dataclasses.replace(tiny_transformer_config(), family=family, drop_path_rate=0.5)
        config = ModelConfig(tiny_tokenizer_config(), transformer)
        model = Pipeline.random(config, device="cpu", seed=0).transformer
        labels = torch.tensor([1, 3, 5, 7])
        teacher = torch.randn(4, sum(model.block_sizes[1:]), config.tokenizer.z_channels, generator=torch.Generator().manual_seed(1))
        fused, plain, calls = _sampling_forward(model.eval(), labels, teacher, INTERPRETED)
        results[family] = {"sampling": {"logits": _relative(fused, plain), "calls": calls},
                           "training": _training_step(model.train(), labels, teacher, seed=3)}
        # three blocks a pass (HMAR: a trunk of two and a block per branch): two boundaries to fold
        deeper = ModelConfig(config.tokenizer, dataclasses.replace(transformer, depth=3))
        model = Pipeline.random(deeper, device="cpu", seed=0).transformer
        results[family]["fold"] = _fold_comparison(model, config.tokenizer.z_channels)
        results[family]["compiled_fold"] = _compiled_fold(model, config.tokenizer.z_channels)
    return results


# fixture -> worker flag: conftest has the session's interpreter process run it ahead
INTERPRETER_WORKERS = {"interpreted": "--interpret-worker"}


@pytest.fixture(scope="module")
def interpreted():
    from tests.interpreter import run_interpreted

    return run_interpreted(__file__, INTERPRETER_WORKERS["interpreted"])


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_interpreter_sampling_forward_takes_the_kernels_and_matches(interpreted, family):
    result = interpreted[family]["sampling"]
    calls = result["calls"]
    # every block: two residual + modulated norms and one cosine-qkv, except that the first block's
    # first norm has no residual to add (the stack's last add follows it); plus the head's norm
    assert calls["cosine_qkv"] >= 2 and calls["modulated"] == 2 and calls["residual"] == 2 * calls["cosine_qkv"] - 1, result
    assert result["logits"] <= 1e-5, result


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_interpreter_training_step_with_drop_path_matches(interpreted, family):
    result = interpreted[family]["training"]
    assert result["calls"]["residual"] >= 2 and result["same_parameters"], result
    assert result["logits"] <= 1e-5 and result["grads"] <= 1e-4, result


@pytest.mark.parametrize("family, branches", [("hmar", ["next_scale", "masked"]), ("var", ["next_scale"])])
def test_interpreter_folded_residual_adds_match_unfolded(interpreted, family, branches):
    result = interpreted[family]["fold"]
    blocks = sum(result["blocks"].values()) - result["blocks"].get("mask_blocks", 0)  # a pass runs one branch
    assert blocks == 3, result
    for branch in branches:
        entry = result[branch]
        folded, unfolded = entry["sampling"]["folded_calls"], entry["sampling"]["unfolded_calls"]
        # the same kernels, but only the first block's first norm and the head's without a residual
        assert folded["cosine_qkv"] == unfolded["cosine_qkv"] == blocks, entry
        assert unfolded == {**folded, "modulated": blocks + 1, "residual": blocks}, entry
        assert folded["modulated"] == 2 and folded["residual"] == 2 * blocks - 1, entry
        assert entry["sampling"]["logits"] <= 1e-6, entry
        for dropping in ("no_drop_path", "drop_path"):
            step = entry[dropping]
            assert step["same_parameters"] and step["logits"] <= 1e-6 and step["grads"] <= 1e-5, (dropping, entry)


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_interpreter_compiled_blocks_fold_the_residual_adds_as_eager_ones(interpreted, family):
    result = interpreted[family]["compiled_fold"]
    # graphs: a block without a pending residual (the first), one with, the head
    assert result["graph_breaks"] == 0 and result["graphs"] >= 3 and result["calls"]["residual"] > 0, result
    # the same ops in the same order (aot_eager keeps them): bf16 autocast's rounding aside, identical
    assert result["logits"] <= 1e-6 and result["grads"] <= 1e-5, result


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["hmar", "var"])
def test_gpu_fused_sampling_forward_matches_pytorch_ops(family):
    import torch.nn.functional as F

    from hmar.config import ModelConfig, TransformerConfig, tokenizer_preset
    from hmar.inference import cast_linears
    from hmar.pipeline import Pipeline
    from hmar.transformer import FeedForward

    config = ModelConfig(tokenizer_preset(256), TransformerConfig(family=family, depth=4, width=1024, num_heads=16, branch_depth=1))
    model = Pipeline.random(config, device="cuda", seed=0, kernels=KernelPolicy.reference()).transformer.eval()
    cast_linears(model, torch.bfloat16)
    labels = torch.arange(16, device="cuda")
    teacher = torch.randn(16, sum(model.block_sizes[1:]), config.tokenizer.z_channels, device="cuda",
                          generator=torch.Generator("cuda").manual_seed(1))
    policy = KernelPolicy.choose("cuda", training=False)
    assert policy.fused_adaln and policy.fused_cosine_qkv and policy.gelu_epilogue
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused, plain, calls = _sampling_forward(model, labels, teacher, policy)
    assert calls["residual"] > 0
    mlp = next(m for m in model.modules() if isinstance(m, FeedForward))
    x = torch.randn(4, 100, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), mock.patch.object(torch, "_addmm_activation", wraps=torch._addmm_activation) as epilogue:
        mlp.gelu_epilogue = True
        expected = mlp.fc2(F.gelu(mlp.fc1(x).float(), approximate="tanh").to(torch.bfloat16))
        assert _relative(mlp(x).float(), expected.float()) <= 1e-2
        assert epilogue.call_count == 1
    # PyTorch rounds each op's result to bf16 (the gated residual, the normalised q and k); the
    # kernels round once: the difference is bf16 rounding carried through the blocks.
    assert _relative(fused.float(), plain.float()) <= 2e-2


def _bf16_fold(family: str, device: str, width: int, heads: int, batch: int) -> dict:
    """Folded against unfolded in bf16 autocast as the device runs them: the sampling policy's forward
    of each branch with bf16 Linear weights, and the eager training policy's step (drop path on)."""
    from hmar.config import ModelConfig, TransformerConfig, tokenizer_preset
    from hmar.inference import cast_linears
    from hmar.pipeline import Pipeline

    config = ModelConfig(tokenizer_preset(256), TransformerConfig(family=family, depth=4, width=width, num_heads=heads, branch_depth=1,
                                                                  drop_path_rate=0.1))
    model = Pipeline.random(config, device=device, seed=0, kernels=KernelPolicy.reference()).transformer
    forwards = _branch_forwards(model, config.tokenizer.z_channels, batch, device=device)
    results = {}
    training = KernelPolicy.choose(device, training=True, compile=False)
    for name, forward in forwards.items():
        def step():
            model.zero_grad()
            torch.manual_seed(3)  # drop path's draws
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = forward()
            logits.float().square().mean().backward()
            return logits.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        runs = _folded_and_unfolded(model.train(), training, step)
        (folded, folded_grads), folded_calls = runs[True]
        (unfolded, unfolded_grads), _ = runs[False]
        results[name] = {"training": {
            "logits": _relative(folded, unfolded), "same_parameters": sorted(folded_grads) == sorted(unfolded_grads),
            "grads": _relative(torch.cat([g.flatten() for g in folded_grads.values()]), torch.cat([g.flatten() for g in unfolded_grads.values()])),
            "worst_grad": max(_relative(folded_grads[n], unfolded_grads[n]) for n in unfolded_grads if unfolded_grads[n].norm() > 0),
            "calls": folded_calls}}
    cast_linears(model, torch.bfloat16)
    sampling = KernelPolicy.choose(device, training=False)
    for name, forward in forwards.items():
        def sampled():
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                return forward().float()
        runs = _folded_and_unfolded(model.eval(), sampling, sampled)
        results[name]["sampling"] = {"logits": _relative(runs[True][0], runs[False][0]), "calls": runs[True][1]}
    return results


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["hmar", "var"])
def test_gpu_folded_residual_adds_match_unfolded_in_bf16(family):
    results = _bf16_fold(family, "cuda", width=1024, heads=16, batch=8)
    for name, result in results.items():
        assert result["sampling"]["calls"]["modulated"] == 2 and result["training"]["calls"]["modulated"] == 2, (name, result)
        # bf16 branch outputs times bf16 gains are exact in float32: the fold adds what the add did
        assert result["sampling"]["logits"] <= 1e-4, (name, result)
        training = result["training"]
        assert training["same_parameters"] and training["logits"] <= 1e-4, (name, result)
        # the gains' gradients are sums over the rows in another order, then rounded to bf16
        assert training["grads"] <= 1e-2 and training["worst_grad"] <= 5e-2, (name, result)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_worker()))
