"""Tests for the Triton block-sparse attention (hmar.kernels).

CPU: the real kernel code runs under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess (the
variable must be set before Triton decorates the kernels), on small shapes with uneven blocks (blocks
of 1 token, blocks larger than the 16-row tile, packed small blocks), both patterns. Forward and all
three gradients are compared with a float64 masked-softmax reference computed on the same (rounded)
inputs, by ||x - ref|| / ||ref||. Bounds: fp32 1e-5, fp16 2e-3, bf16 1.5e-2 (bf16 rounds the output,
P and dS to 8 bits; measured about 4e-3 / 8e-3 at these sizes). Two cases pin an explicit forward
configuration (32-key tiles) through the autograd wrapper; three call the wrapper a second time, which
repeats the launches its first call kept. Every output buffer is filled with NaN
before the kernel runs, and must come back finite. The "late-spike" cases give one query a key, past the
forward's first key tile, that outscores that tile's maximum by far: the forward's fixed softmax
reference overflows there, and the tile must be recomputed with a running maximum.

torch.compile (the kernels are custom operators, `torch.ops.hmar.block_sparse_attn_fwd/_bwd`): in a
second interpreter subprocess, a function that L2-normalises q and k around the kernel (as the
attention layers do) compiles with backend="aot_eager" and fullgraph=True (so: no graph break), once
per block sizes, and its output and gradients equal the eager ones (fp32: rel. error <= 1e-6, bf16
under autocast: <= 4e-3, about one bf16 rounding) and the float64 reference (the bounds above); a tiny
model's transformer blocks with the kernel compile whole (fullgraph) and give the eager logits and
gradients; `torch.library.opcheck` passes for both operators; the fake implementations give the
eager layouts.

The eager wrapper's plans, with the three kernels stubbed (CPU, no interpreter): a second call with
the same inputs' key runs no checks and launches the kept binaries with its own tensors and the first
call's other arguments; inputs unlike a known call are checked (the same errors); tensor block sizes
or scales, unaligned inputs and each layout of the incoming gradient take their own paths; calls
without grad record no graph.

GPU (marked `gpu`, skipped without CUDA): the issue's real sizes (256/512/1024 px patch_nums), bf16,
rel. error <= 3e-3 against float32 SDPA on upcast inputs; every dtype and head dim; strided inputs;
autocast; the eager wrapper called again and again (kept launches, unaligned inputs, a negative scale,
two gradient layouts) against float32; the autotuned path; compiled with Inductor (fullgraph, default configs and autotuned) against
eager, the operators called from Inductor's code; opcheck on CUDA; regionally
compiled model blocks with the kernel: no graph break, eager logits and gradients.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import zlib
from unittest import mock

import pytest
import torch

from hmar.kernels.scales import PATCH_NUMS

BOUNDS_CPU = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}
GPU_REAL_BOUND = 3e-3
BOUNDS_GPU = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

CPU_SIZES = [1, 4, 9, 20, 3, 37, 1]  # N = 75: tile 16 sees 1-token blocks, packed blocks, a 37-token block
CPU_CASES = [
    # (name, dtype, head_dim, sizes, pattern, scale, layout)
    *[(f"{p}-{dt}", dt, 16, CPU_SIZES, p, 0.7, "contiguous")
      for p in ("block_diagonal", "block_causal") for dt in ("float32", "bfloat16", "float16")],
    ("diag-d32-strided-scale1", "float32", 32, [5, 1, 40, 2], "block_diagonal", 1.0, "bnhd"),
    ("causal-d32-strided-default-scale", "float16", 32, [5, 1, 40, 2], "block_causal", None, "bnhd"),
    ("diag-one-block", "float32", 16, [33], "block_diagonal", None, "contiguous"),
    ("causal-all-ones", "float32", 16, [1] * 19, "block_causal", 2.0, "contiguous"),
    ("diag-key-tile-32-bf16", "bfloat16", 16, [3, 70, 2, 40], "block_diagonal", None, "contiguous"),
    ("causal-key-tile-32-fp32", "float32", 16, [3, 70, 2, 40], "block_causal", 0.5, "contiguous"),
    # key 40 (a frozen-reference key tile of the forward) scores far above the first key tile's maximum
    # for query 3: by tens (log2 units; past the 2**32 check: the tile is redone with a running maximum)
    # and by hundreds (2**x overflows: likewise); without the check the output is NaN
    *[(f"{p}-late-spike-x{f}", "float32", 16, [70, 6], p, 0.7, f"spike{f}")
      for p in ("block_diagonal", "block_causal") for f in (2, 12)],
]
# forward configuration per case (row tile, key tile, warps, stages); default: the interpreter's (16, 16, 1, 1)
CPU_FWD_CONFIG = {name: (16, 32, 1, 1) for name in ("diag-key-tile-32-bf16", "causal-key-tile-32-fp32")}
# cases whose autograd wrapper is called twice: the second call repeats the launches the first kept
# (one forward in each mode)
CPU_KEPT = {"block_causal-bfloat16", "causal-d32-strided-default-scale", "diag-d32-strided-scale1"}
# cases whose forward takes the fixed softmax reference (and its redo launch), which real sizes take
# where a query sees FROZEN_MIN_KEYS keys or more; the others keep a running maximum throughout
CPU_FROZEN = {"block_diagonal-float32", "block_causal-bfloat16", "block_diagonal-float16", "diag-one-block",
              "causal-key-tile-32-fp32", "causal-d32-strided-default-scale", *(c[0] for c in CPU_CASES if "spike" in c[0])}


# ------------------------------------------------------------------ interpreter worker (subprocess)

def _make(shape, dtype, layout, gen):
    B, H, N, D = shape
    if layout == "bnhd":  # (B, N, H, D) memory seen as (B, H, N, D): strided, as an attention layer makes it
        return torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)
    return torch.randn(B, H, N, D, generator=gen).to(dtype)


def _worker(cases):
    import importlib

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    from hmar.kernels.block_sparse_attention import block_sparse_attention
    from hmar.kernels.reference import reference_attention

    results = {}
    frozen_min_keys = bsa.FROZEN_MIN_KEYS
    # restored afterwards: the process may run other workers next
    with mock.patch.object(bsa, "FROZEN_MIN_KEYS", frozen_min_keys):
        for name, dtype_name, D, sizes, pattern, scale, layout in cases:
            bsa.FROZEN_MIN_KEYS = 0 if name in CPU_FROZEN else frozen_min_keys
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            shape = (2, 3, sum(sizes), D)
            q, k, v = (_make(shape, dtype, layout, gen) for _ in range(3))
            if layout.startswith("spike"):  # key 40 aligned with query 3, scaled
                k[:, :, 40] = float(layout[len("spike"):]) * q[:, :, 3]
            do = _make(shape, dtype, "contiguous", gen)
            qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = reference_attention(qr, kr, vr, sizes, pattern, scale)
            ref.backward(do.double())
            sc = D ** -0.5 if scale is None else scale
            layout_ = bsa.get_layout(sizes, pattern, q.device)
            nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
            out, lse = bsa.attention_forward(q, k, v, layout_, sc, out=nan(q), lse=torch.full((shape[0] * shape[1], shape[2]), float("nan")),
                                             config=CPU_FWD_CONFIG.get(name))
            dq, dk, dv = bsa.attention_backward(do, q, k, v, out, lse, layout_, sc, dq=nan(q), dk=nan(k), dv=nan(v))
            err = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
            res = {"finite": bool(all(torch.isfinite(t).all() for t in (out, lse, dq, dk, dv))),
                   "out": err(out, ref), "dq": err(dq, qr.grad), "dk": err(dk, kr.grad), "dv": err(dv, vr.grad)}
            # the autograd wrapper computes the same thing; called again (CPU_KEPT), it repeats the launches
            # its first call kept, with the new call's tensors
            configs = {"fwd": CPU_FWD_CONFIG[name]} if name in CPU_FWD_CONFIG else None
            for key in ("autograd_same", "kept_same")[:1 + (name in CPU_KEPT)]:
                q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
                o2 = block_sparse_attention(q2, k2, v2, sizes, pattern, scale, _configs=configs)
                o2.backward(do)
                res[key] = bool(torch.equal(o2, out) and torch.equal(q2.grad, dq) and torch.equal(k2.grad, dk)
                                and torch.equal(v2.grad, dv))
            results[name] = res
    return results


# fixture -> worker flag: conftest has the session's interpreter process run them ahead
INTERPRETER_WORKERS = {"interpreted": "--interpret-worker", "compiled": "--compile-worker"}


def _interpreter_worker(fixture: str) -> dict:
    from tests.interpreter import run_interpreted  # not at the top: this file also runs as the worker script

    return run_interpreted(__file__, INTERPRETER_WORKERS[fixture])


@pytest.fixture(scope="module")
def interpreted():
    return _interpreter_worker("interpreted")


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_interpreter_matches_float64_reference(interpreted, case):
    name, dtype_name = case[0], case[1]
    res = interpreted[name]
    assert res["finite"], f"{name}: a poisoned output element was not written"
    bound = BOUNDS_CPU[dtype_name]
    for key in ("out", "dq", "dk", "dv"):
        assert res[key] <= bound, f"{name}: {key} rel. error {res[key]:.2e} > {bound:.0e}"
    assert res["autograd_same"], f"{name}: autograd wrapper differs from the direct kernel calls"
    if name in CPU_KEPT:
        assert res["kept_same"], f"{name}: the wrapper's second call (kept launches) differs"


# ------------------------------------------------------------------ torch.compile (interpreter worker)

COMPILE_SIZES = [1, 4, 9, 20, 3]  # N = 37
COMPILE_CASES = [
    # (name, pattern, autocast dtype or None)
    ("causal-fp32", "block_causal", None),
    ("diag-bf16-autocast", "block_diagonal", "bfloat16"),
]
COMPILED_VS_EAGER = {None: 1e-6, "bfloat16": 4e-3}


def _qk_norm_attention(qkv, temperature, sizes, pattern, attention=None):
    """What an attention layer does around the kernel: split a fused qkv projection (strided views),
    L2-normalise q (times a per-head temperature) and k, attend, heads back into channels."""
    from hmar.attention import block_sparse_kernel

    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.nn.functional.normalize(q, dim=-1).mul(temperature).to(v.dtype)
    k = torch.nn.functional.normalize(k, dim=-1).to(v.dtype)
    out = (attention or block_sparse_kernel)(q, k, v, sizes, pattern, 1.0)
    return out.transpose(1, 2).reshape(B, N, H * D)


def _compile_worker():
    import importlib

    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import make_boxed_func

    from hmar.kernels.reference import reference_attention

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    err = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    results = {}

    def run(fn, qkv, temp, do, autocast):
        qkv, temp = qkv.detach().clone().requires_grad_(), temp.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=getattr(torch, autocast or "bfloat16"), enabled=autocast is not None):
            out = fn(qkv, temp)
        out.backward(do.to(out.dtype))
        return out.detach(), qkv.grad, temp.grad

    gen = torch.Generator().manual_seed(7)
    B, H, D, N = 2, 2, 16, sum(COMPILE_SIZES)
    qkv = torch.randn(B, N, 3, H, D, generator=gen)
    temp = torch.rand(1, H, 1, 1, generator=gen) * 3 + 1
    do = torch.randn(B, N, H * D, generator=gen)
    for name, pattern, autocast in COMPILE_CASES:
        fn = lambda x, t, pattern=pattern: _qk_norm_attention(x, t, COMPILE_SIZES, pattern)  # noqa: E731
        reference = run(lambda x, t, pattern=pattern: _qk_norm_attention(x.double(), t.double(), COMPILE_SIZES, pattern,
                                                                          reference_attention),
                        qkv, temp, do.double(), None)
        eager = run(fn, qkv, temp, do, autocast)
        torch._dynamo.reset()
        counters.clear()
        compiled_fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
        compiled = run(compiled_fn, qkv, temp, do, autocast)
        again = run(compiled_fn, qkv, temp, do, autocast)  # same shapes and sizes: no recompilation
        keys = ("out", "dqkv", "dtemperature")
        results[name] = {
            "vs_eager": {key: err(c, e) for key, c, e in zip(keys, compiled, eager)},
            "vs_reference": {key: err(c, r) for key, c, r in zip(keys, compiled, reference)},
            "again_same": all(torch.equal(a, c) for a, c in zip(again, compiled)),
            "out_dtype": str(compiled[0].dtype),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": sum(counters["graph_break"].values()),
        }

    # What the compiled graphs hold: the forward operator in the forward graph, the backward one in
    # the backward graph.
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    fn = lambda x, t: _qk_norm_attention(x, t, COMPILE_SIZES, "block_causal")  # noqa: E731
    out = run(torch.compile(fn, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True),
              qkv, temp, do, None)[0]
    results["graphs"] = {"code": graphs, "same": bool(torch.equal(out, run(fn, qkv, temp, do, None)[0]))}

    # dynamic=None (how sampling compiles): the block sizes change; Dynamo would make them symbolic
    # after the first change, the wrapper specialises them again (one graph per block sizes).
    torch._dynamo.reset()
    counters.clear()
    attend = lambda q, k, v, sizes: bsa.block_sparse_attention(q, k, v, sizes, "block_diagonal", 0.5)  # noqa: E731
    compiled_attend = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=None)
    dyn = []
    with torch.no_grad():
        for sizes in ((1, 4, 9), (4, 1, 2, 9), (1, 4, 9), (2, 2, 2, 8)):
            q, k, v = (torch.randn(1, 2, sum(sizes), 16, generator=gen) for _ in range(3))
            dyn.append(err(compiled_attend(q, k, v, sizes), attend(q, k, v, sizes)))
    results["dynamic"] = {"errors": dyn, "graphs": int(counters["stats"]["unique_graphs"]),
                          "graph_breaks": sum(counters["graph_break"].values())}

    results["blocks"] = _compiled_blocks(err)

    # torch.library.opcheck: schema, autograd registration, fake tensors (shapes, strides, dtypes
    # against the real run) and AOT dispatch with dynamic shapes. Strided inputs, as the layers give.
    layout = bsa.get_layout(COMPILE_SIZES, "block_causal", "cpu")
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    fwd_args = (q, k, v, layout.table, list(layout.meta), 0.7, [0] * 15)
    results["opcheck_fwd"] = torch.library.opcheck(bsa.attn_fwd_op, fwd_args)
    out, lse = bsa.attn_fwd_op(*fwd_args)
    dout = torch.randn(B, H, N, D, generator=gen)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, layout.table, list(layout.meta), 0.7, [0] * 15)
    results["opcheck_bwd"] = torch.library.opcheck(bsa.attn_bwd_op, bwd_args)
    # the operators compute exactly what the direct launches (the eager path) compute
    out_direct, lse_direct = bsa.attention_forward(q.detach(), k.detach(), v.detach(), layout, 0.7)
    grads_direct = bsa.attention_backward(dout, q.detach(), k.detach(), v.detach(), out_direct, lse_direct, layout, 0.7)
    results["op_same_as_direct"] = bool(torch.equal(out, out_direct) and torch.equal(lse, lse_direct) and all(
        torch.equal(a, b) for a, b in zip(bsa.attn_bwd_op(*bwd_args), grads_direct)))
    return results


def _compiled_blocks(err):
    """A tiny HMAR model's transformer blocks with the kernel as attention (hmar.attention), under bf16
    autocast as training runs, compiled one region per block as hmar.compile does, but fullgraph."""
    from torch._dynamo.utils import counters

    from hmar.attention import block_sparse_kernel
    from hmar.config import ModelConfig, TokenizerConfig, TransformerConfig
    from hmar.pipeline import Pipeline
    from hmar.policy import KernelPolicy
    from hmar.transformer import AdaLNBlock

    tokenizer = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                                patch_nums=(1, 2, 3, 4), image_size=64)
    transformer = TransformerConfig(family="hmar", depth=2, width=32, num_heads=2, branch_depth=1, num_classes=10)
    model = Pipeline.random(ModelConfig(tokenizer, transformer), device="cpu", seed=0).transformer.eval()
    model.set_policy(KernelPolicy(fused_cosine_qkv=True))  # traced through too, as in training on CUDA
    labels = torch.tensor([1, 3])
    teacher = torch.randn(2, sum(model.block_sizes[1:]), tokenizer.z_channels, generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.forward_next_scale(labels, teacher, block_sparse_kernel).float()
        logits.square().mean().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    reference = run()
    torch._dynamo.reset()
    counters.clear()
    regions = [m for m in model.modules() if isinstance(m, AdaLNBlock)]
    for region in regions:
        region.compile(backend="aot_eager", fullgraph=True, dynamic=False)
    compiled = run()
    torch._dynamo.reset()
    return {"logits": err(compiled[0], reference[0]), "grads": err(compiled[1], reference[1]), "regions": len(regions),
            "graph_breaks": sum(counters["graph_break"].values())}


@pytest.fixture(scope="module")
def compiled():
    return _interpreter_worker("compiled")


@pytest.mark.parametrize("case", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compiled_fullgraph_matches_eager_and_reference(compiled, case):
    name, _, autocast = case
    res = compiled[name]
    assert res["graph_breaks"] == 0 and res["graphs"] == 1, res  # fullgraph=True would have raised anyway
    assert res["again_same"], "a second call of the compiled function gave other numbers"
    assert res["out_dtype"] == f"torch.{autocast or 'float32'}"
    bound = COMPILED_VS_EAGER[autocast]
    assert all(e <= bound for e in res["vs_eager"].values()), f"compiled vs eager over {bound:.0e}: {res['vs_eager']}"
    bound = BOUNDS_CPU[autocast or "float32"]
    assert all(e <= bound for e in res["vs_reference"].values()), f"vs float64 over {bound:.0e}: {res['vs_reference']}"


def test_compiled_graphs_call_the_operators(compiled):
    forward, backward = compiled["graphs"]["code"]
    assert "torch.ops.hmar.block_sparse_attn_fwd.default" in forward and "block_sparse_attn_bwd" not in forward
    assert "torch.ops.hmar.block_sparse_attn_bwd.default" in backward and "block_sparse_attn_fwd" not in backward
    assert compiled["graphs"]["same"]


def test_compiled_with_dynamic_shapes_specialises_on_block_sizes(compiled):
    res = compiled["dynamic"]
    assert all(e <= 1e-6 for e in res["errors"]), res
    assert res["graph_breaks"] == 0 and res["graphs"] == 3, res  # three distinct block sizes, one repeated


def test_compiled_model_blocks_trace_through_the_kernel(compiled):
    """hmar.attention.block_sparse_kernel is no longer a graph break: the model's blocks compile whole."""
    res = compiled["blocks"]
    assert res["regions"] >= 3 and res["graph_breaks"] == 0, res
    assert res["logits"] <= 4e-3 and res["grads"] <= 1e-2, res  # bf16 autocast: about one bf16 rounding


