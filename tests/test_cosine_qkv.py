"""Tests for cosine attention's fused inputs (hmar.kernels.cosine_qkv): q, k, v split from a QKV
projection, q and k unit-normalised, q times its head's clamped temperature; forward and backward.

CPU: the kernels run under Triton's interpreter in a subprocess (`tests.interpreter`) against float64
PyTorch (`F.normalize`, `clamp_max`, `exp`) of the same rounded inputs, by ||y − ref|| / ||ref|| for
q, k, v and the projection's gradient: fp32 ≤ 1e-6, fp16 ≤ 2e-3, bf16 ≤ 1e-2 (one rounding of each
output: ~5e-8 / ~2e-4 / ~3e-3 measured); the temperatures' gradients (float32 sums) ≤ 1e-5 relative.
Shapes with partial row tiles, a strided projection (a view with padding between rows), transposed
upstream gradients, one head's temperature above the clamp (its gradient must be 0) and, in float32, a
zero row (F.normalize's eps branch). A tiny transformer's training step takes the kernel and gives the
reference path's logits and gradients.

GPU (marked `gpu`): d16's training shape in bf16 against float64, and compiled blocks with the kernel
against compiled blocks without it.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

MAX_LOG = math.log(100.0)
BOUNDS = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}
CASES = [
    # (name, (B, L, H, D), dtype, strided projection, transposed gradients, zero row)
    ("fp32-partial-tile", (2, 45, 3, 64), "float32", False, False, False),
    ("fp32-strided-zero-row", (2, 33, 3, 16), "float32", True, True, True),
    ("fp16-d32", (1, 70, 3, 32), "float16", True, False, False),
    ("bf16-d128", (2, 40, 3, 128), "bfloat16", False, True, False),
]


def reference(qkv: torch.Tensor, log_scale: torch.Tensor):
    """The unfused computation (as `hmar.transformer.SelfAttention` runs it without the kernel)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    temperature = log_scale.reshape(1, -1, 1, 1).clamp_max(MAX_LOG).exp()
    return F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1), v


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm())


def _case(shape, dtype, strided, transposed, zero_row, gen):
    B, L, H, D = shape
    width = 3 * H * D + (8 if strided else 0)  # strided: the projection is a view with gaps between rows
    qkv = torch.randn(B, L, width, generator=gen, dtype=torch.float64)[..., :3 * H * D].to(dtype).view(B, L, 3, H, D)
    if zero_row:
        qkv[0, 3, 0, 1].zero_()
        qkv[1, 5, 1, 0].zero_()
    log_scale = torch.linspace(0.5, 5.0, H).view(1, H, 1, 1)  # the last head above log(100): clamped
    grads = [torch.randn(B, L, H, D, generator=gen).to(dtype) for _ in range(3)]
    grads = [g.transpose(1, 2) if transposed else g.transpose(1, 2).contiguous() for g in grads]  # (B, H, L, D)
    return qkv, log_scale, grads


def _worker() -> dict:
    from hmar.kernels.cosine_qkv import cosine_qkv

    results = {}
    for name, shape, dtype_name, strided, transposed, zero_row in CASES:
        gen = torch.Generator().manual_seed(len(results))
        qkv, log_scale, grads = _case(shape, getattr(torch, dtype_name), strided, transposed, zero_row, gen)
        qkv.requires_grad_(), log_scale.requires_grad_()
        outputs = cosine_qkv(qkv, log_scale, MAX_LOG)
        torch.autograd.backward(outputs, grads)
        qkv64 = qkv.detach().double().requires_grad_()
        log64 = log_scale.detach().double().requires_grad_()
        expected = reference(qkv64, log64)
        torch.autograd.backward(expected, [g.double() for g in grads])
        clamped = log_scale.grad.flatten()[-1]
        results[name] = {
            "outputs": [_relative(y, e) for y, e in zip(outputs, expected)],
            "contiguous": all(y.is_contiguous() and y.dtype == qkv.dtype and y.shape == e.shape for y, e in zip(outputs, expected)),
            "dqkv": _relative(qkv.grad, qkv64.grad),
            "dlog_scale": _relative(log_scale.grad.flatten()[:-1], log64.grad.flatten()[:-1]),
            "clamped_head_grad": float(clamped),
        }
    results["training_step"] = _training_step_worker()
    return results


def _training_step_worker() -> dict:
    """A tiny HMAR's next-scale logits and every parameter's gradient, with the kernel and without."""
    from unittest import mock

    import hmar.transformer
    from hmar.pipeline import Pipeline
    from hmar.config import ModelConfig
    from hmar.policy import KernelPolicy
    from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

    pipe = Pipeline.random(ModelConfig(tiny_tokenizer_config(), tiny_transformer_config()), device="cpu", seed=0)
    model = pipe.transformer.train()
    labels = torch.tensor([1, 3])
    teacher = torch.randn(2, sum(model.block_sizes[1:]), pipe.tokenizer.config.z_channels, generator=torch.Generator().manual_seed(1))
    calls = []
    original = hmar.transformer._cosine_qkv

    def counted(*args):
        kernel = original(*args)
        calls.append(kernel is not None)
        return kernel

    def run(policy):
        model.zero_grad()
        model.set_policy(policy)
        with mock.patch.object(hmar.transformer, "_cosine_qkv", counted):
            logits = model.forward_next_scale(labels, teacher)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run(KernelPolicy(fused_cosine_qkv=True))
    used, asked = bool(calls) and all(calls), len(calls)
    plain, plain_grads = run(KernelPolicy.reference())
    used = used and len(calls) == asked  # the reference policy never asks for the kernel
    return {"used_kernel": used, "logits": _relative(fused, plain.double()),
            "grads": {n: _relative(fused_grads[n], plain_grads[n].double()) for n in plain_grads if plain_grads[n].norm() > 0},
            "same_parameters": sorted(fused_grads) == sorted(plain_grads)}


