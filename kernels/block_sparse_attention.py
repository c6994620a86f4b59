"""Block-sparse attention over a sequence of scales, in Triton: forward, backward, autograd wrapper.

The sequence is cut into blocks (HMAR's scales: 1, 4, 9, ... tokens). With the `block_diagonal`
pattern a query attends to the keys of its own block; with `block_causal` to its own block and all
earlier ones. Every query therefore attends to one contiguous key range ``[lo[i], hi[i])``, and every
key is attended by one contiguous query range ``[clo[j], chi[j])``. Both are int32 arrays of length N.

Work is cut along the block structure, on the host, once per (block sizes, pattern, device):

* Row tiles never straddle a block boundary, except that consecutive blocks smaller than the tile
  are packed together into one tile. A tile therefore needs the union of its rows' key ranges
  ``[ul, uh)`` and nothing else (no fully-masked key tile is ever visited), and keys inside the
  intersection ``[il, ih)`` need no mask at all: the kernels run a masked loop over the head of the
  range, an unmasked loop over its middle and a masked loop over its tail.
* Tiles are ordered by decreasing work (longest key range first) so the long ones start first.
* The tables for every tile size the configurations use are packed into one int32 tensor with a
  small header, so that Triton's autotuner may pick the tile size (keyed on N, head dim, pattern).

Passes: forward (online softmax in base 2, saves the row log-sum-exp; on long key ranges the middle
key tiles after the first keep the running maximum fixed, which drops the per-score maximum and the
per-tile rescaling, and a second launch redoes, with a running maximum, the rare tiles where a later
score outgrew it), backward preprocess
(delta = rowsum(dO * O)), a dK/dV pass over key tiles (loops over the queries that see them) and a
separate dQ pass over query tiles: no atomics, each output written exactly once.

Precision: fp16/bf16 operands with fp32 accumulation; fp32 inputs use exact-fp32 ("ieee") dots.

torch.compile: the passes are custom operators, ``torch.ops.hmar.block_sparse_attn_fwd`` (returns the
output and the log-sum-exp) and ``torch.ops.hmar.block_sparse_attn_bwd`` (dq, dk, dv), defined with
``torch.library.custom_op`` with fake implementations; autograd connects them. Compiled code traces
`block_sparse_attention` without a graph break: Inductor fuses the work around the attention (the
q/k normalisation, reshapes) and calls the operators, which launch the kernels. (They are not
``torch.library.triton_op``s, which Inductor would compile itself: torch's analysis of what each
kernel writes fails on them.) The layout enters the operators as one int32
tensor plus 10 ints (see `Layout`).

Eagerly, the wrapper launches the same kernels without the dispatcher, through a plain autograd
Function (none where no input needs a gradient), and keeps a plan per input key (shapes, strides,
dtypes, devices, block sizes, pattern, scale; see `_Plan`): a call with a known key skips the checks
and repeats the launches an earlier call kept, with its own tensors (`launch.launch_and_keep`).
"""
from __future__ import annotations

import math
import operator
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import devices
from .launch import launch, launch_and_keep
from .reference import PATTERNS

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE_SIZES = (16, 32, 64, 128)  # row-tile sizes the tables are built for (header slots 0..3)
_RECORD = 8  # int32 words per tile record: r0, r1, ul, uh, il, ih, pad, pad
_HEADER = 8  # offsets of the four tables, then their tile counts
LOG2E = 1.4426950408889634
FROZEN_L_LIMIT = tl.constexpr(4.0e9)  # ~2**32: above it a tile's fixed softmax reference is redone
FP32_FINITE = tl.constexpr(3.0e38)  # just under float32's largest value: a larger |accumulator| overflowed
# The forward takes the fixed softmax reference (MODE 1, plus a launch for the rare tiles to redo) when
# some query attends to at least this many keys: it pays off on long key ranges; on short ones the
# extra launch costs what it saves.
FROZEN_MIN_KEYS = 2048


# --------------------------------------------------------------------------------------------
# Host-side layout: per-token ranges and per-tile tables
# --------------------------------------------------------------------------------------------