@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_opcheck(compiled, op):
    res = compiled[f"opcheck_{op}"]
    assert res and all(v == "SUCCESS" for v in res.values()), res


def test_operators_compute_what_the_direct_launches_do(compiled):
    assert compiled["op_same_as_direct"]


# ------------------------------------------------------------------ the operators' fake implementations

def test_fake_shapes_and_strides():
    """The operators' fake implementations (what torch.compile plans memory with) give the eager
    layouts: out as (B, N, H, D) memory, lse (B*H, N) float32, gradients like their inputs."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    layout = bsa.get_layout((3, 5, 8), "block_diagonal", "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        qkv = torch.empty(2, 16, 3, 4, 32, dtype=torch.bfloat16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, lse = bsa.attn_fwd_op(q, k, v, layout.table, list(layout.meta), 1.0, [0] * 15)
        assert out.shape == (2, 4, 16, 32) and out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
        assert lse.shape == (8, 16) and lse.dtype == torch.float32 and lse.is_contiguous()
        do = torch.empty(2, 4, 16, 32, dtype=torch.bfloat16)
        dq, dk, dv = bsa.attn_bwd_op(do, q, k, v, out, lse, layout.table, list(layout.meta), 1.0, [0] * 15)
        for grad, x in ((dq, q), (dk, k), (dv, v)):
            assert grad.shape == x.shape and grad.dtype == x.dtype and grad.stride() == torch.empty_like(x).stride()


# ------------------------------------------------------------------ argument checks (no kernel launch)

def test_argument_errors():
    from hmar.kernels.block_sparse_attention import block_sparse_attention

    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="pattern"):
        block_sparse_attention(q, q, q, [5, 5], pattern="diagonal")
    with pytest.raises(ValueError, match="sum to 9"):
        block_sparse_attention(q, q, q, [4, 5])
    with pytest.raises(ValueError, match="positive"):
        block_sparse_attention(q, q, q, [12, -2])
    with pytest.raises(ValueError, match="head_dim 48"):
        x = torch.randn(1, 2, 10, 48)
        block_sparse_attention(x, x, x, [10])
    with pytest.raises(ValueError, match="shapes differ"):
        block_sparse_attention(q, q[:, :1], q, [10])
    with pytest.raises(ValueError, match="finite"):
        block_sparse_attention(q, q, q, [10], scale=float("nan"))
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        block_sparse_attention(q[0], q[0], q[0], [10])
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="CUDA"):
            block_sparse_attention(q, q, q, [10])
    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    with pytest.raises(ValueError, match=r"fwd config is \(rows, inner, warps, stages\)"):
        bsa._encode_configs({"fwd": (16, 32, 1)})
    assert bsa._decode_config(bsa._encode_configs({"dq": (64, 32, 4, 2)}), "dq") == (64, 32, 4, 2)
    assert bsa._decode_config(bsa._encode_configs({"dq": (64, 32, 4, 2)}), "fwd") is None


def test_argument_errors_under_torch_compile():
    """Compiled code (regional compilation: no fullgraph) raises the same errors; with fullgraph=True
    Dynamo reports them as an 'Observed exception' caused by them."""
    from hmar.kernels.block_sparse_attention import block_sparse_attention

    torch._dynamo.reset()
    f = torch.compile(lambda q, sizes, pattern: block_sparse_attention(q, q, q, sizes, pattern), backend="aot_eager")
    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="sum to 9"):
        f(q, [4, 5], "block_diagonal")
    with pytest.raises(ValueError, match="pattern"):
        f(q, [5, 5], "diagonal")
    torch._dynamo.reset()


# ------------------------------------------------------------------ the eager path's plans (kernels stubbed)

class _Binary:
    def __init__(self, launched):
        self.launched = launched

    def __getitem__(self, grid):
        return lambda *args: self.launched.append(args)


class _StubKernel:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` (Triton's dispatch) records its arguments
    and returns a binary whose launcher records its own; `fn` is the real kernel's function, whose
    parameters the direct launch reads."""

    def __init__(self, real):
        self.fn, self.dispatched, self.launched = real.fn, [], []

    def __getitem__(self, grid):
        def dispatch(*args, **kwargs):
            self.dispatched.append(args)
            return _Binary(self.launched)
        return dispatch