# fixture -> worker flag: conftest has the session's interpreter process run it ahead
INTERPRETER_WORKERS = {"interpreted": "--interpret-worker"}


@pytest.fixture(scope="module")
def interpreted():
    from tests.interpreter import run_interpreted

    return run_interpreted(__file__, INTERPRETER_WORKERS["interpreted"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreter_matches_float64(interpreted, case):
    result, bound = interpreted[case[0]], BOUNDS[case[2]]
    assert result["contiguous"], result
    assert max(result["outputs"]) <= bound and result["dqkv"] <= bound, result
    assert result["dlog_scale"] <= 1e-5 and result["clamped_head_grad"] == 0.0, result


def test_interpreter_training_step_takes_the_kernel_and_matches(interpreted):
    result = interpreted["training_step"]
    assert result["used_kernel"] and result["same_parameters"], result
    assert result["logits"] <= 1e-5, result
    assert max(result["grads"].values()) <= 1e-4, result


def test_unsupported_inputs_raise_and_the_model_falls_back():
    from hmar.kernels.cosine_qkv import cosine_qkv, supports
    from hmar.transformer import _cosine_qkv

    qkv, log_scale = torch.randn(1, 4, 3, 2, 16, requires_grad=True), torch.zeros(1, 2, 1, 1, requires_grad=True)
    assert not supports(qkv, log_scale)  # the CPU without the interpreter
    assert _cosine_qkv(qkv, log_scale) is None
    with pytest.raises(ValueError, match=r"cosine_qkv: needs a \(B, L, 3, H, D\)"):
        cosine_qkv(qkv, log_scale, MAX_LOG)


# ------------------------------------------------------------------ GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_gpu_d16_training_shape_bf16():
    from hmar.kernels.cosine_qkv import cosine_qkv

    gen = torch.Generator("cuda").manual_seed(0)
    B, L, H, D = 32, 680, 16, 64
    qkv = torch.randn(B, L, 3 * H * D, device="cuda", generator=gen).bfloat16().view(B, L, 3, H, D).requires_grad_()
    log_scale = torch.linspace(0.5, 5.0, H, device="cuda").view(1, H, 1, 1).requires_grad_()
    grads = [torch.randn(B, H, L, D, device="cuda", generator=gen).bfloat16() for _ in range(3)]
    outputs = cosine_qkv(qkv, log_scale, MAX_LOG)
    assert all(bool(torch.isfinite(y).all()) for y in outputs)  # (written into uninitialised memory)
    torch.autograd.backward(outputs, grads)
    qkv64, log64 = qkv.detach().double().requires_grad_(), log_scale.detach().double().requires_grad_()
    expected = reference(qkv64, log64)
    torch.autograd.backward(expected, [g.double() for g in grads])
    assert max(_relative(y, e) for y, e in zip(outputs, expected)) <= BOUNDS["bfloat16"]
    assert _relative(qkv.grad, qkv64.grad) <= BOUNDS["bfloat16"]
    assert _relative(log_scale.grad.flatten()[:-1], log64.grad.flatten()[:-1]) <= 1e-4
    assert float(log_scale.grad.flatten()[-1]) == 0.0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["hmar", "var"])
def test_gpu_compiled_blocks_with_the_kernel_train_like_without(family):
    from hmar.attention import block_sparse_kernel
    from hmar.compile import compile_blocks
    from hmar.config import ModelConfig, TransformerConfig, tokenizer_preset
    from hmar.pipeline import Pipeline
    from hmar.policy import KernelPolicy

    config = ModelConfig(tokenizer_preset(256), TransformerConfig(family=family, depth=4, width=256, num_heads=4, branch_depth=1))
    gen = torch.Generator("cuda").manual_seed(0)
    labels = torch.randint(0, 1000, (8,), device="cuda", generator=gen)

    def run(fused_qkv: bool):
        pipe = Pipeline.random(config, device="cuda", seed=0)  # the same weights each time
        model = pipe.transformer.train()
        model.set_policy(KernelPolicy(fused_cosine_qkv=fused_qkv))
        compile_blocks(model)
        teacher = torch.randn(8, sum(model.block_sizes[1:]), pipe.tokenizer.config.z_channels, device="cuda",
                              generator=torch.Generator("cuda").manual_seed(1))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.forward_next_scale(labels, teacher, block_sparse_kernel)
            logits.float().square().mean().backward()
        return logits.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run(True)
    plain, plain_grads = run(False)
    assert _relative(fused, plain.double()) <= 2e-2
    assert sorted(fused_grads) == sorted(plain_grads)
    worst = max(_relative(fused_grads[n], plain_grads[n].double()) for n in plain_grads if plain_grads[n].norm() > 0)
    assert worst <= 5e-2, worst


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_worker()))
