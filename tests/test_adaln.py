"""Tests for AdaLN's fused modulated LayerNorm (hmar.kernels.adaln): y = LN(x)·(1 + scale) + shift,
alone or after the gated residual x1 = x + h·gamma.

CPU: the kernels run under Triton's interpreter in a subprocess (`tests.interpreter`) against float64
PyTorch (`F.layer_norm` and the unfused arithmetic) of the same rounded inputs, by ||y − ref|| / ||ref||
for every output: bounds by the least precise dtype a case involves, fp32 ≤ 1e-6, fp16 ≤ 2e-3, bf16 ≤
1e-2 (one rounding of each output, and of x1 before its statistics when x is half precision;
measured fp32 ~7e-8, fp16 ~2e-4, bf16 ~4e-3). Cases:
C not a power of two (80, 96, 160, 1100), partial row tiles, per-sample and shared (1, 1, C)
modulations (views of one (B, 1, 6, C) tensor, as the model's), bf16 x with fp32 modulations and fp32
x with bf16 modulations, non-contiguous x and h. The custom operators trace under torch.compile
(aot_eager, fullgraph) and match eager. Without the interpreter, unsupported inputs raise ValueError.

GPU (marked `gpu`): d16's training shape (B=32, L=680, C=1024, fp32 x, bf16 modulations) against
float64, and a function of both operators compiled by Inductor against eager.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

EPS = 1e-6
BOUNDS = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1e-2}
CASES = [
    # (name, (B, L, C), x dtype, modulation dtype, out dtype, shared modulations, residual, strided x and h)
    ("fp32-c96-partial-tile", (2, 45, 96), "float32", "float32", "float32", False, True, False),
    ("fp32-c80-shared-strided", (3, 21, 80), "float32", "float32", "float32", True, False, True),
    ("fp32-c1100-strided", (2, 5, 1100), "float32", "float32", "float32", False, True, True),
    ("bf16-x-fp32-mods", (2, 19, 80), "bfloat16", "float32", "bfloat16", False, True, False),
    ("fp32-x-bf16-mods-bf16-out", (2, 37, 160), "float32", "bfloat16", "bfloat16", False, True, True),
    ("fp16-shared", (1, 9, 48), "float16", "float16", "float16", True, False, False),
]


def bound(*dtypes: str) -> float:
    return max(BOUNDS[d] for d in dtypes)


def reference(x, scale, shift, h=None, gamma=None):
    """The unfused computation (as `hmar.transformer.AdaLNBlock` runs it without the kernel)."""
    x1 = x if h is None else x + h * gamma
    return x1, F.layer_norm(x1, x1.shape[-1:], eps=EPS) * (1 + scale) + shift


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm())


def _strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """t itself, or an equal tensor whose batch and row strides are not the contiguous ones."""
    if not strided:
        return t
    B, L, C = t.shape
    padded = torch.zeros(L, B, C + 7, dtype=t.dtype)
    padded[..., :C] = t.transpose(0, 1)
    return padded[..., :C].transpose(0, 1)  # rows 7 elements apart beyond C, batches one row apart


def _case(shape, x_dtype, mod_dtype, shared, residual, strided, gen):
    """Inputs rounded to their dtypes: x, h and the modulations as views of one (B | 1, 1, 6, C) tensor."""
    B, L, C = shape
    x = _strided((torch.randn(B, L, C, generator=gen, dtype=torch.float64) * 2 + 0.5).to(x_dtype), strided)
    h = _strided(torch.randn(B, L, C, generator=gen, dtype=torch.float64).to(x_dtype), strided) if residual else None
    mods = (torch.randn(1 if shared else B, 1, 6, C, generator=gen, dtype=torch.float64) * 0.5).to(mod_dtype)
    return x, h, mods


def _forward_worker() -> dict:
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm

    results = {}
    for name, shape, x_dtype, mod_dtype, out_dtype, shared, residual, strided in CASES:
        gen = torch.Generator().manual_seed(len(results))
        x, h, mods = _case(shape, getattr(torch, x_dtype), getattr(torch, mod_dtype), shared, residual, strided, gen)
        gamma, scale, shift = mods.unbind(2)[:3]
        out = getattr(torch, out_dtype)
        if residual:
            x1, y = residual_modulated_layer_norm(x, h, gamma, scale, shift, EPS, out)
        else:
            x1, y = x, modulated_layer_norm(x, scale, shift, EPS, out)
        x1_ref, y_ref = reference(*(t.double() for t in (x, scale, shift) + ((h, gamma) if residual else ())))
        results[name] = {
            "y": _relative(y, y_ref), "x1": _relative(x1, x1_ref),
            "layout": (y.is_contiguous() and y.dtype == out and y.shape == x.shape
                       and (not residual or (x1.is_contiguous() and x1.dtype == x.dtype and x1.shape == x.shape))),
        }
    results["compiled"] = _compiled_worker()
    return results


def _compiled_worker() -> dict:
    """Both operators in one function traced by torch.compile (aot_eager: the fake implementations and
    the graph, without Inductor's code generation) against eager."""
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm

    def block(x, h, mods):
        gamma, scale1, shift1, scale2, shift2, _ = mods.unbind(2)
        y1 = modulated_layer_norm(x, scale1, shift1, EPS, torch.bfloat16)
        x1, y2 = residual_modulated_layer_norm(x, h, gamma, scale2, shift2, EPS, torch.bfloat16)
        return y1, x1, y2

    gen = torch.Generator().manual_seed(7)
    x, h, mods = _case((2, 11, 80), torch.float32, torch.bfloat16, False, True, False, gen)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    eager, traced = block(x, h, mods), compiled(x, h, mods)
    return {"outputs": max(_relative(a, b.double()) for a, b in zip(traced, eager))}


@pytest.fixture(scope="module")
def interpreted():
    from tests.interpreter import run_interpreted

    return run_interpreted(__file__, "--interpret-worker")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreter_forward_matches_float64(interpreted, case):
    result, (x_dtype, _, out_dtype) = interpreted[case[0]], case[2:5]
    assert result["layout"], result
    assert result["y"] <= bound(x_dtype, out_dtype) and result["x1"] <= bound(x_dtype), result


def test_interpreter_compiled_matches_eager(interpreted):
    assert interpreted["compiled"]["outputs"] == 0.0, interpreted["compiled"]


def test_unsupported_inputs_raise():
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm, supports

    x, mod = torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    assert not supports(x, mod, mod)  # the CPU without the interpreter
    with pytest.raises(ValueError, match=r"modulated_layer_norm: x is on cpu: needs CUDA"):
        modulated_layer_norm(x, mod, mod, EPS)
    with pytest.raises(ValueError, match=r"residual_modulated_layer_norm: x is on cpu"):
        residual_modulated_layer_norm(x, x, mod, mod, mod, EPS)


def test_unsupported_shapes_and_dtypes_raise(monkeypatch):
    import hmar.kernels.adaln as adaln

    monkeypatch.setattr(adaln, "_INTERPRET", True)  # past the device check; nothing is launched
    x, mod = torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    assert adaln.supports(x, mod, mod) and adaln.supports(x, mod[:1], mod[0, 0], x, mod)
    bad = [
        ((x[0], mod, mod), {}, r"x must be \(B, L, C\)"),
        ((torch.randn(1, 2, 4097), torch.randn(1, 1, 4097), torch.randn(1, 1, 4097)), {}, r"x must be \(B, L, C\) with C ≤ 4096"),
        ((x.double(), mod, mod), {}, r"x is torch.float64; supported: float16, bfloat16, float32"),
        ((x, mod.int(), mod), {}, r"scale is torch.int32"),
        ((x, mod, torch.randn(2, 8)), {}, r"shift has shape \(2, 8\): needs \(2, 1, 8\) or \(1, 1, 8\)"),
        ((x, torch.randn(3, 1, 8), mod), {}, r"scale has shape \(3, 1, 8\)"),
        ((x, torch.randn(2, 1, 7), mod), {}, r"scale has shape"),
        ((x, mod, mod), {"out_dtype": torch.float64}, r"out_dtype torch.float64"),
    ]
    for args, kwargs, message in bad:
        with pytest.raises(ValueError, match="modulated_layer_norm: " + message):
            adaln.modulated_layer_norm(*args, EPS, **kwargs)
    with pytest.raises(ValueError, match=r"residual_modulated_layer_norm: h has shape \(2, 4, 7\)"):
        adaln.residual_modulated_layer_norm(x, torch.randn(2, 4, 7), mod, mod, mod, EPS)
    with pytest.raises(ValueError, match=r"residual_modulated_layer_norm: gamma has shape \(2, 4, 8\)"):
        adaln.residual_modulated_layer_norm(x, x, x, mod, mod, EPS)


# ------------------------------------------------------------------ GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_inputs(B=32, L=680, C=1024):
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(B, L, C, device="cuda", generator=gen) * 2 + 0.5
    h = torch.randn(B, L, C, device="cuda", generator=gen).bfloat16()
    mods = (torch.randn(B, 1, 6, C, device="cuda", generator=gen) * 0.5).bfloat16()
    return x, h, mods


@pytest.mark.gpu
@needs_cuda
def test_gpu_d16_training_shape():
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm

    x, h, mods = _gpu_inputs()
    gamma, scale1, shift1, scale2, shift2, _ = mods.unbind(2)
    y1 = modulated_layer_norm(x, scale1, shift1, EPS, torch.bfloat16)
    x1, y2 = residual_modulated_layer_norm(x, h, gamma, scale2, shift2, EPS, torch.bfloat16)
    assert all(bool(torch.isfinite(t).all()) for t in (y1, x1, y2))  # (written into uninitialised memory)
    x64, h64, mods64 = x.double(), h.double(), mods.double()
    g64, s1, t1, s2, t2, _ = mods64.unbind(2)
    _, y1_ref = reference(x64, s1, t1)
    x1_ref, y2_ref = reference(x64, s2, t2, h64, g64)
    assert _relative(y1, y1_ref) <= BOUNDS["bfloat16"] and _relative(y2, y2_ref) <= BOUNDS["bfloat16"]
    assert _relative(x1, x1_ref) <= BOUNDS["float32"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_matches_eager():
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm

    def block(x, h, mods):
        gamma, scale1, shift1, scale2, shift2, _ = mods.unbind(2)
        y1 = modulated_layer_norm(x, scale1, shift1, EPS, torch.bfloat16)
        x1, y2 = residual_modulated_layer_norm(x, h, gamma, scale2, shift2, EPS, torch.bfloat16)
        return y1, x1, y2

    x, h, mods = _gpu_inputs(B=4, L=100, C=1024)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    for a, b in zip(compiled(x, h, mods), block(x, h, mods)):
        assert torch.equal(a, b)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_forward_worker()))