def _ranges(block_sizes: tuple[int, ...], pattern: str):
    sizes = np.asarray(block_sizes, dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    n = int(ends[-1])
    tok_start = np.repeat(starts, sizes)
    tok_end = np.repeat(ends, sizes)
    if pattern == "block_diagonal":
        lo, hi = tok_start, tok_end  # query i sees keys [block start, block end)
        clo, chi = tok_start, tok_end  # key j is seen by queries [block start, block end)
    else:
        lo, hi = np.zeros(n, np.int64), tok_end  # own block and everything before it
        clo, chi = tok_start, np.full(n, n, np.int64)  # own block and everything after it
    return starts, ends, lo, hi, clo, chi


def _tiles(starts, ends, lo, hi, tile: int) -> np.ndarray:
    """Row tiles aligned to blocks (small consecutive blocks packed), ordered longest range first."""
    spans = []
    i, nb = 0, len(starts)
    while i < nb:
        size = int(ends[i] - starts[i])
        if size >= tile:
            for r0 in range(int(starts[i]), int(ends[i]), tile):
                spans.append((r0, min(r0 + tile, int(ends[i]))))
            i += 1
            continue
        j = i
        while j + 1 < nb and ends[j + 1] - starts[i] <= tile:
            j += 1
        spans.append((int(starts[i]), int(ends[j])))
        i = j + 1
    rec = np.zeros((len(spans), _RECORD), np.int64)
    for t, (r0, r1) in enumerate(spans):
        rec[t, :6] = (r0, r1, lo[r0:r1].min(), hi[r0:r1].max(), lo[r0:r1].max(), hi[r0:r1].min())
    order = np.argsort(-(rec[:, 3] - rec[:, 2]), kind="stable")
    return rec[order]


def _bank(starts, ends, lo, hi) -> np.ndarray:
    header = np.zeros(_HEADER, np.int64)
    parts, offset = [], _HEADER
    for slot, tile in enumerate(TILE_SIZES):
        rec = _tiles(starts, ends, lo, hi, tile)
        header[slot], header[4 + slot] = offset, len(rec)
        parts.append(rec.reshape(-1))
        offset += rec.size
    return np.concatenate([header] + parts)


def _padded(n: int) -> int:
    return -(-n // 4) * 4  # table segments start 16-byte aligned


def _split_table(table: torch.Tensor, meta: Sequence[int], n: int):
    """Views of the packed table: (lo, hi, clo, chi, row bank, column bank)."""
    n4 = _padded(n)
    rows = _HEADER + _RECORD * sum(meta[1:5])
    cols = _HEADER + _RECORD * sum(meta[5:9])
    base = 4 * n4
    return (table[0:n], table[n4:n4 + n], table[2 * n4:2 * n4 + n], table[3 * n4:3 * n4 + n],
            table[base:base + rows], table[base + rows:base + rows + cols])


class Layout:
    """Device tables for one (block sizes, pattern, device); built once and cached.

    The kernels' tables are packed into one int32 tensor, `table`: the per-token ranges lo, hi, clo,
    chi (each padded to a multiple of 4 entries), then the row-tile bank and the column-tile bank.
    `meta` = (pattern key, row tiles per tile size (4 ints), column tiles per tile size (4 ints), the
    longest key range of a query): with N (the tokens) it is all the host needs to cut the table, size
    the grids and choose the forward's mode. The custom
    operators take `table` and `meta`, nothing else about the layout.
    """

    def __init__(self, block_sizes: tuple[int, ...], pattern: str, device: torch.device):
        starts, ends, lo, hi, clo, chi = _ranges(block_sizes, pattern)
        self.block_sizes, self.pattern, self.n = block_sizes, pattern, int(ends[-1])
        if self.n >= 2**31 // 2:
            raise ValueError(f"block_sparse_attention: {self.n} tokens is more than this kernel indexes")
        row_bank, col_bank = _bank(starts, ends, lo, hi), _bank(starts, ends, clo, chi)
        n4 = _padded(self.n)
        pad = lambda a: np.concatenate([a, np.zeros(n4 - self.n, np.int64)])  # noqa: E731
        packed = np.concatenate([pad(lo), pad(hi), pad(clo), pad(chi), row_bank, col_bank])
        self.table = torch.as_tensor(np.ascontiguousarray(packed, dtype=np.int32), device=device)
        self.row_ntiles = {t: int(row_bank[4 + s]) for s, t in enumerate(TILE_SIZES)}
        self.col_ntiles = {t: int(col_bank[4 + s]) for s, t in enumerate(TILE_SIZES)}
        self.pattern_key = 10 * (1 + PATTERNS.index(pattern))  # autotune key (never 1 nor %16)
        self.meta = (self.pattern_key, *self.row_ntiles.values(), *self.col_ntiles.values(), int((hi - lo).max()))
        self.tables = _split_table(self.table, self.meta, self.n)  # views: lo, hi, clo, chi, row bank, column bank
        self.lo, self.hi, self.clo, self.chi, self.row_tab, self.col_tab = self.tables
        # useful (unmasked) query-key pairs, for FLOP counts
        self.pairs = int((hi - lo).sum())


@lru_cache(maxsize=64)
def _layout_cached(block_sizes: tuple[int, ...], pattern: str, device: torch.device) -> Layout:
    return Layout(block_sizes, pattern, device)


def get_layout(block_sizes: Sequence[int], pattern: str, device) -> Layout:
    return _layout_cached(tuple(int(b) for b in block_sizes), pattern, torch.device(device))


@torch.compiler.assume_constant_result
def _layout_args(block_sizes: tuple[int, ...], pattern: str, device: torch.device):
    """(table, meta) for the operators. Under torch.compile this runs once, while tracing, and its
    result enters the graph as a constant (block sizes, pattern and device are guarded constants of
    the call), so the layout is neither rebuilt nor re-traced per call."""
    layout = _layout_cached(block_sizes, pattern, device)
    return layout.table, layout.meta


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _tile_record(TAB, TILE: tl.constexpr):
    """This program's (tile, batch*head) and the tile's six table entries."""
    if TILE == 16:
        slot = 0
    elif TILE == 32:
        slot = 1
    elif TILE == 64:
        slot = 2
    else:
        slot = 3
    base = tl.load(TAB + slot)
    ntiles = tl.load(TAB + 4 + slot)
    pid = tl.program_id(0)
    tile = pid % ntiles
    bh = pid // ntiles
    rec = TAB + base + tile * 8
    r0 = tl.load(rec)
    r1 = tl.load(rec + 1)
    ul = tl.load(rec + 2)
    uh = tl.load(rec + 3)
    il = tl.load(rec + 4)
    ih = tl.load(rec + 5)
    return bh, r0, r1, ul, uh, il, ih


@triton.jit
def _phases(ul, uh, il, ih, STEP: tl.constexpr):
    """Split [ul, uh) (steps of STEP from ul) into masked head [ul, a), unmasked [a, b), masked tail."""
    a = ul + tl.cdiv(tl.maximum(il - ul, 0), STEP) * STEP
    b = a + (tl.maximum(ih - a, 0) // STEP) * STEP
    return tl.minimum(a, uh), a, b


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the CPU interpreter multiplies bf16 wrongly; the GPU path never sets it.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start, end, bound,
              lo, hi, qk_scale, offs_d,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # qk_scale > 0 (the host flips q's sign for a negative scale), so the running maximum can be taken
    # over the raw scores and each unmasked score scaled and shifted in one FMA.
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :] * skd
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :] * svd
        if MASKED:
            n_ok = offs_n < bound
            k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = _mm(q, tl.trans(k), None, PREC, UPCAST)
        if MASKED:
            ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            s = tl.where(ok, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = _mm(p.to(v.dtype), v, acc, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_loop_frozen(acc, l_i, m_ref, q, k_base, v_base, skn, skd, svn, svd, start, end, qk_scale, offs_d,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Unmasked key tiles after the first: exponentials relative to a fixed reference m_ref (the running
    # maximum so far) instead of a running maximum. Softmax does not depend on the reference, so this is
    # exact as long as no 2**(score - m_ref) overflows, which the caller checks; per score it saves the
    # maximum and per output element the rescaling, and the P.V product becomes a plain accumulation.
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd)
        s = _mm(q, tl.trans(k), None, PREC, UPCAST)
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])
        l_i += tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd)
        acc = _mm(p.to(v.dtype), v, acc, PREC, UPCAST)
    return acc, l_i


@triton.jit
def _fwd_tile(q, k_base, v_base, skn, skd, svn, svd, ul, uh, il, ih, lo, hi, qk_scale, offs_d,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, FROZEN: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One row tile's (acc, l, m): masked head, unmasked middle, masked tail of its key range."""
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: rows with no key yet stay NaN-free
    a_end, a, b_end = _phases(ul, uh, il, ih, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, ul, a_end, uh,
                              lo, hi, qk_scale, offs_d, BLOCK_N, True, PREC, UPCAST)
    if FROZEN:
        # The first unmasked key tile updates the running maximum (every row has then seen a key); the
        # rest of the middle keeps it as a fixed reference.
        peel = tl.minimum(a + BLOCK_N, b_end)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, a, peel, uh,
                                  lo, hi, qk_scale, offs_d, BLOCK_N, False, PREC, UPCAST)
        acc, l_i = _fwd_loop_frozen(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, peel, b_end,
                                    qk_scale, offs_d, BLOCK_N, PREC, UPCAST)
    else:
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, a, b_end, uh,
                                  lo, hi, qk_scale, offs_d, BLOCK_N, False, PREC, UPCAST)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, b_end, uh, uh,
                              lo, hi, qk_scale, offs_d, BLOCK_N, True, PREC, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, TAB, LO, HI, REDO,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
              H, N, qk_scale, KEY_PATTERN,
              HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, MODE: tl.constexpr = 0):
    # MODE 0: a running maximum throughout. MODE 1: the middle key tiles after the first use a fixed
    # softmax reference (see _fwd_loop_frozen); REDO[program] = 1 where it did not hold (a later score
    # above it by ~32 or more in log2 units: l passes 2**32 or overflows), else 0. MODE 2: the same grid
    # again, computing only the tiles REDO marks, with a running maximum (overwriting their outputs).
    if MODE == 2:
        if tl.load(REDO + tl.program_id(0)) == 0:
            return
    bh, r0, r1, ul, uh, il, ih = _tile_record(TAB, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    m_ok = offs_m < r1
    rows = tl.minimum(offs_m, r1 - 1)  # padding rows behave like the tile's last row, never stored
    lo = tl.load(LO + rows)
    hi = tl.load(HI + rows)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    acc, l_i, m_i = _fwd_tile(q, k_base, v_base, skn, skd, svn, svd, ul, uh, il, ih, lo, hi, qk_scale, offs_d,
                              BLOCK_M, BLOCK_N, HEAD_D, MODE == 1, PREC, UPCAST)
    if MODE == 1:
        held = (l_i < FROZEN_L_LIMIT) & (tl.max(tl.abs(acc), 1) < FP32_FINITE)
        tl.store(REDO + tl.program_id(0), 1 - tl.min(held.to(tl.int32), 0))
    acc = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
               start, end, bound, clo, chi, qk_scale, offs_d,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd
        do_ptrs = do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd
        if MASKED:
            m_ok = offs_m < bound
            q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(lse_base + offs_m)
        st = _mm(k, tl.trans(q), None, PREC, UPCAST)
        if MASKED:
            ok = (offs_m[None, :] >= clo[:, None]) & (offs_m[None, :] < chi[:, None])
            st = tl.where(ok, st * qk_scale, float("-inf"))
        else:
            st = st * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            do = tl.load(do_ptrs, mask=m_ok[:, None], other=0.0)
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_base + offs_m)
        dv = _mm(pt.to(do.dtype), do, dv, PREC, UPCAST)
        dpt = _mm(v, tl.trans(do), None, PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk = _mm(dst.to(q.dtype), q, dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, TAB, CLO, CHI,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdb, sdh, sdn, sdd, skgb, skgh, skgn, skgd, svgb, svgh, svgn, svgd,
                   H, N, qk_scale, sm_scale, KEY_PATTERN,
                   HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Rows of this program are keys [r0, r1); it loops over the queries that attend to them.
    bh, r0, r1, ul, uh, il, ih = _tile_record(TAB, BLOCK_N)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = r0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    n_ok = offs_n < r1
    cols = tl.minimum(offs_n, r1 - 1)
    clo = tl.load(CLO + cols)
    chi = tl.load(CHI + cols)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None], other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    lse_base = LSE + bh.to(tl.int64) * N
    delta_base = DELTA + bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    a_end, a, b_end = _phases(ul, uh, il, ih, BLOCK_M)
    dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                        ul, a_end, uh, clo, chi, qk_scale, offs_d, BLOCK_M, True, PREC, UPCAST)
    dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                        a, b_end, uh, clo, chi, qk_scale, offs_d, BLOCK_M, False, PREC, UPCAST)
    dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd,
                        b_end, uh, uh, clo, chi, qk_scale, offs_d, BLOCK_M, True, PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + b * skgb + h * skgh + offs_n[:, None] * skgn + offs_d[None, :] * skgd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + b * svgb + h * svgh + offs_n[:, None] * svgn + offs_d[None, :] * svgd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_loop(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, start, end, bound,
             lo, hi, qk_scale, offs_d,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :] * skd
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :] * svd
        if MASKED:
            n_ok = offs_n < bound
            k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _mm(q, tl.trans(k), None, PREC, UPCAST)
        if MASKED:
            ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
            s = tl.where(ok, s * qk_scale, float("-inf"))
        else:
            s = s * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        dp = _mm(do, tl.trans(v), None, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mm(ds.to(k.dtype), k, dq, PREC, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, TAB, LO, HI,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sob, soh, son, sod, sdb, sdh, sdn, sdd, sqgb, sqgh, sqgn, sqgd,
                 H, N, qk_scale, sm_scale, KEY_PATTERN,
                 HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh, r0, r1, ul, uh, il, ih = _tile_record(TAB, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    m_ok = offs_m < r1
    rows = tl.minimum(offs_m, r1 - 1)
    lo = tl.load(LO + rows)
    hi = tl.load(HI + rows)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=m_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows)
    # delta = rowsum(dO * O) for this tile's rows (tiles partition the rows: each written once);
    # the dK/dV pass, launched after this one, reads it.
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=m_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=m_ok)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    a_end, a, b_end = _phases(ul, uh, il, ih, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, ul, a_end, uh,
                  lo, hi, qk_scale, offs_d, BLOCK_N, True, PREC, UPCAST)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, a, b_end, uh,
                  lo, hi, qk_scale, offs_d, BLOCK_N, False, PREC, UPCAST)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, b_end, uh, uh,
                  lo, hi, qk_scale, offs_d, BLOCK_N, True, PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b * sqgb + h * sqgh + offs_m[:, None] * sqgn + offs_d[None, :] * sqgd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


