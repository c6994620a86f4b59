"""AdaLN's modulated LayerNorm, alone or after the block's gated residual, in one Triton pass each way.

What it replaces (each line of `hmar.transformer.AdaLNBlock.forward`; x the float32 residual stream
(B, L, C), scale/shift/gamma per-sample modulations (B, 1, C), h a branch's output (B, L, C))::

    y1 = layer_norm(x, eps) * (1 + scale1) + shift1          # modulated_layer_norm
    x1 = x + h1 * gamma1                                      # } residual_modulated_layer_norm
    y2 = layer_norm(x1, eps) * (1 + scale2) + shift2          # }

Why: eagerly each line is 3 to 6 kernels over the (B, L, C) tensor (the norm, the multiply, the add,
the gated residual's multiply and add, and as many again backward, plus the reductions over L that
the modulations' gradients need). Here one program owns a tile of rows of one sample with the whole
row (C ≤ 4096 channels, padded to a power of two and masked) in registers, so the row statistics are
local: the forward reads x (and h) once and writes y (and x1) once; the backward reads the saved
input, dy (and x1's own upstream gradient, and h) once and writes dx (and dh) once, with the
modulations' gradients as per-program partial sums over that program's rows (float32, no atomics:
deterministic), added up per sample by torch.

Maths, per row (C channels; s, sh, g the row's sample's scale, shift, gamma):
    forward   x1 = x + h·g  (rounded to x's dtype, then used as rounded: the statistics are those
              of the tensor that is returned and saved, as PyTorch's unfused code computes them)
              mean = Σ x1 / C,  rstd = 1 / sqrt(Σ (x1 − mean)² / C + eps),  xhat = (x1 − mean)·rstd
              y = xhat·(1 + s) + sh
    backward  d sh = Σ_rows dy,  d s = Σ_rows dy·xhat,  dxhat = dy·(1 + s)
              dx1 = rstd·(dxhat − mean_c(dxhat) − xhat·mean_c(dxhat·xhat)) + dx1_upstream
              dx = dx1,  dh = dx1·g,  d g = Σ_rows dx1·h
Arithmetic in float32 (also 1 + s and h·g, which PyTorch rounds to the modulations' dtype under
autocast), each output rounded once to its dtype. Saved for the backward: the LayerNorm's input (x for
`modulated_layer_norm`; the output x1, h and gamma for `residual_modulated_layer_norm`), scale, and the
float32 per-row mean and rstd ((B, L) each); xhat is recomputed, shift is not needed.

torch.compile: custom operators ``torch.ops.hmar.modulated_layer_norm_fwd`` / ``_bwd`` and
``torch.ops.hmar.residual_modulated_layer_norm_fwd`` / ``_bwd`` with fake implementations and
registered autograd, as `cosine_qkv`'s are; the backward operators return the float32 partial sums
and the sums per sample (and over the batch of a (1, 1, C) modulation) are left to torch (Inductor).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import devices

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_CHANNELS = 4096
FORWARD_ELEMENTS = 16  # values of one tensor per thread in a forward tile (row tiles of 16·32·warps values)
BACKWARD_ELEMENTS = 8  # the same in a backward tile (it holds more tensors: x1, xhat, dy, dx, h, their pointers)
BACKWARD_ROWS = 32  # rows one backward program sums the modulations' gradients over (a whole number of tiles)



def _config(C: int) -> tuple[int, int, int, int, int]:
    """(padded channels, rows of a forward tile, rows of a backward tile, tiles of a backward program,
    warps) for C channels. Register use by ptxas for sm_90 with these (Triton 3.9, residual, fp32 x):
    ≤ 150 forward and ≤ 146 backward, no spills, for every padded width from 16 to 4096 channels."""
    block = max(16, triton.next_power_of_2(C))
    warps = max(4, block // 256)
    threads = 32 * warps
    forward_rows = max(1, FORWARD_ELEMENTS * threads // block)
    backward_rows = max(1, BACKWARD_ELEMENTS * threads // block)
    return block, forward_rows, backward_rows, max(1, BACKWARD_ROWS // backward_rows), warps


def _backward_programs(L: int, C: int) -> int:
    """Backward programs per sample (the partial sums' second dimension)."""
    _, _, rows, tiles, _ = _config(C)
    return triton.cdiv(L, rows * tiles)


# ------------------------------------------------------------------ kernels

@triton.jit
def _tile(L, C, tile, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile's row indices (int64: (ROWS,) and (ROWS, 1)), column indices ((1, BLOCK_C)) and masks."""
    row = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    rows, cols = row[:, None], tl.arange(0, BLOCK_C)[None, :]
    row_ok, col_ok = rows < L, cols < C
    return row, rows, cols, row_ok, col_ok, row_ok & col_ok


@triton.jit
def _per_sample(PTR, b, sb, sc, cols, col_ok):
    """A sample's modulation vector as a float32 (1, BLOCK_C) row (sb = 0 for a shared one)."""
    return tl.load(PTR + b * sb + cols * sc, mask=col_ok, other=0.0).to(tl.float32)


@triton.jit
def _adaln_fwd(X, H, GAMMA, SCALE, SHIFT, X1, Y, MEAN, RSTD, L, C, eps,
               sxb, sxl, sxc, shb, shl, shc, sgb, sgc, ssb, ssc, stb, stc,
               BLOCK_C: tl.constexpr, ROWS: tl.constexpr, RESIDUAL: tl.constexpr):
    tile, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    row, rows, cols, row_ok, col_ok, inside = _tile(L, C, tile, ROWS, BLOCK_C)
    out = (b * L + rows) * C + cols  # x1 and y: contiguous (B, L, C)

    x = tl.load(X + b * sxb + rows * sxl + cols * sxc, mask=inside, other=0.0).to(tl.float32)
    if RESIDUAL:
        h = tl.load(H + b * shb + rows * shl + cols * shc, mask=inside, other=0.0).to(tl.float32)
        x1 = (x + h * _per_sample(GAMMA, b, sgb, sgc, cols, col_ok)).to(X1.dtype.element_ty)
        tl.store(X1 + out, x1, mask=inside)
        x = x1.to(tl.float32)

    mean = tl.sum(x, axis=1) / C
    centred = tl.where(col_ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    y = centred * rstd[:, None] * (1.0 + _per_sample(SCALE, b, ssb, ssc, cols, col_ok)) \
        + _per_sample(SHIFT, b, stb, stc, cols, col_ok)
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + b * L + row, mean, mask=row < L)  # mean, rstd: contiguous (B, L) float32
    tl.store(RSTD + b * L + row, rstd, mask=row < L)


@triton.jit
def _adaln_bwd(X1, H, GAMMA, SCALE, MEAN, RSTD, DY, DX1, DX, DH, PARTIAL, B, L, C,
               sxb, sxl, sxc, shb, shl, shc, sgb, sgc, ssb, ssc, syb, syl, syc, sub, sul, suc,
               BLOCK_C: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr,
               RESIDUAL: tl.constexpr, UPSTREAM: tl.constexpr):
    """One program: TILES tiles of ROWS rows of sample b. X1 is the LayerNorm's input (x, or the
    saved x1); DX1 x1's own upstream gradient (UPSTREAM); PARTIAL (2 or 3, B, programs, C) float32:
    this program's sums of d scale, d shift (and d gamma) over its rows."""
    chunk, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    channel = tl.arange(0, BLOCK_C)
    gain = 1.0 + _per_sample(SCALE, b, ssb, ssc, channel[None, :], (channel < C)[None, :])
    if RESIDUAL:
        gamma = _per_sample(GAMMA, b, sgb, sgc, channel[None, :], (channel < C)[None, :])
    d_scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    d_shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    d_gamma = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(TILES):
        row, rows, cols, _, _, inside = _tile(L, C, chunk * TILES + t, ROWS, BLOCK_C)
        out = (b * L + rows) * C + cols  # dx and dh: contiguous (B, L, C)
        mean = tl.load(MEAN + b * L + row, mask=row < L, other=0.0)[:, None]
        rstd = tl.load(RSTD + b * L + row, mask=row < L, other=0.0)[:, None]
        x1 = tl.load(X1 + b * sxb + rows * sxl + cols * sxc, mask=inside, other=0.0).to(tl.float32)
        xhat = tl.where(inside, (x1 - mean) * rstd, 0.0)
        dy = tl.load(DY + b * syb + rows * syl + cols * syc, mask=inside, other=0.0).to(tl.float32)
        d_scale += tl.sum(dy * xhat, axis=0)
        d_shift += tl.sum(dy, axis=0)
        dxhat = dy * gain
        mean_dxhat = tl.sum(dxhat, axis=1)[:, None] / C
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1)[:, None] / C
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        if UPSTREAM:
            dx += tl.load(DX1 + b * sub + rows * sul + cols * suc, mask=inside, other=0.0).to(tl.float32)
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=inside)
        if RESIDUAL:
            h = tl.load(H + b * shb + rows * shl + cols * shc, mask=inside, other=0.0).to(tl.float32)
            d_gamma += tl.sum(dx * h, axis=0)  # (h is 0 outside the tile)
            tl.store(DH + out, (dx * gamma).to(DH.dtype.element_ty), mask=inside)

    partial = PARTIAL + (b * tl.num_programs(0) + chunk) * C + channel  # (k, b, chunk, :) at + k·B·programs·C
    plane = B * tl.num_programs(0) * C
    tl.store(partial, d_scale, mask=channel < C)
    tl.store(partial + plane, d_shift, mask=channel < C)
    if RESIDUAL:
        tl.store(partial + 2 * plane, d_gamma, mask=channel < C)


