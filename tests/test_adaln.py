"""Tests for AdaLN's fused modulated LayerNorm (hmar.kernels.adaln): y = LN(x)·(1 + scale) + shift,
alone or after the gated residual x1 = x + h·gamma.

CPU: the kernels run under Triton's interpreter in a subprocess (`tests.interpreter`), forward and
backward, against float64 PyTorch (`F.layer_norm` and the unfused arithmetic, autograd) of the same
rounded inputs and upstream gradients, by ||y − ref|| / ||ref|| for every output and every gradient
(x, h, and gamma, scale, shift separately): outputs bounded by their dtype and x's, gradients by the
least precise dtype of the case; fp32 ≤ 1e-6, fp16 ≤ 2e-3, bf16 ≤ 1e-2 (one rounding of each result,
and of x1 before its statistics when x is half precision; measured fp32 ≤ 1.1e-7, fp16 ~2e-4, bf16
≤ 4e-3). Cases: C not a power of two (48, 80, 96, 160, 1100), partial row tiles, per-sample and shared
(1, 1, C) modulations (views of one (B | 1, 1, 6, C) tensor, as the model's: the unused slots' gradients
stay 0), bf16 x with fp32 modulations and fp32 x with bf16 modulations, non-contiguous x, h and upstream
gradients, an upstream gradient on x1 present and absent, and x1 the only output with a gradient. The custom operators pass
torch.library.opcheck and trace under torch.compile (aot_eager, fullgraph) to eager's outputs and
gradients. Without the interpreter, unsupported inputs raise ValueError.

GPU (marked `gpu`): d16's training shape (B=32, L=680, C=1024, fp32 x, bf16 modulations) forward
and backward against float64, and a function of both operators compiled by Inductor against eager.
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
    # (name, (B, L, C), x dtype, modulation dtype, out dtype, shared modulations, residual,
    #  strided x, h and gradients, an upstream gradient on x1)
    ("fp32-c96-partial-tile", (2, 45, 96), "float32", "float32", "float32", False, True, False, True),
    ("fp32-c80-shared-strided", (3, 21, 80), "float32", "float32", "float32", True, False, True, False),
    ("fp32-c1100-strided", (2, 5, 1100), "float32", "float32", "float32", False, True, True, True),
    ("bf16-x-fp32-mods", (2, 19, 80), "bfloat16", "float32", "bfloat16", False, True, False, False),
    ("fp32-x-bf16-mods-bf16-out", (2, 37, 160), "float32", "bfloat16", "bfloat16", False, True, True, True),
    ("fp32-x-bf16-mods-shared", (3, 40, 96), "float32", "bfloat16", "bfloat16", True, True, False, False),
    ("fp16-shared", (1, 9, 48), "float16", "float16", "float16", True, False, False, False),
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


def _worker() -> dict:
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm

    results = {}
    for name, shape, x_dtype, mod_dtype, out_dtype, shared, residual, strided, upstream in CASES:
        gen = torch.Generator().manual_seed(len(results))
        x, h, mods = _case(shape, getattr(torch, x_dtype), getattr(torch, mod_dtype), shared, residual, strided, gen)
        leaves = [x, mods] + ([h] if residual else [])
        for t in leaves:
            t.requires_grad_()
        gamma, scale, shift = mods.unbind(2)[:3]
        out = getattr(torch, out_dtype)
        if residual:
            x1, y = residual_modulated_layer_norm(x, h, gamma, scale, shift, EPS, out)
        else:
            x1, y = x, modulated_layer_norm(x, scale, shift, EPS, out)
        dy = _strided(torch.randn(shape, generator=gen).to(out), strided)
        dx1 = _strided(torch.randn(shape, generator=gen).to(x.dtype), strided) if upstream else None
        torch.autograd.backward([y] + ([x1] if upstream else []), [dy] + ([dx1] if upstream else []))

        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        x64, mods64, h64 = leaves64 + ([None] if not residual else [])
        gamma64, scale64, shift64 = mods64.unbind(2)[:3]
        x1_ref, y_ref = reference(x64, scale64, shift64, *((h64, gamma64) if residual else ()))
        torch.autograd.backward([y_ref] + ([x1_ref] if upstream else []), [dy.double()] + ([dx1.double()] if upstream else []))
        used = (0, 1, 2) if residual else (1, 2)  # gamma, scale, shift in the (B | 1, 1, 6, C) tensor
        results[name] = {
            "y": _relative(y, y_ref), "x1": _relative(x1, x1_ref),
            "layout": (y.is_contiguous() and y.dtype == out and y.shape == x.shape
                       and (not residual or (x1.is_contiguous() and x1.dtype == x.dtype and x1.shape == x.shape))),
            "dx": _relative(x.grad, x64.grad),
            "dh": _relative(h.grad, h64.grad) if residual else 0.0,
            "dmods": {k: _relative(mods.grad[:, :, k], mods64.grad[:, :, k]) for k in used},
            "unused_mods_zero": all(float(mods.grad[:, :, k].abs().max()) == 0.0 for k in range(6) if k not in used),
            "grad_dtypes": all(t.grad.dtype == t.dtype and t.grad.shape == t.shape for t in leaves),
        }
    results["x1_only"] = _x1_only_worker()
    results["compiled"] = _compiled_worker()
    results["opcheck"] = _opcheck_worker()
    return results


def _x1_only_worker() -> dict:
    """residual_modulated_layer_norm's backward when only x1 takes a gradient (y unused), and x not
    requiring one."""
    from hmar.kernels.adaln import residual_modulated_layer_norm

    gen = torch.Generator().manual_seed(5)
    x, h, mods = _case((2, 7, 80), torch.float32, torch.float32, False, True, False, gen)
    h.requires_grad_(), mods.requires_grad_()
    gamma, scale, shift = mods.unbind(2)[:3]
    x1, _ = residual_modulated_layer_norm(x, h, gamma, scale, shift, EPS)
    dx1 = torch.randn(x1.shape, generator=gen)
    x1.backward(dx1)
    expected = (dx1 * h.detach()).sum(1)
    return {"dh": _relative(h.grad, (dx1 * gamma.detach()).double()), "dgamma": _relative(mods.grad[:, 0, 0], expected.double()),
            "others_zero": float(mods.grad[:, :, 1:].abs().max()) == 0.0, "x_grad": x.grad is None}


def _block(x, h, mods):
    """Both operators as an AdaLN block uses them (the branches left out)."""
    from hmar.kernels.adaln import modulated_layer_norm, residual_modulated_layer_norm

    gamma, scale1, shift1, scale2, shift2, _ = mods.unbind(2)
    y1 = modulated_layer_norm(x, scale1, shift1, EPS, torch.bfloat16)
    x1, y2 = residual_modulated_layer_norm(x, h, gamma, scale2, shift2, EPS, torch.bfloat16)
    return y1, x1, y2


def _compiled_and_eager(x, h, mods, backend):
    """Outputs and gradients of `_block`, compiled with `backend` and eager."""
    torch._dynamo.reset()
    compiled = torch.compile(_block, backend=backend, fullgraph=True)
    runs = []
    for function in (compiled, _block):
        leaves = [t.detach().clone().requires_grad_() for t in (x, h, mods)]
        outputs = function(*leaves)
        gen = torch.Generator(x.device).manual_seed(3)
        torch.autograd.backward(outputs, [torch.randn(t.shape, device=t.device, generator=gen).to(t.dtype) for t in outputs])
        runs.append([t.detach() for t in outputs] + [t.grad for t in leaves])
    return runs


def _compiled_worker() -> dict:
    """torch.compile's trace (aot_eager: the fake implementations, the graph and the backward's, without
    Inductor's code generation) against eager."""
    gen = torch.Generator().manual_seed(7)
    x, h, mods = _case((2, 11, 80), torch.float32, torch.bfloat16, False, True, False, gen)
    traced, eager = _compiled_and_eager(x, h, mods, "aot_eager")
    return {"max_difference": max(float((a.double() - b.double()).abs().max()) for a, b in zip(traced, eager))}