@pytest.fixture
def stubbed(monkeypatch):
    """The attention module on CPU tensors with its three kernels stubbed (nothing computes), the
    direct launch on, default configurations, no known plans; counts the argument checks."""
    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    launch = importlib.import_module("hmar.kernels.launch")
    devices = importlib.import_module("hmar.kernels.devices")
    monkeypatch.setattr(devices, "INTERPRETING", False)
    monkeypatch.setattr(devices, "runs_on", lambda device: True)
    monkeypatch.setattr(launch, "_direct", True)
    monkeypatch.setattr(launch, "_binaries", {})
    monkeypatch.setattr(bsa, "_PLANS", {})
    monkeypatch.setenv("HMAR_ATTN_AUTOTUNE", "0")
    kernels = {}
    for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        kernels[name] = _StubKernel(getattr(bsa, name))
        monkeypatch.setattr(bsa, name, kernels[name])
    checks, check = [], bsa._check
    monkeypatch.setattr(bsa, "_check", lambda *args: checks.append(args) or check(*args))
    return bsa, kernels, checks


def _same(a, b):
    return all(x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b, strict=True))


def test_a_known_eager_call_skips_the_checks_and_repeats_the_kept_launches(stubbed):
    bsa, kernels, checks = stubbed
    sizes = [1, 4, 9, 2]
    calls = []
    for _ in range(2):
        q, k, v = (torch.randn(2, 3, 16, 16, requires_grad=True) for _ in range(3))
        out = bsa.block_sparse_attention(q, k, v, sizes, "block_causal", 0.5)
        out.backward(torch.ones_like(out))
        calls.append((q, k, v, out))
        assert out.transpose(1, 2).is_contiguous() and out.grad_fn is not None
        assert all(x.grad.shape == x.shape for x in (q, k, v))
    assert len(checks) == 1 and len(bsa._PLANS) == 1
    (q, k, v, out) = calls[1]
    heads = {"_attn_fwd": (q, k, v, out), "_attn_bwd_dq": (q, k, v, out), "_attn_bwd_dkdv": (q, k, v)}
    for name, kernel in kernels.items():
        # the first call went through Triton's dispatch, the second launched the kept binary ...
        (first,), (again,) = kernel.dispatched, kernel.launched
        # ... with its own tensors and what the first call computed for the rest
        assert [t.data_ptr() for t in again[:len(heads[name])]] == [t.data_ptr() for t in heads[name]], name
        assert _same(again[bsa._FWD_HEAD if name == "_attn_fwd" else bsa._BWD_HEAD:len(first)],
                     first[bsa._FWD_HEAD if name == "_attn_fwd" else bsa._BWD_HEAD:]), name