# ------------------------------------------------------------------ host side

def _problem(x: torch.Tensor, mods: dict[str, torch.Tensor], h: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> str | None:
    """Why these inputs are not supported, or None."""
    if not devices.runs_on(x.device):
        return f"x is on {x.device}: needs CUDA (or the CPU under TRITON_INTERPRET=1)"
    if x.dim() != 3 or not 1 <= x.shape[-1] <= MAX_CHANNELS:
        return f"x must be (B, L, C) with C ≤ {MAX_CHANNELS}; got {tuple(x.shape)}"
    names = ", ".join(str(d)[6:] for d in DTYPES)
    tensors = {"x": x, **({} if h is None else {"h": h}), **mods}
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            return f"{name} is {t.dtype}; supported: {names}"
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
    if out_dtype is not None and out_dtype not in DTYPES:
        return f"out_dtype {out_dtype}; supported: {names}"
    if h is not None and h.shape != x.shape:
        return f"h has shape {tuple(h.shape)}, x {tuple(x.shape)}"
    B, _, C = x.shape
    for name, t in mods.items():
        shape = (1,) * (3 - t.dim()) + tuple(t.shape)
        if t.dim() > 3 or shape[0] not in (1, B) or shape[1:] != (1, C):
            return f"{name} has shape {tuple(t.shape)}: needs ({B}, 1, {C}) or (1, 1, {C}) for x of {tuple(x.shape)}"
    return None


def _shared(mod: torch.Tensor) -> bool:
    """Whether a (B | 1, 1, C) modulation is one vector for the whole batch."""
    return mod.dim() < 3 or mod.shape[0] == 1


def _strides(mod: torch.Tensor) -> tuple[int, int]:
    """(batch stride, channel stride) of a (B | 1, 1, C) modulation; batch stride 0 where it is shared."""
    return (0 if _shared(mod) else mod.stride(0)), mod.stride(-1)


def _stats_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.float32)


