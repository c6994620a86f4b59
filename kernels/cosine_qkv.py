"""Cosine attention's inputs in one pass: a fused QKV projection split into heads, q and k
unit-normalised, q scaled by its head's temperature; forward and backward in Triton.

What it replaces (VAR's and HMAR's attention, `hmar.transformer.SelfAttention`)::

    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)         # qkv: (B, L, 3, H, D) -> each (B, H, L, D)
    q = F.normalize(q, dim=-1) * log_scale.clamp_max(max_log_scale).exp()
    k = F.normalize(k, dim=-1)

Why: compiled by Inductor, the backward of these few lines becomes a large element-wise kernel of a
training step (BENCHMARKS.md has its share) plus a reduction and a copy that stack dq, dk, dv back
into the projection's layout: the gradients arrive in (B, H, L, D) and must leave in (B, L, 3, H, D),
and the normalisation's backward needs a reduction over D between them.
Here one program owns (batch, head, a tile of rows) with all D channels of the row in registers, so
the norms, the reduction over D and the transposition are local: the forward reads qkv once and writes
q, k, v once; the backward reads the three gradients and q and k once and writes the projection's
gradient once (with the temperature's gradient as per-program partial sums, added up by torch: no
atomics, deterministic).

Maths, per row x of q or k (norm r = max(||x||, eps), as `F.normalize`; t the temperature):
    forward  n = x / r,  q = t·n
    backward g = t·dq;  dx = (g − n·(n·g)) / r  where ||x|| > eps, else g / eps;
             d log_scale[h] = t · Σ dq·n over the head's rows, where log_scale[h] <= max (clamp_max's rule).
Arithmetic in float32, each output rounded once to the input's dtype (PyTorch rounds after each op).
The raw qkv is saved for the backward (not the normalised outputs), so gradients are exact in x.

torch.compile: custom operators ``torch.ops.hmar.cosine_qkv_fwd`` / ``_bwd`` with fake implementations,
as the attention kernels are (see `block_sparse_attention`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
NORM_EPS = 1e-12  # F.normalize's default
ROWS = 32  # rows of one program: 32 × 128 float32 values per tensor fit the registers of 4 warps


@triton.jit
def _temperature(LOG_SCALE, h, max_log):
    log_scale = tl.load(LOG_SCALE + h).to(tl.float32)
    return tl.exp(tl.minimum(log_scale, max_log)), log_scale <= max_log


@triton.jit
def _row_tile(QKV, L, H, sb, sl, sh, sd, D: tl.constexpr, ROWS: tl.constexpr):
    """This program's (batch·head, rows): the pointers to its q rows in qkv (k and v follow at
    +s3, +2·s3), its batch, head and row indices (int64 where offsets grow large) and the row mask."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    rows = (tile * ROWS + tl.arange(0, ROWS))[:, None].to(tl.int64)
    cols = tl.arange(0, D)[None, :]
    src = QKV + b * sb + h * sh + rows * sl + cols * sd
    return src, tile, bh, b, h, rows, cols, rows < L


@triton.jit
def _inverse_norm(x, eps):
    """1 / max(||row||, eps) of each row, and the norms."""
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return 1.0 / tl.maximum(norm, eps), norm


@triton.jit
def _cosine_qkv_fwd(QKV, LOG_SCALE, Q, K, V, L, H, sb, sl, s3, sh, sd, max_log, eps,
                    D: tl.constexpr, ROWS: tl.constexpr):
    src, tile, bh, b, h, rows, cols, inside = _row_tile(QKV, L, H, sb, sl, sh, sd, D, ROWS)
    dst = bh.to(tl.int64) * L * D + rows * D + cols  # outputs: contiguous (B, H, L, D)
    t, _ = _temperature(LOG_SCALE, h, max_log)

    x = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    inv, _ = _inverse_norm(x, eps)
    tl.store(Q + dst, (x * (t * inv)[:, None]).to(Q.dtype.element_ty), mask=inside)
    x = tl.load(src + s3, mask=inside, other=0.0).to(tl.float32)
    inv, _ = _inverse_norm(x, eps)
    tl.store(K + dst, (x * inv[:, None]).to(K.dtype.element_ty), mask=inside)
    x = tl.load(src + 2 * s3, mask=inside, other=0.0)
    tl.store(V + dst, x.to(V.dtype.element_ty), mask=inside)