# --------------------------------------------------------------------------------------------
# Configurations: (row tile, inner tile, warps, stages). The row tile picks the table.
# --------------------------------------------------------------------------------------------

FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
               (64, 128, 4, 3), (64, 32, 4, 2), (128, 64, 4, 4)]
DKDV_CONFIGS = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2)]


def default_config(pass_name: str, head_d: int, dtype: torch.dtype):
    """The configuration used when autotuning is off (HMAR_ATTN_AUTOTUNE=0, read whenever a pass is
    launched through Triton: not by an eager call that repeats kept launches) or under the interpreter."""
    if devices.INTERPRETING:
        return (16, 16, 1, 1)  # small tiles so the CPU tests cross tile edges
    if dtype == torch.float32:
        return (64, 32, 4, 2)
    if head_d >= 128:
        return {"fwd": (128, 64, 8, 2), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2)}[pass_name]
    return {"fwd": (128, 64, 4, 3), "dkdv": (128, 64, 8, 3), "dq": (128, 64, 8, 3)}[pass_name]


def _autotuned(kernel, configs, row_key, inner_key):
    cfgs = [triton.Config({row_key: c[0], inner_key: c[1]}, num_warps=c[2], num_stages=c[3]) for c in configs]

    def prune(configs_, named_args, **kwargs):
        head_d = kwargs.get("HEAD_D", named_args.get("HEAD_D", 64) if isinstance(named_args, dict) else 64)
        keep = [c for c in configs_ if not (head_d >= 128 and c.kwargs[row_key] * c.kwargs[inner_key] > 128 * 64)]
        return keep or configs_

    return triton.autotune(cfgs, key=["N", "HEAD_D", "KEY_PATTERN"], prune_configs_by={"early_config_prune": prune})(kernel)