def _forward(x, h, gamma, scale, shift, eps, out_dtype):
    B, L, C = x.shape
    residual = h is not None
    y = x.new_empty((B, L, C), dtype=out_dtype)
    x1 = x.new_empty((B, L, C)) if residual else y
    mean, rstd = _stats_like(x), _stats_like(x)
    if B * L:
        block, rows, _, _, warps = _config(C)
        h_args = (h, gamma, *h.stride(), *_strides(gamma)) if residual else (x, x, 0, 0, 0, 0, 0)
        _adaln_fwd[(triton.cdiv(L, rows), B)](
            x, h_args[0], h_args[1], scale, shift, x1, y, mean, rstd, L, C, eps, *x.stride(), *h_args[2:],
            *_strides(scale), *_strides(shift), BLOCK_C=block, ROWS=rows, RESIDUAL=residual, num_warps=warps)
    return x1, y, mean, rstd


def _partial_like(x: torch.Tensor, planes: int) -> torch.Tensor:
    B, L, C = x.shape
    return x.new_empty((planes, B, _backward_programs(L, C), C), dtype=torch.float32)


def _backward(dy, dx1, x1, h, gamma, scale, mean, rstd):
    """dx (x's dtype), dh (h's dtype, or None) and the float32 partial sums of d scale, d shift (and
    d gamma): (2 or 3, B, programs per sample, C)."""
    B, L, C = x1.shape
    residual, upstream = h is not None, dx1 is not None
    dx = x1.new_empty((B, L, C))
    dh = h.new_empty((B, L, C)) if residual else None
    partial = _partial_like(x1, 3 if residual else 2)
    if B * L:
        block, _, rows, tiles, warps = _config(C)
        h_args = (h, gamma, dh, *h.stride(), *_strides(gamma)) if residual else (x1, x1, dx, 0, 0, 0, 0, 0)
        dx1_args = (dx1, *dx1.stride()) if upstream else (dy, 0, 0, 0)
        _adaln_bwd[(partial.shape[2], B)](
            x1, h_args[0], h_args[1], scale, mean, rstd, dy, dx1_args[0], dx, h_args[2], partial, B, L, C,
            *x1.stride(), *h_args[3:], *_strides(scale), *dy.stride(), *dx1_args[1:],
            BLOCK_C=block, ROWS=rows, TILES=tiles, RESIDUAL=residual, UPSTREAM=upstream, num_warps=warps)
    else:
        partial.zero_()
    return dx, dh, partial