@triton.jit
def _normalize_backward(x, g, eps):
    """dx of n = x / max(||x||, eps) given g = dL/dn (rows of a tile); also returns n."""
    inv, norm = _inverse_norm(x, eps)
    n = x * inv[:, None]
    radial = tl.where(norm > eps, tl.sum(n * g, axis=1), 0.0)  # below eps the denominator is the constant eps
    return (g - n * radial[:, None]) * inv[:, None], n


@triton.jit
def _cosine_qkv_bwd(QKV, LOG_SCALE, DQ, DK, DV, DQKV, PARTIAL, L, H, sb, sl, s3, sh, sd,
                    gqb, gqh, gql, gqd, gkb, gkh, gkl, gkd, gvb, gvh, gvl, gvd, max_log, eps,
                    D: tl.constexpr, ROWS: tl.constexpr):
    src, tile, bh, b, h, rows, cols, inside = _row_tile(QKV, L, H, sb, sl, sh, sd, D, ROWS)
    dst = DQKV + (b * L + rows) * (3 * H * D) + h * D + cols  # the gradient of qkv: contiguous (B, L, 3, H, D)
    t, unclamped = _temperature(LOG_SCALE, h, max_log)

    dq = tl.load(DQ + b * gqb + h * gqh + rows * gql + cols * gqd, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    dx, n = _normalize_backward(x, dq * t, eps)
    tl.store(dst, dx.to(DQKV.dtype.element_ty), mask=inside)
    dlog = tl.sum(tl.sum(dq * n, axis=1), axis=0) * t
    tl.store(PARTIAL + bh * tl.num_programs(0) + tile, tl.where(unclamped, dlog, 0.0))

    dk = tl.load(DK + b * gkb + h * gkh + rows * gkl + cols * gkd, mask=inside, other=0.0).to(tl.float32)
    x = tl.load(src + s3, mask=inside, other=0.0).to(tl.float32)
    dx, _ = _normalize_backward(x, dk, eps)
    tl.store(dst + H * D, dx.to(DQKV.dtype.element_ty), mask=inside)

    dv = tl.load(DV + b * gvb + h * gvh + rows * gvl + cols * gvd, mask=inside, other=0.0)
    tl.store(dst + 2 * H * D, dv.to(DQKV.dtype.element_ty), mask=inside)


def _grid(qkv: torch.Tensor):
    B, L, _, H, _ = qkv.shape
    return (triton.cdiv(L, ROWS), B * H)


def _heads_like(qkv: torch.Tensor) -> torch.Tensor:
    B, L, _, H, D = qkv.shape
    return qkv.new_empty((B, H, L, D))


def _forward(qkv, log_scale, max_log_scale):
    q, k, v = _heads_like(qkv), _heads_like(qkv), _heads_like(qkv)
    B, L, _, H, D = qkv.shape
    _cosine_qkv_fwd[_grid(qkv)](qkv, log_scale, q, k, v, L, H, *qkv.stride(), max_log_scale,
                                NORM_EPS, D=D, ROWS=ROWS, num_warps=4)
    return q, k, v


def _backward(dq, dk, dv, qkv, log_scale, max_log_scale):
    B, L, _, H, D = qkv.shape
    grid = _grid(qkv)
    dqkv = qkv.new_empty(qkv.shape)  # contiguous (B, L, 3, H, D), as the kernel writes it
    partial = torch.empty((B * H, grid[0]), device=qkv.device, dtype=torch.float32)
    _cosine_qkv_bwd[grid](qkv, log_scale, dq, dk, dv, dqkv, partial, L, H, *qkv.stride(), *dq.stride(), *dk.stride(),
                          *dv.stride(), max_log_scale, NORM_EPS, D=D, ROWS=ROWS, num_warps=4)
    dlog = partial.view(B, H, grid[0]).sum((0, 2)).to(log_scale.dtype)
    return dqkv, dlog


# hmar::cosine_qkv_fwd(qkv, log_scale, max_log_scale) -> (q, k, v)
# hmar::cosine_qkv_bwd(dq, dk, dv, qkv, log_scale, max_log_scale) -> (dqkv, dlog_scale)

@torch.library.custom_op("hmar::cosine_qkv_fwd", mutates_args=())
def _fwd_op(qkv: torch.Tensor, log_scale: torch.Tensor, max_log_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(qkv, log_scale, max_log_scale)


@_fwd_op.register_fake
def _fwd_fake(qkv, log_scale, max_log_scale):
    return _heads_like(qkv), _heads_like(qkv), _heads_like(qkv)


@torch.library.custom_op("hmar::cosine_qkv_bwd", mutates_args=())
def _bwd_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, log_scale: torch.Tensor,
            max_log_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dq, dk, dv, qkv, log_scale, max_log_scale)


@_bwd_op.register_fake
def _bwd_fake(dq, dk, dv, qkv, log_scale, max_log_scale):
    return qkv.new_empty(qkv.shape), torch.empty_like(log_scale)


def _setup_context(ctx, inputs, output):
    qkv, log_scale, max_log_scale = inputs
    ctx.save_for_backward(qkv, log_scale)
    ctx.max_log_scale = max_log_scale


def _backward_formula(ctx, dq, dk, dv):
    qkv, log_scale = ctx.saved_tensors
    dq, dk, dv = (_heads_like(qkv).zero_() if g is None else g for g in (dq, dk, dv))
    dqkv, dlog = _bwd_op(dq, dk, dv, qkv, log_scale, ctx.max_log_scale)
    return dqkv, dlog, None


_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)