def test_inputs_unlike_a_known_call_are_checked(stubbed):
    bsa, kernels, checks = stubbed
    q = torch.randn(1, 2, 10, 16)
    bsa.block_sparse_attention(q, q, q, [5, 5])  # known from now on
    with pytest.raises(ValueError, match="dtypes differ"):
        bsa.block_sparse_attention(q, q.double(), q, [5, 5])
    with pytest.raises(ValueError, match="sum to 9"):
        bsa.block_sparse_attention(q, q, q, [4, 5])
    with pytest.raises(ValueError, match="pattern"):
        bsa.block_sparse_attention(q, q, q, [5, 5], "diagonal")
    with pytest.raises(ValueError, match="finite"):
        bsa.block_sparse_attention(q, q, q, [5, 5], scale=float("nan"))
    with pytest.raises(ValueError, match="shapes differ"):
        bsa.block_sparse_attention(q, q[:, :1], q, [5, 5])
    with pytest.raises(TypeError, match="block_sizes must be a sequence"):
        bsa.block_sparse_attention(q, q, q, 10)
    with pytest.raises(TypeError, match="k must be a tensor"):
        bsa.block_sparse_attention(q, "k", q, [5, 5])
    bsa.block_sparse_attention(q, q, q, (s for s in (5, 5)))  # a generator is read once: the known call
    assert len(checks) == 8 and len(kernels["_attn_fwd"].launched) == 1


