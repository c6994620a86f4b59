"""The transformer blocks' fused kernels on CUDA compute what PyTorch's ops compute: `hmar.kernels.adaln`
for each block's two modulated LayerNorms and the gated residual add between them (and the heads'
norms), `hmar.kernels.cosine_qkv` for the attention inputs, and when sampling on CUDA the MLP's GELU in its
first matmul's epilogue (`torch._addmm_activation`); in sampling (no gradients, eager) and in
training (eager or compiled, drop path folded into the per-sample gains).

CPU: a worker under Triton's interpreter (`tests.interpreter`) runs tiny HMAR and VAR transformers
with a kernel policy that switches the kernels on as on CUDA, and with the reference policy:
- sampling (no gradients): every block and head takes the kernels; logits agree to float32 rounding;
- a training forward and backward with drop path: the same samples' branches are dropped (the same
  random draws), logits and every parameter's gradient agree to float32 rounding.
(The GELU epilogue is checked on the GPU only: on the CPU `torch._addmm_activation` applies the exact
GELU, on CUDA the tanh approximation the models use.)
GPU (marked `gpu`): a d16-wide model in bf16 autocast with bf16 Linear weights (as the sampler runs
it), sampling forward, fused (GELU epilogue included) against PyTorch's ops, to bf16 rounding; and
the MLP with the epilogue against `F.gelu(..., approximate="tanh")`.
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
    # every block: one modulated norm, one residual + modulated norm, one cosine-qkv; plus the head's norm
    assert calls["residual"] >= 2 and calls["modulated"] == calls["residual"] + 1 == calls["cosine_qkv"] + 1, result
    assert result["logits"] <= 1e-5, result


@pytest.mark.parametrize("family", ["hmar", "var"])
def test_interpreter_training_step_with_drop_path_matches(interpreted, family):
    result = interpreted[family]["training"]
    assert result["calls"]["residual"] >= 2 and result["same_parameters"], result
    assert result["logits"] <= 1e-5 and result["grads"] <= 1e-4, result


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


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_worker()))