def _meta(mod: torch.Tensor) -> tuple:
    return mod.shape, mod.dtype, _shared(mod)


def _modulation_grad(sums: torch.Tensor, meta: tuple) -> torch.Tensor:
    """A (B, C) float32 sum over rows as a modulation's gradient: summed over the batch too where the
    modulation is shared, in its shape and dtype."""
    shape, dtype, shared = meta
    return (sums.sum(0) if shared else sums).reshape(shape).to(dtype)


# hmar::modulated_layer_norm_fwd(x, scale, shift, eps, out_dtype) -> (y, mean, rstd)
# hmar::residual_modulated_layer_norm_fwd(x, h, gamma, scale, shift, eps, out_dtype) -> (x1, y, mean, rstd)

@torch.library.custom_op("hmar::modulated_layer_norm_fwd", mutates_args=())
def _mln_fwd_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = _forward(x, None, None, scale, shift, eps, out_dtype)
    return y, mean, rstd


@_mln_fwd_op.register_fake
def _mln_fwd_fake(x, scale, shift, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


@torch.library.custom_op("hmar::residual_modulated_layer_norm_fwd", mutates_args=())
def _rmln_fwd_op(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                 eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, h, gamma, scale, shift, eps, out_dtype)


@_rmln_fwd_op.register_fake
def _rmln_fwd_fake(x, h, gamma, scale, shift, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


# hmar::modulated_layer_norm_bwd(dy, x, scale, mean, rstd) -> (dx, partial)
# hmar::residual_modulated_layer_norm_bwd(dy, dx1, x1, h, gamma, scale, mean, rstd) -> (dx, dh, partial)

@torch.library.custom_op("hmar::modulated_layer_norm_bwd", mutates_args=())
def _mln_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, _, partial = _backward(dy, None, x, None, None, scale, mean, rstd)
    return dx, partial


@_mln_bwd_op.register_fake
def _mln_bwd_fake(dy, x, scale, mean, rstd):
    return x.new_empty(x.shape), _partial_like(x, 2)


@torch.library.custom_op("hmar::residual_modulated_layer_norm_bwd", mutates_args=())
def _rmln_bwd_op(dy: torch.Tensor, dx1: Optional[torch.Tensor], x1: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor,
                 scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, dx1, x1, h, gamma, scale, mean, rstd)


@_rmln_bwd_op.register_fake
def _rmln_bwd_fake(dy, dx1, x1, h, gamma, scale, mean, rstd):
    return x1.new_empty(x1.shape), h.new_empty(h.shape), _partial_like(x1, 3)


def _mln_setup_context(ctx, inputs, output):
    x, scale, shift, eps, out_dtype = inputs
    y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.metas, ctx.out_dtype = (_meta(scale), _meta(shift)), out_dtype


def _mln_backward_formula(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dy = x.new_zeros(x.shape, dtype=ctx.out_dtype) if dy is None else dy
    dx, partial = _mln_bwd_op(dy, x, scale, mean, rstd)
    d_scale, d_shift = (_modulation_grad(sums, meta) for sums, meta in zip(partial.sum(2), ctx.metas))
    return dx, d_scale, d_shift, None, None


def _rmln_setup_context(ctx, inputs, output):
    x, h, gamma, scale, shift, eps, out_dtype = inputs
    x1, y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x1, h, gamma, scale, mean, rstd)
    ctx.metas, ctx.out_dtype = (_meta(scale), _meta(shift), _meta(gamma)), out_dtype


def _rmln_backward_formula(ctx, dx1, dy, _dmean, _drstd):
    x1, h, gamma, scale, mean, rstd = ctx.saved_tensors
    dy = x1.new_zeros(x1.shape, dtype=ctx.out_dtype) if dy is None else dy
    dx, dh, partial = _rmln_bwd_op(dy, dx1, x1, h, gamma, scale, mean, rstd)
    d_scale, d_shift, d_gamma = (_modulation_grad(sums, meta) for sums, meta in zip(partial.sum(2), ctx.metas))
    return dx, dh, d_gamma, d_scale, d_shift, None, None


_mln_fwd_op.register_autograd(_mln_backward_formula, setup_context=_mln_setup_context)
_rmln_fwd_op.register_autograd(_rmln_backward_formula, setup_context=_rmln_setup_context)


# ------------------------------------------------------------------ public

def supports(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, h: torch.Tensor | None = None,
             gamma: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> bool:
    """Whether `modulated_layer_norm` (h and gamma None) or `residual_modulated_layer_norm` takes these
    inputs: x (B, L, C) with C ≤ 4096, h like x, modulations (B, 1, C) or (1, 1, C), all float16,
    bfloat16 or float32 (any mix), on CUDA (or on the CPU under TRITON_INTERPRET=1)."""
    if (h is None) != (gamma is None):
        return False
    mods = {"scale": scale, "shift": shift, **({} if gamma is None else {"gamma": gamma})}
    return _problem(x, mods, h, out_dtype) is None


def _check(function: str, x, mods, h=None, out_dtype=None):
    problem = _problem(x, mods, h, out_dtype)
    if problem is not None:
        raise ValueError(f"{function}: {problem}")


def modulated_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = layer_norm(x, eps, no affine) · (1 + scale) + shift, statistics and arithmetic in float32.

    x: (B, L, C), any strides. scale, shift: (B, 1, C) or (1, 1, C) (any strides, e.g. views of one
    (B, 1, 6, C) tensor). Returns a contiguous (B, L, C) tensor of `out_dtype` (x's dtype if None).
    Differentiable in x, scale and shift."""
    _check("modulated_layer_norm", x, {"scale": scale, "shift": shift}, out_dtype=out_dtype)
    y, _, _ = _mln_fwd_op(x, scale, shift, float(eps), out_dtype or x.dtype)
    return y


def residual_modulated_layer_norm(x: torch.Tensor, h: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor,
                                  shift: torch.Tensor, eps: float,
                                  out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, y): x1 = x + h · gamma in x's dtype, y = layer_norm(x1, eps) · (1 + scale) + shift in
    `out_dtype` (x's dtype if None), float32 arithmetic, one pass.

    x, h: (B, L, C), any strides. gamma, scale, shift: (B, 1, C) or (1, 1, C). Returns contiguous
    (B, L, C) tensors. Differentiable in x, h, gamma, scale and shift (x1 may take a gradient too)."""
    _check("residual_modulated_layer_norm", x, {"gamma": gamma, "scale": scale, "shift": shift}, h, out_dtype)
    x1, y, _, _ = _rmln_fwd_op(x, h, gamma, scale, shift, float(eps), out_dtype or x.dtype)
    return x1, y