def test_block_sizes_or_a_scale_that_are_tensors_are_checked_every_call(stubbed):
    bsa, kernels, checks = stubbed
    q = torch.randn(1, 2, 10, 16)
    for _ in range(2):
        bsa.block_sparse_attention(q, q, q, torch.tensor([5, 5]))
        bsa.block_sparse_attention(q, q, q, [5, 5], scale=torch.tensor(0.5))
    assert len(checks) == 4 and not bsa._PLANS


def test_unaligned_inputs_launch_through_the_keyed_cache(stubbed):
    bsa, kernels, _ = stubbed
    q = torch.randn(1, 2, 10, 17)[..., 1:]  # 4 bytes past a 16-byte boundary
    for _ in range(2):
        bsa.block_sparse_attention(q, q, q, [10])
    (plan,) = bsa._PLANS.values()
    assert plan.fwd is None  # nothing kept: the direct launch's own cache launched the second call
    assert len(kernels["_attn_fwd"].dispatched) == 1 and len(kernels["_attn_fwd"].launched) == 1


def test_each_incoming_gradient_layout_keeps_its_backward(stubbed):
    bsa, kernels, _ = stubbed
    q = torch.randn(2, 3, 10, 16, requires_grad=True)
    grads = [torch.randn(2, 3, 10, 16), torch.randn(2, 10, 3, 16).transpose(1, 2), torch.randn(2, 3, 10, 16)]
    for do in grads:
        bsa.block_sparse_attention(q, q, q, [4, 6]).backward(do)
    (plan,) = bsa._PLANS.values()
    assert sorted(plan.bwd) == sorted({do.stride() for do in grads})
    assert len(kernels["_attn_bwd_dq"].dispatched) == 2 and len(kernels["_attn_bwd_dq"].launched) == 1