_attn_fwd_tuned = _autotuned(_attn_fwd, FWD_CONFIGS, "BLOCK_M", "BLOCK_N")
_attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv, DKDV_CONFIGS, "BLOCK_N", "BLOCK_M")
_attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq, DQ_CONFIGS, "BLOCK_M", "BLOCK_N")


def _autotune_enabled() -> bool:
    return not devices.INTERPRETING and os.environ.get("HMAR_ATTN_AUTOTUNE", "1") not in ("0", "")


_PICKED: dict = {}  # (pass, N, head dim, pattern, dtype) -> the autotuner's choice, launched directly after


def picked_configs() -> dict:
    """What the autotuner chose so far: {(pass, N, head_dim, pattern_key, dtype): (rows, inner, warps, stages)}."""
    return dict(_PICKED)


def _launch(kernel, tuned, grid_counts, row_key, inner_key, pass_name, config, args, kwargs, key, keep=0):
    """Launch with an explicit config (`config` or the default), or through the autotuner.

    `kernel`, `tuned`: the plain and the autotuned kernel; `key`: (pass, N, head dim, pattern key,
    dtype), the autotuner's cache key here. After the autotuner has run once for a key, later calls
    skip its Python dispatch and launch the chosen configuration directly (at 256 px a pass is short
    enough for the per-call host cost to show).
    `keep` > 0: return the launch again with new leading `keep` arguments
    (`launch.launch_and_keep`), or None where this call autotuned.
    """
    if config is None and _autotune_enabled():
        config = _PICKED.get(key)
        if config is None:
            tuned[lambda meta: (grid_counts[meta[row_key]],)](*args, **kwargs)
            best = tuned.best_config
            _PICKED[key] = (best.kwargs[row_key], best.kwargs[inner_key], best.num_warps, best.num_stages)
            return None
    if config is None:
        config = default_config(pass_name, kwargs["HEAD_D"], key[-1])
    rows, inner, warps, stages = config
    if rows not in TILE_SIZES:
        raise ValueError(f"row tile {rows} not in {TILE_SIZES}")
    compile_options = {} if devices.INTERPRETING else dict(num_warps=warps, num_stages=stages)
    kwargs = {**kwargs, row_key: rows, inner_key: inner, **compile_options}
    if keep:
        return launch_and_keep(kernel, (grid_counts[rows],), args, kwargs, keep)
    launch(kernel, (grid_counts[rows],), args, kwargs)
    return None