def _opcheck_worker() -> dict:
    """torch.library.opcheck of both forward operators (schema, fake tensors, autograd, AOT dispatch)."""
    import hmar.kernels.adaln  # noqa: F401  (registers the operators)

    gen = torch.Generator().manual_seed(8)
    x, h, mods = _case((2, 5, 80), torch.float32, torch.bfloat16, False, True, True, gen)
    x, h, mods = x.requires_grad_(), h.requires_grad_(), mods.requires_grad_()
    gamma, scale, shift = mods.unbind(2)[:3]
    ops = torch.ops.hmar
    return {
        "residual": torch.library.opcheck(ops.residual_modulated_layer_norm_fwd.default,
                                          (x, h, gamma, scale, shift, EPS, torch.bfloat16)),
        "plain": torch.library.opcheck(ops.modulated_layer_norm_fwd.default, (x, scale[:1], shift, EPS, torch.float32)),
    }


# fixture -> worker flag: conftest has the session's interpreter process run it ahead
INTERPRETER_WORKERS = {"interpreted": "--interpret-worker"}


@pytest.fixture(scope="module")
def interpreted():
    from tests.interpreter import run_interpreted

    return run_interpreted(__file__, INTERPRETER_WORKERS["interpreted"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreter_matches_float64(interpreted, case):
    result, (x_dtype, mod_dtype, out_dtype) = interpreted[case[0]], case[2:5]
    assert result["layout"] and result["grad_dtypes"] and result["unused_mods_zero"], result
    assert result["y"] <= bound(x_dtype, out_dtype) and result["x1"] <= bound(x_dtype), result
    worst = bound(x_dtype, mod_dtype, out_dtype)
    assert max(result["dx"], result["dh"], *result["dmods"].values()) <= worst, result


def test_interpreter_gradient_from_x1_alone(interpreted):
    result = interpreted["x1_only"]
    assert result["dh"] <= 1e-6 and result["dgamma"] <= 1e-6 and result["others_zero"] and result["x_grad"], result


def test_interpreter_compiled_matches_eager(interpreted):
    assert interpreted["compiled"]["max_difference"] == 0.0, interpreted["compiled"]


def test_interpreter_opcheck(interpreted):
    for checks in interpreted["opcheck"].values():
        assert all(v == "SUCCESS" for v in checks.values()), interpreted["opcheck"]


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
    from hmar.kernels import devices

    monkeypatch.setattr(devices, "INTERPRETING", True)  # past the device check; nothing is launched
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
    """d16's shape: fp32 x, bf16 h, modulations and outputs, an upstream gradient on x1; float32 results
    within 1e-5 (GPU square roots and divisions are approximate), bf16 ones within 1e-2."""
    x, h, mods = _gpu_inputs()
    leaves = [t.requires_grad_() for t in (x, h, mods)]
    outputs = _block(*leaves)  # y1, x1, y2
    assert all(bool(torch.isfinite(t).all()) for t in outputs)  # (written into uninitialised memory)
    gen = torch.Generator("cuda").manual_seed(1)
    grads = [torch.randn(t.shape, device="cuda", generator=gen).to(t.dtype) for t in outputs]
    torch.autograd.backward(outputs, grads)
    assert all(bool(torch.isfinite(t.grad).all()) for t in leaves)

    x64, h64, mods64 = (t.detach().double().requires_grad_() for t in leaves)
    g64, s1, t1, s2, t2, _ = mods64.unbind(2)
    _, y1_ref = reference(x64, s1, t1)
    x1_ref, y2_ref = reference(x64, s2, t2, h64, g64)
    torch.autograd.backward([y1_ref, x1_ref, y2_ref], [g.double() for g in grads])
    y1, x1, y2 = outputs
    assert _relative(y1, y1_ref) <= BOUNDS["bfloat16"] and _relative(y2, y2_ref) <= BOUNDS["bfloat16"]
    assert _relative(x1, x1_ref) <= 1e-5 and _relative(x.grad, x64.grad) <= 1e-5
    assert _relative(h.grad, h64.grad) <= BOUNDS["bfloat16"]
    for k in range(5):  # gamma, scale1, shift1, scale2, shift2
        assert _relative(mods.grad[:, :, k], mods64.grad[:, :, k]) <= BOUNDS["bfloat16"], k
    assert float(mods.grad[:, :, 5].abs().max()) == 0.0


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_matches_eager():
    """Inductor around the operators: the same outputs; gradients within 1e-3 (Inductor sums the
    partial sums in its own order before the bf16 rounding)."""
    x, h, mods = _gpu_inputs(B=4, L=100, C=1024)
    compiled, eager = _compiled_and_eager(x, h, mods, "inductor")
    for a, b in zip(compiled[:3], eager[:3]):
        assert torch.equal(a, b)
    for a, b in zip(compiled[3:], eager[3:]):
        assert _relative(a, b.double()) <= 1e-3


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_worker()))