def test_without_grad_no_graph_is_recorded(stubbed):
    bsa, _, _ = stubbed
    q = torch.randn(1, 2, 10, 16, requires_grad=True)
    with torch.no_grad():
        assert bsa.block_sparse_attention(q, q, q, [10]).grad_fn is None
    assert bsa.block_sparse_attention(q.detach(), q.detach(), q.detach(), [10]).grad_fn is None
    assert bsa.block_sparse_attention(q, q, q, [10]).grad_fn is not None


def test_layout_tables():
    """Tiles never straddle a block except to pack whole small blocks; ranges are exact."""
    import importlib

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    sizes = (1, 4, 9, 16, 25, 36, 64, 100, 169, 256)
    for pattern in ("block_diagonal", "block_causal"):
        starts, ends, lo, hi, clo, chi = bsa._ranges(sizes, pattern)
        for tile in bsa.TILE_SIZES:
            rec = bsa._tiles(starts, ends, lo, hi, tile)
            covered = sorted((int(r[0]), int(r[1])) for r in rec)
            assert covered[0][0] == 0 and covered[-1][1] == sum(sizes)
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
            for r0, r1 in covered:
                assert r1 - r0 <= tile
                first = int((ends > r0).argmax())
                last = int((ends >= r1).argmax())
                assert first == last or ends[last] - starts[first] <= tile  # packed whole blocks only
                assert (first == last) or (starts[first] == r0 and ends[last] == r1)


# ------------------------------------------------------------------ GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sdpa_f32(q, k, v, sizes, pattern, scale, do):
    from hmar.kernels.reference import block_mask

    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=block_mask(sizes, pattern, q.device),
                                                           scale=scale)
    ref.backward(do.float())
    return ref.detach(), qf.grad, kf.grad, vf.grad


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check_poisoned(q, k, v, sizes, pattern, scale, bound, do=None):
    import importlib

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    B, H, N, D = q.shape
    do = torch.randn_like(q) if do is None else do
    sc = D ** -0.5 if scale is None else scale
    layout = bsa.get_layout(sizes, pattern, q.device)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B * H, N), float("nan"), device=q.device)
    out, lse = bsa.attention_forward(q, k, v, layout, sc, out=out, lse=lse)
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    dq, dk, dv = bsa.attention_backward(do, q, k, v, out, lse, layout, sc, dq=nan(q), dk=nan(k), dv=nan(v))
    torch.cuda.synchronize()
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: unwritten (NaN-poisoned) elements remain"
    ref, gq, gk, gv = _sdpa_f32(q, k, v, sizes, pattern, sc, do)
    errs = {"out": _rel(out, ref), "dq": _rel(dq, gq), "dk": _rel(dk, gk), "dv": _rel(dv, gv)}
    bad = {key: e for key, e in errs.items() if not e <= bound}
    assert not bad, f"rel. errors over {bound:.0e}: {bad} (all: {errs})"
    return errs


@pytest.fixture
def no_autotune(monkeypatch):
    monkeypatch.setenv("HMAR_ATTN_AUTOTUNE", "0")