def _strides(t):
    return tuple(t.stride())


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _counts(ntiles: Sequence[int], bh) -> dict:
    return {t: n * bh for t, n in zip(TILE_SIZES, ntiles)}


# The passes below launch, or (`kept`) repeat launches kept by an earlier call whose tensors had the
# same shapes, strides, dtype, device and alignment (see `_Plan`): each kernel takes the tensors first
# (a kept launch takes them anew), then what the layout and the shapes fix.
_FWD_HEAD = 9  # q, k, v, out, lse, the row tiles, lo, hi, redo
_BWD_HEAD = 8  # the dq pass: q, k, v, out, do, dq, lse, delta; the dK/dV pass: q, k, v, do, dk, dv, lse, delta


def _forward(q, k, v, out, lse, tables, meta, scale, config, kept=None, keep=False):
    """The forward's launches; with `keep`, returns them kept (None where this call autotuned)."""
    B, H, N, D = q.shape
    if scale < 0:  # the kernel needs a positive scale: softmax(c·q·kᵀ) = softmax(|c|·(−q)·kᵀ), negation exact
        q, scale = -q, -scale
    frozen = len(kept) > 1 if kept else meta[9] >= FROZEN_MIN_KEYS  # kept: the mode they were kept in
    redo = torch.empty(max(meta[1:5]) * B * H, device=q.device, dtype=torch.int32) if frozen else lse
    lo, hi, _, _, row_tab, _ = tables
    if kept:
        for again in kept:
            again(q, k, v, out, lse, row_tab, lo, hi, redo)
        return kept
    kernel, tuned = _attn_fwd, _attn_fwd_tuned
    upcast = devices.INTERPRETING and q.dtype == torch.bfloat16
    counts = _counts(meta[1:5], B * H)
    args = (q, k, v, out, lse, row_tab, lo, hi, redo,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, N, scale * LOG2E, meta[0])
    kwargs = dict(HEAD_D=D, PREC=_precision(q.dtype), UPCAST=upcast)
    key = ("fwd", N, D, meta[0], q.dtype)
    head = _FWD_HEAD if keep else 0
    launched = [_launch(kernel, tuned, counts, "BLOCK_M", "BLOCK_N", "fwd", config, args, dict(kwargs, MODE=int(frozen)),
                        key, head)]
    if frozen:  # the tiles whose fixed reference did not hold, again (same configuration, so the same grid)
        launched.append(_launch(kernel, tuned, counts, "BLOCK_M", "BLOCK_N", "fwd", config, args, dict(kwargs, MODE=2),
                                key, head))
    return launched if keep and all(launched) else None