def supports(qkv: torch.Tensor, log_scale: torch.Tensor) -> bool:
    """Whether `cosine_qkv` takes these inputs: a (B, L, 3, H, D) projection of a supported dtype and
    head dim on CUDA (or on the CPU under TRITON_INTERPRET=1), and one log-temperature per head."""
    return (devices.runs_on(qkv.device) and qkv.dim() == 5 and qkv.shape[2] == 3 and qkv.shape[-1] in HEAD_DIMS
            and qkv.dtype in DTYPES and log_scale.numel() == qkv.shape[3] and log_scale.device == qkv.device)


def cosine_qkv(qkv: torch.Tensor, log_scale: torch.Tensor, max_log_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of cosine attention from a fused projection.

    qkv: (B, L, 3, H, D), any strides (a view of the projection's (B, L, 3·H·D) output). log_scale: the
    H per-head log-temperatures (any shape with H elements, e.g. VAR's (1, H, 1, 1) parameter), clamped
    at `max_log_scale` before the exp. Returns contiguous (B, H, L, D) tensors in qkv's dtype: q and k
    unit-normalised over D, q times its head's temperature, v copied. Differentiable in qkv and log_scale.
    """
    if not supports(qkv, log_scale):
        raise ValueError(f"cosine_qkv: needs a (B, L, 3, H, D) {', '.join(str(d)[6:] for d in DTYPES)} tensor with D in "
                         f"{HEAD_DIMS} on CUDA and one log-temperature per head; got {tuple(qkv.shape)} {qkv.dtype} on "
                         f"{qkv.device} and {log_scale.numel()} log-temperatures")
    return _fwd_op(qkv, log_scale.reshape(-1), float(max_log_scale))