@gpu
@needs_cuda
@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("res", [256, 512, 1024])
def test_gpu_real_sizes_bf16(no_autotune, res, pattern):
    sizes = [p * p for p in PATCH_NUMS[res]]
    B, H = (2, 4) if res < 1024 else (1, 4)
    torch.manual_seed(res)
    q, k, v = (torch.randn(B, H, sum(sizes), 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    errs = _check_poisoned(q, k, v, sizes, pattern, None, GPU_REAL_BOUND)
    print(f"{res}px {pattern}: {errs}")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 16), (torch.bfloat16, 32), (torch.bfloat16, 64),
                                             (torch.bfloat16, 128), (torch.float16, 32), (torch.float16, 128),
                                             (torch.float32, 16), (torch.float32, 64)], ids=str)
@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
def test_gpu_dtypes_and_head_dims(no_autotune, dtype, head_dim, pattern):
    sizes = [1, 4, 9, 16, 25, 36, 64, 100, 169, 256, 3, 200]
    torch.manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, sum(sizes), head_dim, device="cuda", dtype=dtype) for _ in range(3))
    _check_poisoned(q, k, v, sizes, pattern, 1.0 if head_dim == 32 else None, BOUNDS_GPU[dtype])


@gpu
@needs_cuda
def test_gpu_strided_inputs_and_layout(no_autotune):
    from hmar.kernels.block_sparse_attention import block_sparse_attention

    sizes = [1, 4, 9, 16, 25, 36, 64, 100, 169, 256]
    B, H, N, D = 2, 4, sum(sizes), 64
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # strided views, as an attention layer makes them
    _check_poisoned(q, k, v, sizes, "block_diagonal", 1.0, 1e-2)
    big = torch.randn(B, H, N, 2 * D, device="cuda", dtype=torch.float16)
    _check_poisoned(big[..., :D], big[..., D:], big[..., :D].flip(-1), sizes, "block_causal", 0.3, 2e-3)
    out = block_sparse_attention(q, k, v, sizes)
    assert out.transpose(1, 2).is_contiguous()


@gpu
@needs_cuda
def test_gpu_autocast_and_grads(no_autotune):
    from hmar.kernels.block_sparse_attention import block_sparse_attention

    sizes = [1, 4, 9, 16, 25, 36, 64]
    q, k, v = (torch.randn(2, 4, sum(sizes), 64, device="cuda", requires_grad=True) for _ in range(3))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block_sparse_attention(q, k, v, sizes, "block_causal", scale=1.0)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    ref, gq, _, _ = _sdpa_f32(q.bfloat16(), k.bfloat16(), v.bfloat16(), sizes, "block_causal", 1.0, 2 * out.detach().float())
    assert _rel(out, ref) < 1e-2 and _rel(q.grad, gq) < 2e-2
    with pytest.raises(ValueError, match="dtypes differ"):
        block_sparse_attention(q.half(), k, v, sizes)


@gpu
@needs_cuda
def test_gpu_eager_calls_repeat_the_kept_launches(no_autotune):
    """The eager wrapper called as a model calls it, again and again: the first call with some inputs
    launches through Triton and keeps the launches, later ones repeat them. Repeated inputs give the
    same bits; unaligned inputs, a negative scale and another layout of the incoming gradient take
    their own launches; every call's output and gradients against float32 (explicit softmax)."""
    import importlib

    from hmar.kernels.reference import reference_attention

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    sizes = [p * p for p in PATCH_NUMS[256]]
    B, H, N, D = 2, 4, sum(sizes), 64
    torch.manual_seed(5)
    raw = torch.randn(3, B, H, N, D + 1, device="cuda", dtype=torch.bfloat16)
    do_bhnd = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    do_bnhd = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    results = []
    for pattern, scale, offset, do in [("block_diagonal", None, 0, do_bhnd), ("block_diagonal", None, 0, do_bhnd),
                                       ("block_diagonal", None, 0, do_bnhd), ("block_causal", -0.2, 0, do_bhnd),
                                       ("block_causal", -0.2, 0, do_bhnd), ("block_causal", None, 1, do_bnhd),
                                       ("block_causal", None, 1, do_bnhd)]:
        q, k, v = (raw[i, ..., offset:offset + D].detach().requires_grad_() for i in range(3))  # offset 1: 2 bytes off
        out = bsa.block_sparse_attention(q, k, v, sizes, pattern, scale)
        out.backward(do)
        got = [out.detach(), q.grad, k.grad, v.grad]
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = reference_attention(qf, kf, vf, sizes, pattern, scale, dtype=torch.float32)
        ref.backward(do.float())
        errs = [_rel(a, b) for a, b in zip(got, [ref.detach(), qf.grad, kf.grad, vf.grad])]
        assert max(errs) <= 1e-2, f"{pattern}, scale {scale}, offset {offset}: rel. errors (out, dq, dk, dv) {errs}"
        results.append(got)
    for first, again in ((0, 1), (3, 4), (5, 6)):  # the same inputs again: the same bits
        assert all(torch.equal(a, b) for a, b in zip(results[first], results[again]))
    assert sum(plan.fwd is not None for plan in bsa._PLANS.values()) >= 2  # the aligned calls kept their launches


@gpu
@needs_cuda
def test_gpu_autotuned_path(monkeypatch):
    monkeypatch.setenv("HMAR_ATTN_AUTOTUNE", "1")
    sizes = [p * p for p in PATCH_NUMS[512]]
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, sum(sizes), 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _check_poisoned(q, k, v, sizes, "block_diagonal", None, GPU_REAL_BOUND)


# ------------------------------------------------------------------ GPU: torch.compile with Inductor