def _backward(do, q, k, v, out, lse, dq, dk, dv, tables, meta, scale, dq_config, dkdv_config, kept=None, keep=False):
    """The backward's launches (dQ with delta, then dK/dV); `kept`/`keep` as in `_forward`."""
    B, H, N, D = q.shape
    delta = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    if kept:
        dq_again, dkdv_again = kept
        dq_again(q, k, v, out, do, dq, lse, delta)
        dkdv_again(q, k, v, do, dk, dv, lse, delta)
        return kept
    lo, hi, clo, chi, row_tab, col_tab = tables
    dq_kernel, dq_tuned = _attn_bwd_dq, _attn_bwd_dq_tuned
    dkdv_kernel, dkdv_tuned = _attn_bwd_dkdv, _attn_bwd_dkdv_tuned
    upcast = devices.INTERPRETING and q.dtype == torch.bfloat16
    kwargs = dict(HEAD_D=D, PREC=_precision(q.dtype), UPCAST=upcast)
    head = _BWD_HEAD if keep else 0
    args = (q, k, v, out, do, dq, lse, delta, row_tab, lo, hi,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq),
            H, N, scale * LOG2E, scale, meta[0])
    launched = [_launch(dq_kernel, dq_tuned, _counts(meta[1:5], B * H), "BLOCK_M", "BLOCK_N", "dq", dq_config, args,
                        kwargs, ("dq", N, D, meta[0], q.dtype), head)]
    args = (q, k, v, do, dk, dv, lse, delta, col_tab, clo, chi,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            H, N, scale * LOG2E, scale, meta[0])
    launched.append(_launch(dkdv_kernel, dkdv_tuned, _counts(meta[5:9], B * H), "BLOCK_N", "BLOCK_M", "dkdv",
                            dkdv_config, args, kwargs, ("dkdv", N, D, meta[0], q.dtype), head))
    return launched if keep and all(launched) else None


def attention_forward(q, k, v, layout: Layout, scale: float, out=None, lse=None, config=None):
    """Forward pass, launched directly (no operator); returns (out, lse). `out`/`lse` may be given
    (tests poison them first)."""
    if out is None:
        out = _new_out(q)
    if lse is None:
        lse = _new_lse(q)
    _forward(q, k, v, out, lse, layout.tables, layout.meta, scale, config)
    return out, lse


def attention_backward(do, q, k, v, out, lse, layout: Layout, scale: float, dq=None, dk=None, dv=None,
                       configs=None):
    """Backward pass, launched directly (no operator); returns (dq, dk, dv). `configs` may hold
    explicit 'dkdv'/'dq' configs."""
    configs = configs or {}
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    _backward(do, q, k, v, out, lse, dq, dk, dv, layout.tables, layout.meta, scale, configs.get("dq"),
              configs.get("dkdv"))
    return dq, dk, dv


def _out_layout(q):
    """(size, stride) of the output: (B, N, H, D) memory seen as (B, H, N, D), so that
    `out.transpose(1, 2).reshape(B, N, H*D)` is free."""
    B, H, N, D = q.shape
    return (B, H, N, D), (N * H * D, D, H * D, 1)


def _new_out(q):
    return torch.empty_strided(*_out_layout(q), device=q.device, dtype=q.dtype)