def _compiled_vs_eager(fn, inputs, do):
    """Eager and compiled (Inductor, fullgraph) forward+backward of fn: (errors, Inductor's code)."""
    from unittest import mock

    from torch._dynamo.utils import counters
    from torch._inductor.graph import GraphLowering

    def run(f):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = f(*leaves)
        out.backward(do)
        return [out.detach()] + [x.grad for x in leaves]

    eager = run(fn)
    torch._dynamo.reset()
    counters.clear()
    compiled_fn = torch.compile(fn, fullgraph=True, dynamic=False)
    code = []
    # Inductor's generated code, forward and (compiled on its first call) backward; not through
    # run_and_get_code, which resets Dynamo (and the Triton kernel table the backward graph refers to)
    with torch._inductor.config.patch(force_disable_caches=True), \
            mock.patch.object(GraphLowering, "save_output_code", code.append):
        compiled = run(compiled_fn)
    again = run(compiled_fn)
    assert all(torch.equal(a, b) for a, b in zip(again, compiled)), "a second compiled call gave other numbers"
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    return [_rel(c, e) for c, e in zip(compiled, eager)], "\n".join(code)


@gpu
@needs_cuda
@pytest.mark.parametrize("pattern,autotune", [("block_diagonal", "0"), ("block_causal", "0"), ("block_diagonal", "1")],
                         ids=["block_diagonal-default-config", "block_causal-default-config", "block_diagonal-autotuned"])
def test_gpu_inductor_compiled_matches_eager(monkeypatch, pattern, autotune):
    """The attention layer's work around the kernel (qkv split, q/k L2-norm with temperature, heads
    back into channels) compiled by Inductor in one graph with the kernel; bf16 at 256 px. Autotuned:
    Inductor benchmarks the kernels' configurations itself (one such case is enough)."""
    monkeypatch.setenv("HMAR_ATTN_AUTOTUNE", autotune)
    sizes = [p * p for p in PATCH_NUMS[256]]
    B, H, D, N = 4, 4, 64, sum(sizes)
    torch.manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    temperature = torch.rand(1, H, 1, 1, device="cuda") * 3 + 1
    do = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16)
    errs, code = _compiled_vs_eager(lambda x, t: _qk_norm_attention(x, t, sizes, pattern), [qkv, temperature], do)
    # Inductor's code calls the operators (forward, then backward)
    for name in ("block_sparse_attn_fwd", "block_sparse_attn_bwd"):
        assert f"torch.ops.hmar.{name}" in code, f"{name} not called in Inductor's code: ...{code[-3000:]}"
    # bf16: the fused normalisation rounds q and k differently from eager (one bf16 rounding ~4e-3)
    assert errs[0] <= 1e-2 and max(errs[1:]) <= 2e-2, f"compiled vs eager (out, dqkv, dtemperature): {errs}"


@gpu
@needs_cuda
def test_gpu_opcheck(no_autotune):
    """opcheck on the operators with CUDA tensors."""
    import importlib

    bsa = importlib.import_module("hmar.kernels.block_sparse_attention")
    sizes = [1, 4, 9, 16, 25, 36, 64, 100]
    layout = bsa.get_layout(sizes, "block_causal", "cuda")
    torch.manual_seed(0)
    qkv = torch.randn(2, sum(sizes), 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    fwd_args = (q, k, v, layout.table, list(layout.meta), 0.125, [0] * 15)
    res = torch.library.opcheck(bsa.attn_fwd_op, fwd_args)
    assert all(r == "SUCCESS" for r in res.values()), res
    out, lse = bsa.attn_fwd_op(*fwd_args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, layout.table,
                list(layout.meta), 0.125, [0] * 15)
    res = torch.library.opcheck(bsa.attn_bwd_op, bwd_args)
    assert all(r == "SUCCESS" for r in res.values()), res


@gpu
@needs_cuda
def test_gpu_compiled_blocks_trace_through_the_kernel(no_autotune):
    """Regional compilation (hmar.compile) of a small HMAR model with the kernel as attention: no
    graph break anywhere, and the eager logits and gradients (bf16 autocast, as training runs)."""
    from torch._dynamo.utils import counters

    from hmar.attention import block_sparse_kernel
    from hmar.compile import compile_blocks
    from hmar.config import ModelConfig
    from hmar.pipeline import Pipeline
    from hmar.policy import KernelPolicy
    from tests.train_helpers import tiny_tokenizer_config, tiny_transformer_config

    pipe = Pipeline.random(ModelConfig(tiny_tokenizer_config(), tiny_transformer_config()), device="cuda", seed=0)
    model = pipe.transformer.eval()  # eval: no label dropout, both runs see the same labels
    model.set_policy(KernelPolicy.choose("cuda", training=True))  # the trainer's kernels (the pipeline's are for sampling)
    labels = torch.tensor([1, 3], device="cuda")
    teacher = torch.randn(2, sum(model.block_sizes[1:]), pipe.tokenizer.config.z_channels, device="cuda")

    def run():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.forward_next_scale(labels, teacher, block_sparse_kernel).float()
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference, reference_grads = run()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model)
    logits, grads = run()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(logits, reference, rtol=2e-2, atol=2e-2)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=5e-2, atol=5e-3)
    torch._dynamo.reset()


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    print(json.dumps(_worker(CPU_CASES)))
if __name__ == "__main__" and sys.argv[1:] == ["--compile-worker"]:
    print(json.dumps(_compile_worker()))