def _new_lse(q):
    B, H, N, _ = q.shape
    return torch.empty((B * H, N), device=q.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Custom operators (torch.library): what torch.compile traces, and the autograd wrapper
# --------------------------------------------------------------------------------------------
#
# hmar::block_sparse_attn_fwd(q, k, v, table, meta, scale, configs) -> (out, lse)
# hmar::block_sparse_attn_bwd(do, q, k, v, out, lse, table, meta, scale, configs) -> (dq, dk, dv)
#
# `table`, `meta`: the layout (see `Layout`): one int32 tensor and 10 ints, built once per (block
# sizes, pattern, device) by the wrapper. `configs`: 12 ints, explicit (rows, inner, warps, stages)
# for the fwd, dq and dkdv passes in turn, all zero where the pass autotunes (or takes its default):
# tests and benchmarks pin configurations with it.
#
# They are `torch.library.custom_op`s: compiled graphs call them as opaque operators. Their fake
# implementations give the outputs' shapes, dtypes and strides (what torch.compile plans with).

_CONFIG_WORDS = 4
_PASSES = ("fwd", "dq", "dkdv")


def _encode_configs(configs) -> list[int]:
    words = []
    for name in _PASSES:
        c = (configs or {}).get(name)
        if c is None:
            words += [0] * _CONFIG_WORDS
            continue
        if len(c) != _CONFIG_WORDS:
            raise ValueError(f"block_sparse_attention: a {name} config is (rows, inner, warps, stages), got {c!r}")
        words += [int(x) for x in c]
    return words


def _decode_config(words: Sequence[int], name: str):
    i = _PASSES.index(name) * _CONFIG_WORDS
    config = tuple(words[i:i + _CONFIG_WORDS])
    return None if config[0] == 0 else config


@torch.library.custom_op("hmar::block_sparse_attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, meta: Sequence[int],
                 scale: float, configs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    N = q.shape[2]
    out, lse = _new_out(q), _new_lse(q)
    _forward(q, k, v, out, lse, _split_table(table, meta, N), meta, scale, _decode_config(configs, "fwd"))
    return out, lse


@_attn_fwd_op.register_fake
def _attn_fwd_fake(q, k, v, table, meta, scale, configs):
    return _new_out(q), _new_lse(q)


@torch.library.custom_op("hmar::block_sparse_attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, table: torch.Tensor, meta: Sequence[int], scale: float,
                 configs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _backward(do, q, k, v, out, lse, dq, dk, dv, _split_table(table, meta, q.shape[2]), meta, scale,
              _decode_config(configs, "dq"), _decode_config(configs, "dkdv"))
    return dq, dk, dv


@_attn_bwd_op.register_fake
def _attn_bwd_fake(do, q, k, v, out, lse, table, meta, scale, configs):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, table, meta, scale, configs = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table)
    ctx.meta, ctx.scale, ctx.configs = meta, scale, configs
    ctx.mark_non_differentiable(lse)


def _backward_formula(ctx, dout, _dlse):
    q, k, v, out, lse, table = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(dout, q, k, v, out, lse, table, ctx.meta, ctx.scale, ctx.configs)
    return dq, dk, dv, None, None, None, None


_attn_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)

# the operators as torch.ops sees them (what compiled graphs and opcheck call)
attn_fwd_op = torch.ops.hmar.block_sparse_attn_fwd.default
attn_bwd_op = torch.ops.hmar.block_sparse_attn_bwd.default


# --------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------

class _Plan:
    """What eager calls with the same inputs' key (`_plan_key`: shapes, strides, dtypes, devices, block
    sizes, pattern, scale) share: the layout, the checked scale and the launches an earlier call kept.

    A call that finds its plan skips the argument checks (its key equals that of a call that passed
    them) and the building of the kernels' arguments: it allocates its outputs and repeats the kept
    launches with its own tensors. The launches are kept by the first call whose tensors are all
    16-byte aligned (Triton specialises on it; other calls launch through the keyed cache of
    `launch.launch`), the backward's per strides of the incoming gradient.
    """

    __slots__ = ("layout", "scale", "configs", "dtype", "device", "out_size", "out_stride", "lse_size", "fwd", "bwd")
    MAX_BWD = 8  # gradient strides kept per plan (a model gives one or two)

    def __init__(self, q, layout: Layout, scale: float, configs=None):
        B, H, N, D = q.shape
        self.layout, self.scale, self.configs = layout, scale, configs or {}
        self.dtype, self.device = q.dtype, q.device
        self.out_size, self.out_stride = _out_layout(q)
        self.lse_size = (B * H, N)
        self.fwd = None  # the forward's kept launches
        self.bwd = {}  # strides of the output's gradient -> the backward's kept launches

    def forward(self, q, k, v):
        """(out, lse, whether every tensor was 16-byte aligned)."""
        out = torch.empty_strided(self.out_size, self.out_stride, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_size, dtype=torch.float32, device=self.device)
        aligned = not (q.data_ptr() | k.data_ptr() | v.data_ptr() | out.data_ptr() | lse.data_ptr()) & 15
        kept = _forward(q, k, v, out, lse, self.layout.tables, self.layout.meta, self.scale, self.configs.get("fwd"),
                        self.fwd if aligned else None, aligned and self.fwd is None)
        if aligned:
            self.fwd = kept
        return out, lse, aligned

    def backward(self, do, q, k, v, out, lse, aligned: bool):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        aligned = aligned and not (do.data_ptr() | dq.data_ptr() | dk.data_ptr() | dv.data_ptr()) & 15
        strides = do.stride()
        kept = self.bwd.get(strides) if aligned else None
        got = _backward(do, q, k, v, out, lse, dq, dk, dv, self.layout.tables, self.layout.meta, self.scale,
                        self.configs.get("dq"), self.configs.get("dkdv"), kept, aligned and kept is None)
        if got is not None and kept is None:
            if len(self.bwd) >= self.MAX_BWD:
                self.bwd.clear()
            self.bwd[strides] = got
        return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    """The eager path: the operators' computation, launched directly (see `_Plan`)."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse, aligned = plan.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.aligned = plan, aligned
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.plan.backward(do, q, k, v, out, lse, ctx.aligned)
        return dq, dk, dv, None


_PLANS: dict = {}  # _plan_key(...) -> _Plan
_MAX_PLANS = 256  # distinct eager call shapes kept; cleared when full


def _plan_key(q, k, v, block_sizes: tuple, pattern, scale):
    """Everything `_check` and the dtype checks read, and everything the kept launches depend on."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, block_sizes, pattern, scale)


def _autocast_dtype(device_type: str):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _check(q, k, v, block_sizes, pattern, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"block_sparse_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"block_sparse_attention: {name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"block_sparse_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"block_sparse_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if pattern not in PATTERNS:
        raise ValueError(f"block_sparse_attention: unknown pattern {pattern!r}; expected one of {PATTERNS}")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"block_sparse_attention: head_dim {D} is not supported; supported: {HEAD_DIMS}")
    try:
        sizes = tuple(int(b) for b in block_sizes)
    except TypeError:
        raise TypeError("block_sparse_attention: block_sizes must be a sequence of positive ints") from None
    if any(int(b) != b for b in block_sizes) or any(s <= 0 for s in sizes):
        raise ValueError(f"block_sparse_attention: block_sizes must be positive ints, got {list(block_sizes)}")
    # Plain ints even where torch.compile has made them symbolic (dynamic=None, after the sizes
    # changed once): operator.index specialises them (a guard per value), as the layout needs.
    sizes = tuple(operator.index(s) for s in sizes)
    if sum(sizes) != q.shape[2]:
        raise ValueError(f"block_sparse_attention: block_sizes sum to {sum(sizes)} but there are {q.shape[2]} tokens")
    if scale is None:
        scale = D ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"block_sparse_attention: scale must be finite, got {scale}")
    if not devices.runs_on(q.device):
        raise ValueError(f"block_sparse_attention runs on CUDA (or on the CPU under TRITON_INTERPRET=1), got {q.device}; "
                         "use a reference implementation elsewhere")
    return sizes, scale


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_sizes: Sequence[int],
                           pattern: str = "block_diagonal", scale: float | None = None, *, _configs=None) -> torch.Tensor:
    """Softmax attention where query i sees keys of its own block (`block_diagonal`) or of its own and
    all earlier blocks (`block_causal`).

    q, k, v: (batch, heads, tokens, head_dim) on CUDA, fp16/bf16/fp32, any strides, head_dim in
    16/32/64/128. `block_sizes`: positive ints summing to tokens. `scale`: softmax scale, default
    head_dim**-0.5. Differentiable in q, k, v. Under CUDA autocast the inputs are cast to the autocast
    dtype (as SDPA is). Returns (batch, heads, tokens, head_dim) in the inputs' dtype, laid out so that
    ``out.transpose(1, 2)`` is contiguous.

    Traceable by torch.compile without a graph break (fullgraph=True): it calls the custom operator
    ``torch.ops.hmar.block_sparse_attn_fwd`` (backward: ``hmar.block_sparse_attn_bwd``), and the
    layout for the block sizes enters the graph as a constant. Block sizes must be static: a compiled
    function specialises on them (one compilation per distinct block sizes).
    """
    plan = None
    if _configs is None and type(q) is torch.Tensor and not torch.compiler.is_compiling():
        # An eager call like an earlier one (same key) needs none of the checks below again.
        try:
            block_sizes = tuple(block_sizes)
            plan = _PLANS.get(_plan_key(q, k, v, block_sizes, pattern, scale))
        except (AttributeError, TypeError):  # not tensors, sizes not a sequence, unhashable: checked below
            pass
        if plan is not None and _autocast_dtype(plan.device.type) not in (None, plan.dtype):
            plan = None
    if plan is None:
        sizes, checked_scale = _check(q, k, v, block_sizes, pattern, scale)
        cast = _autocast_dtype(q.device.type)
        if cast is not None and q.dtype in DTYPES:
            q, k, v = q.to(cast), k.to(cast), v.to(cast)
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"block_sparse_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if q.dtype not in DTYPES:
            raise ValueError(f"block_sparse_attention: dtype {q.dtype} is not supported; supported: fp16, bf16, fp32")
        if q.numel() == 0:
            return (q + k + v) * 0.0
        if torch.compiler.is_compiling() or type(q) is not torch.Tensor:
            # traced (torch.compile, export, fake or functional tensors): the operator
            table, meta = _layout_args(sizes, pattern, q.device)
            out, _ = attn_fwd_op(q, k, v, table, list(meta), checked_scale, _encode_configs(_configs))
            return out
        plan = _new_plan(q, k, v, block_sizes, sizes, pattern, scale, checked_scale, _configs)
    # Eagerly the kernels are launched without the dispatcher: the operator's Python dispatch would
    # add about as much host time per forward+backward as the kernels take at 256 px.
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _BlockSparseAttention.apply(q, k, v, plan)
    return plan.forward(q, k, v)[0]


def _new_plan(q, k, v, block_sizes, sizes: tuple[int, ...], pattern: str, scale, checked_scale: float, configs) -> _Plan:
    """The plan of checked (and autocast) inputs: found under their key or built. Kept only under a key
    of plain numbers: a tensor among the block sizes or as the scale would be hashed by identity, and
    could change in place."""
    plain = configs is None and isinstance(block_sizes, tuple) and all(type(b) is int for b in block_sizes) \
        and (scale is None or type(scale) in (int, float))
    key = _plan_key(q, k, v, block_sizes, pattern, scale) if plain else None
    plan = _PLANS.get(key) if plain else None
    if plan is None:
        plan = _Plan(q, _layout_cached(sizes, pattern, q.device), checked_scale, configs)
        if plain:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan
