"""Fused Triton kernels of a LoRA² layer: the frozen linear, the rank-k adapter and its k × k core.

    y = x·Wᵀ + b + (d(x)·A₁ᵀ)·(B₂·C)ᵀ,   C = s·A₂·diag(λ⊙m)·B₁ (k × k),   s = α/r (or α/kept)

d(x) is adapter dropout (PEFT's semantics: the base sees x, the adapter sees dropout(x)); the keep
mask is Philox noise of (seed, (column // 4, row)), one evaluation per four columns, the seed read from
the device; generated in the forward and again in the backward, never stored. The reference of every function here is lora2_kernels/reference.py.

Launches of one training step of one layer (counted by tests/test_device_work.py):

``cast_factors_kernel`` (only where the factors' dtype is not the activations', e.g. an fp32 adapter on a
    bf16 base): A₁ and B₂ in the activation dtype, one launch for both, so no K loop converts an operand
    (a cast inside the loop serialises Hopper's wgmma).
``forward_kernel``: y and h = d(x)·A₁ᵀ (fp32, saved), in row bands (``column_groups``): a
    program streams its row tile's x once for h (the keep mask drawn there), folds the k × k core in once
    (z = h·Cᵀ), then runs the base GEMM's K loop for each column tile of its run and adds z·B₂ᵀ in the
    epilogue. The rank-k product and the mask cost once per row tile and column group, not once per output
    tile. (Over a 4-bit W on Hopper the GEMM runs transposed, the dequantised tile as the register operand.)
``dx_kernel``: row bands as well. A program streams its row tile's dY once for gB = dY·B₂ (group 0 also
    takes the row tile's partials of dB₂ = dYᵀ·(h·Cᵀ) and dC = gBᵀ·h there), turns it into g = gB·C, then runs
    dY·W's K loop for each column tile and adds (g·A₁)⊙keep/(1−p) in the epilogue; the partial of
    dA₁ = gᵀ·d(x) in a pass over x of its own (with dropout: in the tiles' epilogues, with the same mask).
    Per-row-tile partials, fixed-order sums: no atomics, deterministic.
``finish_kernel``: sums the partials (dB₂, dA₁, dC) and turns dC into dλ, dB₁ and dA₂.

So 4 launches a step (3 where the factors already have the activations' dtype), against 2 for the frozen
nn.Linear and 17 for PEFT LoRA; the cuBLAS split (`base_gemm`) adds a torch.mm each way where it is faster.

Several adapters over one frozen base (a learning-rate sweep in one run) take the same launches: the factors
stacked (adapters, ...), the batch's rows in one segment per adapter, and a segment table on the device
(``Factors.segments``). Each row tile belongs to one adapter (``_row_band`` finds which), so its rank-k work
reads that adapter's factors and its partials are that adapter's; the finish sums each adapter's own tiles.
W's K loops are shared: the base GEMM runs once for every adapter's rows, as LoRAFusion's multi-LoRA kernel
does with its per-block adapter table.

Rank tiles are padded to BLOCK_R = max(16, next power of two of k) (and BLOCK_RR for r) with
masked loads (Triton 3.6 rejects a tl.dot whose K is below 16). All rank-k quantities accumulate
in fp32; the k × k core products use IEEE fp32 dots. Sizes need not be multiples of any block.

Autotuning: small config sets, keyed by the power-of-two bucket of the token count, cached on
disk; `warmup()` runs it up front. Under ``TRITON_INTERPRET=1`` (CPU tensors, CI) a fixed small
config runs, which crosses every tile boundary in the tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The k and r the kernels cover; larger take the reference path (and say so). At k = 64 every tile
# shape spills registers on sm_80 and sm_90 (compile_all), so the fused kernels stop at 32.
MAX_RANK = 32

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton 3.6's interpreter keeps bf16 as uint16 and its tl.dot multiplies those bit patterns as
# integers (runtime/interpreter.py, create_dot). Under the interpreter only, dot operands are
# upcast to fp32 first; bf16·bf16 products are exact in fp32, so this computes what the GPU's
# bf16 tensor-core dot computes. Compiled for a GPU, this is False and no cast is emitted.
DOT_OPERANDS_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if DOT_OPERANDS_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _core(q_up_ptr, sv_ptr, mask_ptr, p_down_ptr, R, RANK, alpha,
          SCALE_BY_KEPT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RR: tl.constexpr):
    """(C, w, s): C = s·A₂·diag(λ⊙m)·B₁ (BLOCK_R × BLOCK_R, fp32), w = s·λ⊙m, s = α/r or α/kept."""
    ri = tl.arange(0, BLOCK_RR)  # singular values
    ki = tl.arange(0, BLOCK_R)  # inner width
    r_ok = ri < R
    k_ok = ki < RANK
    lam = tl.load(sv_ptr + ri, mask=r_ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + ri, mask=r_ok, other=0.0).to(tl.float32)
    if SCALE_BY_KEPT:
        s = alpha / tl.maximum(tl.sum(m, axis=0), 1.0)
    else:
        s = alpha / R
    w = lam * m * s
    a2 = tl.load(p_down_ptr + ki[:, None] * R + ri[None, :], mask=k_ok[:, None] & r_ok[None, :],
                 other=0.0).to(tl.float32)  # A₂: k × r
    b1 = tl.load(q_up_ptr + ri[:, None] * RANK + ki[None, :], mask=r_ok[:, None] & k_ok[None, :],
                 other=0.0).to(tl.float32)  # B₁: r × k
    return tl.dot(a2 * w[None, :], b1, input_precision="ieee"), w, s


@triton.jit
def _load_weight(w_ptr, offsets, ok, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, dtype: tl.constexpr,
                 QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr):
    """A tile of W at element ``offsets`` of its row-major (out × in) layout, in ``dtype``.

    QUANT 0: W itself. QUANT 1 / 2: bitsandbytes' 4-bit W (NF4 or FP4, whichever ``code`` holds),
    dequantised here, inside the K loop, so no full-precision W is ever written: two values a byte
    (high nibble first), value = code[nibble] · absmax[element // QBLOCK]. With 2 (double
    quantisation) absmax is itself 8-bit: absmax = code2[absmax_q] · absmax2[block // QBLOCK2] + offset (read from the
    device: a float argument would make the host read it, a sync every launch).
    fp32 products rounded once to ``dtype``: what bitsandbytes' dequantize_4bit computes."""
    if QUANT == 0:
        return tl.load(w_ptr + offsets, mask=ok, other=0.0)
    offsets = offsets.to(tl.int32)  # a weight has < 2³¹ values (the host checks): half the index registers
    packed = tl.load(w_ptr + (offsets >> 1), mask=ok, other=0).to(tl.int32)
    nibble = (packed >> ((1 - (offsets & 1)) << 2)) & 15  # even elements: the high nibble
    value = tl.load(code_ptr + nibble)  # a 16-entry table: stays in L1
    block = offsets // QBLOCK
    if QUANT == 2:
        scale = tl.load(code2_ptr + tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32))
        scale = scale * tl.load(absmax2_ptr + block // QBLOCK2, mask=ok, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    return (value * scale).to(dtype)


@triton.jit
def _keep(seed_ptr, rows, col0, BLOCK_COLS: tl.constexpr, p):
    """Adapter-dropout keep mask of rows ``rows`` × columns [col0, col0 + BLOCK_COLS) of an input (col0 a
    multiple of 4). Philox with the 64-bit key at ``seed_ptr`` (on the device: drawn there by torch's
    generator, so a captured CUDA graph draws a new one each replay) at the counter (column // 4, row), two
    32-bit words: each evaluation gives four values, one per column of its quad, so a tile costs a quarter of
    the Philox rounds of one evaluation per element. No mask repeats within 2³² rows and 2³⁴ columns.
    The key is loaded here, with a volatile load the compiler cannot hoist: held in registers through a K
    loop, its ten rounds' keys spilled the 4-bit kernels on sm_80."""
    QUADS: tl.constexpr = BLOCK_COLS // 4
    shape: tl.constexpr = (rows.shape[0], QUADS)
    c0 = tl.broadcast_to((col0 // 4 + tl.arange(0, QUADS))[None, :].to(tl.int32), shape)
    c1 = tl.broadcast_to(rows[:, None].to(tl.int32), shape)
    zero = tl.zeros(shape, dtype=tl.int32)
    r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr, volatile=True), c0, c1, zero, zero)
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4q + i takes r_i of quad q
    return tl.uint_to_uniform_float(bits) >= p


@triton.jit
def cast_factors_kernel(a_ptr, a_out_ptr, A_NUMEL, b_ptr, b_out_ptr, B_ROWS, B_COLS, BLOCK: tl.constexpr):
    """A (contiguous) cast, and B (B_ROWS × B_COLS, contiguous) cast and transposed, in one launch:
    programs past A's do B. Bᵀ is what the dX kernel's K loop reads along its contiguous dimension
    (B₂ is out × k: its rows are k ≤ 64 wide, too narrow and too masked for an async copy)."""
    pid = tl.program_id(0)
    a_programs = tl.cdiv(A_NUMEL, BLOCK)
    if pid < a_programs:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < A_NUMEL
        tl.store(a_out_ptr + offs, tl.load(a_ptr + offs, mask=ok).to(a_out_ptr.dtype.element_ty), mask=ok)
    else:
        offs = (pid - a_programs) * BLOCK + tl.arange(0, BLOCK)  # index into Bᵀ (B_COLS × B_ROWS)
        ok = offs < B_ROWS * B_COLS
        col, row = offs // B_ROWS, offs % B_ROWS
        tl.store(b_out_ptr + offs, tl.load(b_ptr + row * B_COLS + col, mask=ok).to(b_out_ptr.dtype.element_ty),
                 mask=ok)


@triton.jit
def dequantize_kernel(w_ptr, out_ptr, NUMEL, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                      QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, BLOCK: tl.constexpr):
    """A 4-bit W dequantised whole, row-major, in out's dtype: the large-batch path (see `lora2_forward`)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    w = _load_weight(w_ptr, offs, ok, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                     out_ptr.dtype.element_ty, QUANT, QBLOCK, QBLOCK2)
    tl.store(out_ptr + offs, w, mask=ok)


@triton.jit
def _row_band(M, N, seg_ptr, ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row band: (row tile, column group, first column tile, end, adapter, first row, end row).
    The grid is (row tiles) × (column groups); each group takes a contiguous run of the row tile's column tiles.

    Several adapters (ADAPTERS > 1): the rows are ADAPTERS segments, one an adapter, their ADAPTERS + 1 row
    offsets at ``seg_ptr`` (ascending, on the device: the host never reads them); a row tile never straddles two,
    so its rank-k work uses one adapter's factors. The grid holds the most tiles any split of M rows can need
    (``row_tile_bound``); a program past its split's tiles gets an empty row range."""
    row_tiles = tl.cdiv(M, BLOCK_M) + ADAPTERS - 1  # row_tile_bound
    col_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid % row_tiles  # consecutive programs: other rows, the same W columns (shared in L2)
    group = pid // row_tiles
    per_group = tl.cdiv(col_tiles, tl.num_programs(0) // row_tiles)
    first = group * per_group
    adapter = pid_m * 0  # int32 scalars, as the loads below give
    if ADAPTERS == 1:
        row0 = pid_m * BLOCK_M
        row_end = M + adapter
    else:
        row0 = adapter
        row_end = adapter
        before = adapter  # row tiles of the adapters before this one
        for i in tl.static_range(ADAPTERS):
            start = tl.load(seg_ptr + i)
            end = tl.load(seg_ptr + i + 1)
            tiles = tl.cdiv(end - start, BLOCK_M)
            here = (pid_m >= before) & (pid_m < before + tiles)
            adapter = tl.where(here, i, adapter)
            row0 = tl.where(here, start + (pid_m - before) * BLOCK_M, row0)
            row_end = tl.where(here, end, row_end)
            before += tiles
    return pid_m, group, first, tl.minimum(first + per_group, col_tiles), adapter, row0, row_end


@triton.jit
def _tile_rows(pid_m, row_start, row_end, M, ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(first row, int64; row offsets in the tile; which are rows) of a row band's tiles. Rows are addressed
    from this scalar base with int32 offsets: what the compiler hoists out of the loop over column tiles
    (per-row pointers in every layout the loop uses) stays small. One adapter: the very code of before adapters
    came (its int64 forms compile to fewer registers in the FMA tiles: written as the adapters' int32 forms,
    five of them spilled 4-16 B)."""
    row0 = tl.cast(pid_m, tl.int64) * BLOCK_M if ADAPTERS == 1 else tl.cast(row_start, tl.int64)
    ri = tl.arange(0, BLOCK_M)
    ri_ok = ri < (M - row0 if ADAPTERS == 1 else row_end - row_start)
    return row0, ri, ri_ok


@triton.jit
def _adapter_tiles(seg_ptr, adapter, tiles, ADAPTERS: tl.constexpr, TILE_ROWS):
    """(first row tile, row tiles) of ``adapter`` in a row-band launch of TILE_ROWS-row tiles (see _row_band);
    one adapter: (0, ``tiles``)."""
    first = adapter * 0
    count = tiles + adapter * 0
    if ADAPTERS > 1:
        before = adapter * 0
        for i in tl.static_range(ADAPTERS):
            own = tl.cdiv(tl.load(seg_ptr + i + 1) - tl.load(seg_ptr + i), TILE_ROWS)
            first = tl.where(adapter == i, before, first)
            count = tl.where(adapter == i, own, count)
            before += own
    return first, count


@triton.jit
def _adapter_factors(adapter, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr, R, RANK):
    """The k × k core's factors of ``adapter`` in stacked (adapters, ...) tensors (one adapter: the pointers)."""
    a = tl.cast(adapter, tl.int64)
    return q_up_ptr + a * R * RANK, sv_ptr + a * R, mask_ptr + a * R, p_down_ptr + a * RANK * R


@triton.jit(do_not_specialize=["M_BUCKET"])
def forward_kernel(
    x_ptr, w_ptr, bias_ptr, a1_ptr, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr, p_up_ptr, y_ptr, h_ptr, z_ptr,
    M, N, K, R, RANK, M_BUCKET, alpha, dropout_p, seed_ptr,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
    absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, seg_ptr,
    HAS_BIAS: tl.constexpr, SCALE_BY_KEPT: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, BASE: tl.constexpr, W_AS_A: tl.constexpr,
    ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RR: tl.constexpr,
):
    """y = x·Wᵀ + b + z·B₂ᵀ with z = h·Cᵀ, h = d(x)·A₁ᵀ. W is read as B[k, n] through (stride_wk, stride_wn);
    A₁ (k × K, in x's dtype), B₂ (N × k), h (M × k) are contiguous; z: a (groups, M, k) fp32 scratch. BASE
    False (the cuBLAS split): y already holds x·Wᵀ (a torch.mm before this launch) and the kernel adds the rest.

    Row bands: the grid is (row tiles) × (column groups), and a program computes its row tile's y over a
    contiguous run of column tiles (its group's). It first streams the row tile's x once for h = d(x)·A₁ᵀ (the
    dropout mask drawn there: once per element with one group a row tile, the interpreter's default and a GPU
    whose SMs the row tiles fill; more groups, ``column_groups``, keep a GPU busy for few rows), folds the
    k × k core in once (z = h·Cᵀ), and then, per column tile, runs the base GEMM's K loop alone and adds z·B₂ᵀ
    in the epilogue. So the rank-k products cost once per row tile and group, not once per output tile, and
    the GEMM's K loops hold one dot.

    Over a 4-bit W on Hopper (W_AS_A) the GEMM runs transposed, yᵀ = W·xᵀ: the dequantised W tile is the
    wgmma's A operand, which may come from registers (as B it went through shared memory, and Triton 3.6
    waited for every wgmma reading it: a serialised K loop); the accumulator is transposed once a tile.

    Several adapters (ADAPTERS > 1, see _row_band): A₁, B₂ and the core's factors are stacked (adapters, ...),
    and each row tile reads its adapter's; W, x, y, h and z are shared."""
    pid_m, group, first, last, adapter_id, row_start, row_end = _row_band(M, N, seg_ptr, ADAPTERS, BLOCK_M,
                                                                         BLOCK_N)
    if ADAPTERS > 1:
        if row_start >= row_end:  # past this split's row tiles
            return
        a1_ptr += tl.cast(adapter_id, tl.int64) * RANK * K
        p_up_ptr += tl.cast(adapter_id, tl.int64) * N * RANK
        q_up_ptr, sv_ptr, mask_ptr, p_down_ptr = _adapter_factors(adapter_id, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr,
                                                                  R, RANK)
    rm = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < (M if ADAPTERS == 1 else row_end)
    r_ok = rr < RANK

    # h = d(x)·A₁ᵀ in a K loop of its own (x is read once more than the GEMM reads it, from L2 mostly)
    hidden = _rank_k(x_ptr, a1_ptr, rm, m_ok, rk, rr, r_ok, K, dropout_p, seed_ptr, stride_xm, stride_xk, DROPOUT,
                     PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    if group == 0:  # the h the backward reads (every group computed the same rows)
        tl.store(h_ptr + rm[:, None] * RANK + rr[None, :], hidden, mask=m_ok[:, None] & r_ok[None, :])
    core, _, _ = _core(q_up_ptr, sv_ptr, mask_ptr, p_down_ptr, R, RANK, alpha, SCALE_BY_KEPT, BLOCK_R, BLOCK_RR)
    # z goes to memory, not through the tiles' K loops in registers (they spilled there)
    z_ptr += tl.cast(group, tl.int64) * M * RANK
    tl.store(z_ptr + rm[:, None] * RANK + rr[None, :], tl.dot(hidden, tl.trans(core), input_precision="ieee"),
             mask=m_ok[:, None] & r_ok[None, :])
    tl.debug_barrier()  # the epilogues below read rows other threads of this program wrote

    row0, ri, ri_ok = _tile_rows(pid_m, row_start, row_end, M, ADAPTERS, BLOCK_M)
    x_rows = x_ptr + row0 * stride_xm
    y_rows = y_ptr + row0 * stride_ym
    z_rows = z_ptr + row0 * RANK
    k_steps = tl.cdiv(K, BLOCK_K)
    for pid_n in range(first, last):
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if BASE:
            for step in range(0, k_steps):
                # each tile starts its K loop at another chunk: no x pointer is the same in every tile, so
                # none is hoisted out of the loop over tiles into registers held through it (they spilled)
                cols = ((step + pid_n) % k_steps) * BLOCK_K + rk
                k_ok = cols < K
                x = tl.load(x_rows + ri[:, None] * stride_xm + cols[None, :] * stride_xk,
                            mask=ri_ok[:, None] & k_ok[None, :], other=0.0)
                if W_AS_A:
                    w_t = _load_weight(w_ptr, rn[:, None] * stride_wn + cols[None, :].to(tl.int64) * stride_wk,
                                       n_ok[:, None] & k_ok[None, :], absmax_ptr, code_ptr, absmax2_ptr,
                                       code2_ptr, offset_ptr, x_ptr.dtype.element_ty, QUANT, QBLOCK, QBLOCK2)
                    acc_t = _dot(w_t, tl.trans(x), acc_t, PRECISION)
                else:
                    w = _load_weight(w_ptr, cols[:, None].to(tl.int64) * stride_wk + rn[None, :] * stride_wn,
                                     k_ok[:, None] & n_ok[None, :], absmax_ptr, code_ptr, absmax2_ptr, code2_ptr,
                                     offset_ptr, x_ptr.dtype.element_ty, QUANT, QBLOCK, QBLOCK2)
                    acc = _dot(x, w, acc, PRECISION)
            if W_AS_A:
                acc = tl.trans(acc_t)
        z = tl.load(z_rows + ri[:, None] * RANK + rr[None, :], mask=ri_ok[:, None] & r_ok[None, :], other=0.0)
        _forward_epilogue(acc, z, ri, rn, ri_ok, n_ok, rr, r_ok, bias_ptr, p_up_ptr, y_rows, RANK, stride_ym,
                          stride_yn, HAS_BIAS, PRECISION, BASE)


@triton.jit
def _rank_k(x_ptr, a1_ptr, rm, m_ok, rk, rr, r_ok, K, dropout_p, seed_ptr, stride_xm, stride_xk,
            DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """h = d(x)·A₁ᵀ for rows ``rm``: a K loop over x, the keep mask drawn as it goes."""
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + rk
        k_ok = cols < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a1 = tl.load(a1_ptr + rr[None, :] * K + cols[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed_ptr, rm, k0, BLOCK_K, dropout_p), x, 0.0).to(x.dtype)
        hidden = _dot(x, a1, hidden, PRECISION)
    if DROPOUT:
        hidden = hidden * (1.0 / (1.0 - dropout_p))
    return hidden


@triton.jit
def _forward_epilogue(acc, z, rm, rn, m_ok, n_ok, rr, r_ok, bias_ptr, p_up_ptr, y_ptr, RANK, stride_ym, stride_yn,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BASE: tl.constexpr):
    """y tile = acc + z·B₂ᵀ + b (z = h·Cᵀ), rounded once to y's dtype."""
    b2t = tl.load(p_up_ptr + rn[None, :] * RANK + rr[:, None], mask=r_ok[:, None] & n_ok[None, :],
                  other=0.0).to(tl.float32)  # B₂ᵀ tile: k × BLOCK_N
    if not BASE:  # the cuBLAS split: y holds x·Wᵀ already
        acc += tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=m_ok[:, None] & n_ok[None, :],
                       other=0.0).to(tl.float32)
    acc = tl.dot(z, b2t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def dx_kernel(
    dy_ptr, w_ptr, x_ptr, h_ptr, a1_ptr, b2_ptr, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr,
    dx_ptr, part_b2_ptr, part_a1_ptr, part_core_ptr, grad_h_ptr,
    M, N, K, R, RANK, M_BUCKET, alpha, dropout_p, seed_ptr,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_xm, stride_xn, stride_dxm, stride_dxn, stride_b2k, stride_b2r,
    stride_b2a, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, seg_ptr,
    COMPUTE_DX: tl.constexpr, SCALE_BY_KEPT: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, BASE: tl.constexpr, W_AS_A: tl.constexpr,
    ADAPTERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RR: tl.constexpr,
):
    """dY: M × K (K = out), W read as B[k, n] (n over in, N = in); x: M × N; h: M × k (fp32);
    A₁: k × N (fp32); B₂ read as B₂[k_out, r] through (stride_b2k, stride_b2r): the transposed cast
    (k × K, contiguous along K) for half inputs, the fp32 parameter itself otherwise. Partials (fp32,
    contiguous): dB₂ (tiles, K, k), dA₁ (tiles, k, N), dC (tiles, k, k); grad_h: a (groups, M, k) fp32
    scratch for g = dL/dh.

    Row bands, as the forward's: the grid is (row tiles) × (column groups), and a program takes its row
    tile's dX over a contiguous run of column tiles. It first streams the row tile's dY once for gB = dY·B₂
    (group 0 also takes the row tile's partials of dB₂ = dYᵀ·(h·Cᵀ) and dC = gBᵀ·h in that pass) and turns
    gB into g = gB·C; then (without dropout) it streams x over its columns for the row tile's share of
    dA₁ = gᵀ·x, a loop of its own (in the tiles' epilogues the x tile and its dot spilled every 128-row
    config); then, per column tile, it runs the base GEMM's K loop alone and adds (g·A₁)⊙keep/(1−p) in the
    epilogue (with dropout, and the tile's dA₁ share there too, with the same keep mask). So gB is computed
    once per row tile and column group (it was once per column tile, 9 % of the GEMM at 64 × 512 → 1024), and
    the GEMM's K loops hold one dot. BASE False (the cuBLAS split): dX holds dY·W already; no K loop over W.
    Several adapters (ADAPTERS > 1): as the forward's, B₂ (cast or not) an adapter every ``stride_b2a``; the
    partials are per row tile, so each holds one adapter's share."""
    pid_m, group, first, last, adapter_id, row_start, row_end = _row_band(M, N, seg_ptr, ADAPTERS, BLOCK_M,
                                                                         BLOCK_N)
    if ADAPTERS > 1:
        if row_start >= row_end:  # past this split's row tiles
            return
        a1_ptr += tl.cast(adapter_id, tl.int64) * RANK * N
        b2_ptr += tl.cast(adapter_id, tl.int64) * stride_b2a
        q_up_ptr, sv_ptr, mask_ptr, p_down_ptr = _adapter_factors(adapter_id, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr,
                                                                  R, RANK)
    rm = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < (M if ADAPTERS == 1 else row_end)
    r_ok = rr < RANK
    core, _, _ = _core(q_up_ptr, sv_ptr, mask_ptr, p_down_ptr, R, RANK, alpha, SCALE_BY_KEPT, BLOCK_R, BLOCK_RR)
    grad_b = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # gB = dY·B₂

    if group == 0:  # gB, and the row tile's dB₂ by out chunks and dC = gBᵀ·h
        h = tl.load(h_ptr + rm[:, None] * RANK + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        z_t = tl.trans(tl.dot(h, tl.trans(core), input_precision="ieee").to(dy_ptr.dtype.element_ty))  # (h·Cᵀ)ᵀ
        for k0 in range(0, K, BLOCK_K):
            rows = k0 + rk
            k_ok = rows < K
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rows[None, :] * stride_dyk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptr + rows[:, None] * stride_b2k + rr[None, :] * stride_b2r,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            grad_b = _dot(dy, b2, grad_b, PRECISION)
            # (dB₂ chunk)ᵀ = zᵀ·dY: k rows, so on Hopper an mma.sync rather than a wgmma whose result
            # each iteration would have to wait for (its store needs it before the next one is issued)
            part = _dot(z_t, dy, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), PRECISION)
            tl.store(part_b2_ptr + tl.cast(pid_m, tl.int64) * K * RANK + rows[None, :] * RANK + rr[:, None], part,
                     mask=r_ok[:, None] & k_ok[None, :])
        part_core = tl.dot(tl.trans(grad_b), h, input_precision="ieee")
        tl.store(part_core_ptr + tl.cast(pid_m, tl.int64) * BLOCK_R * BLOCK_R + rr[:, None] * BLOCK_R + rr[None, :],
                 part_core)
    else:  # the same rows' gB again (a GPU with more SMs than row tiles runs several groups)
        for k0 in range(0, K, BLOCK_K):
            rows = k0 + rk
            k_ok = rows < K
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rows[None, :] * stride_dyk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptr + rows[:, None] * stride_b2k + rr[None, :] * stride_b2r,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            grad_b = _dot(dy, b2, grad_b, PRECISION)
    g = tl.dot(grad_b, core, input_precision="ieee")  # dL/dh, M × k
    if DROPOUT:
        g = g * (1.0 / (1.0 - dropout_p))
    # g goes to memory, not through the column tiles' K loops in registers (they spilled there)
    grad_h_ptr += tl.cast(group, tl.int64) * M * RANK
    tl.store(grad_h_ptr + rm[:, None] * RANK + rr[None, :], g, mask=m_ok[:, None] & r_ok[None, :])
    tl.debug_barrier()  # the epilogues below read rows other threads of this program wrote

    row0, ri, ri_ok = _tile_rows(pid_m, row_start, row_end, M, ADAPTERS, BLOCK_M)
    dy_rows = dy_ptr + row0 * stride_dym
    x_rows = x_ptr + row0 * stride_xm
    dx_rows = dx_ptr + row0 * stride_dxm
    g_rows = grad_h_ptr + row0 * RANK
    part_a1_ptr += tl.cast(pid_m, tl.int64) * RANK * N
    k_steps = tl.cdiv(K, BLOCK_K)
    if not DROPOUT:
        # the row tile's share of dA₁ = gᵀ·x over the group's columns: a pass of its own that streams x, rather
        # than a read of x and a dot in each tile's epilogue (they spilled the 128-row tiles there)
        for pid_n in range(first, last):
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            x = tl.load(x_rows + ri[:, None] * stride_xm + rn[None, :] * stride_xn,
                        mask=ri_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            part = tl.dot(tl.trans(g), x, input_precision=PRECISION)
            tl.store(part_a1_ptr + rr[:, None] * N + rn[None, :], part, mask=r_ok[:, None] & n_ok[None, :])

    if COMPUTE_DX or DROPOUT:
        # tile by tile: dY·W's K loop alone, then dX's adapter term (g·A₁)⊙keep/(1−p) and, with dropout, the
        # tile's share of dA₁ = gᵀ·d(x) with the same mask (drawn once per element in the backward: where its
        # 128-row tiles spilled anyway, compile_all). Not pipelined: in the split (no K loop inside) Triton would
        # multi-buffer the x and dX tiles, past the shared memory of the 128-row tiles with dropout
        for pid_n in tl.range(first, last, num_stages=1):
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            if COMPUTE_DX:
                if BASE:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                    for step in range(0, k_steps):
                        # each tile starts its K loop at another chunk: no dY pointer is the same in every
                        # tile, so none is hoisted out of the loop over tiles into registers held through it
                        rows = ((step + pid_n) % k_steps) * BLOCK_K + rk
                        k_ok = rows < K
                        dy = tl.load(dy_rows + ri[:, None] * stride_dym + rows[None, :] * stride_dyk,
                                     mask=ri_ok[:, None] & k_ok[None, :], other=0.0)
                        if W_AS_A:  # dXᵀ = Wᵀ·dYᵀ: the dequantised tile as the wgmma's register operand
                            w_t = _load_weight(w_ptr, rn[:, None] * stride_wn + rows[None, :].to(tl.int64) * stride_wk,
                                               n_ok[:, None] & k_ok[None, :], absmax_ptr, code_ptr, absmax2_ptr,
                                               code2_ptr, offset_ptr, dy_ptr.dtype.element_ty, QUANT, QBLOCK, QBLOCK2)
                            acc_t = _dot(w_t, tl.trans(dy), acc_t, PRECISION)
                        else:
                            wt = _load_weight(w_ptr, rows[:, None].to(tl.int64) * stride_wk + rn[None, :] * stride_wn,
                                              k_ok[:, None] & n_ok[None, :], absmax_ptr, code_ptr, absmax2_ptr,
                                              code2_ptr, offset_ptr, dy_ptr.dtype.element_ty, QUANT, QBLOCK, QBLOCK2)
                            acc = _dot(dy, wt, acc, PRECISION)
                    if W_AS_A:
                        acc = tl.trans(acc_t)
                else:  # the cuBLAS split: dX holds dY·W already
                    acc = tl.load(dx_rows + ri[:, None] * stride_dxm + rn[None, :] * stride_dxn,
                                  mask=ri_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            # g, the mask and A₁'s columns loaded after the K loop, so none holds registers through it
            g = tl.load(g_rows + ri[:, None] * RANK + rr[None, :], mask=ri_ok[:, None] & r_ok[None, :], other=0.0)
            if DROPOUT:
                # the mask as a 0/1 fp32 factor: one i1 tensor used in two layouts does not lower in Triton 3.6
                keep = _keep(seed_ptr, row0 + ri, pid_n * BLOCK_N, BLOCK_N, dropout_p).to(tl.float32)
            if COMPUTE_DX:
                a1 = tl.load(a1_ptr + rr[:, None] * N + rn[None, :], mask=r_ok[:, None] & n_ok[None, :],
                             other=0.0).to(tl.float32)  # A₁ as given (fp32 from LoRA2Linear; any float dtype)
                adapter = tl.dot(g, a1, input_precision=PRECISION)
                if DROPOUT:
                    adapter = adapter * keep
                acc += adapter
                tl.store(dx_rows + ri[:, None] * stride_dxm + rn[None, :] * stride_dxn,
                         acc.to(dx_ptr.dtype.element_ty), mask=ri_ok[:, None] & n_ok[None, :])
            if DROPOUT:
                x = tl.load(x_rows + ri[:, None] * stride_xm + rn[None, :] * stride_xn,
                            mask=ri_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                x = x * keep
                part = tl.dot(tl.trans(g), x, input_precision=PRECISION)
                tl.store(part_a1_ptr + rr[:, None] * N + rn[None, :], part, mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def finish_kernel(
    part_b2_ptr, part_a1_ptr, part_core_ptr, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr,
    grad_b2_ptr, grad_a1_ptr, grad_q_up_ptr, grad_sv_ptr, grad_p_down_ptr,
    TILES, OUT, IN, R, RANK, alpha, seg_ptr, TILE_ROWS,
    SCALE_BY_KEPT: tl.constexpr, ADAPTERS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RR: tl.constexpr,
):
    """Programs [0, out tiles): dB₂ rows; [out tiles, + in tiles): dA₁ columns; the last: the core. The grid's
    second axis: the adapter (ADAPTERS > 1), whose gradients sum the partials of its own row tiles."""
    pid = tl.program_id(0)
    adapter = tl.program_id(1)
    first_tile, TILES = _adapter_tiles(seg_ptr, adapter, TILES, ADAPTERS, TILE_ROWS)
    part_b2_ptr += tl.cast(first_tile, tl.int64) * OUT * RANK
    part_a1_ptr += tl.cast(first_tile, tl.int64) * RANK * IN
    part_core_ptr += tl.cast(first_tile, tl.int64) * BLOCK_R * BLOCK_R
    if ADAPTERS > 1:
        a = tl.cast(adapter, tl.int64)
        grad_b2_ptr += a * OUT * RANK
        grad_a1_ptr += a * RANK * IN
        grad_q_up_ptr += a * R * RANK
        grad_sv_ptr += a * R
        grad_p_down_ptr += a * RANK * R
        q_up_ptr, sv_ptr, mask_ptr, p_down_ptr = _adapter_factors(adapter, q_up_ptr, sv_ptr, mask_ptr, p_down_ptr,
                                                                  R, RANK)
    out_tiles = tl.cdiv(OUT, BLOCK)
    in_tiles = tl.cdiv(IN, BLOCK)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < RANK
    if pid < out_tiles:
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        ok = (rows < OUT)[:, None] & r_ok[None, :]
        total = tl.zeros((BLOCK, BLOCK_R), dtype=tl.float32)
        for t in range(0, TILES):
            total += tl.load(part_b2_ptr + tl.cast(t, tl.int64) * OUT * RANK + rows[:, None] * RANK + rr[None, :],
                             mask=ok, other=0.0)
        tl.store(grad_b2_ptr + rows[:, None] * RANK + rr[None, :], total, mask=ok)
    elif pid < out_tiles + in_tiles:
        cols = (pid - out_tiles) * BLOCK + tl.arange(0, BLOCK)
        ok = r_ok[:, None] & (cols < IN)[None, :]
        total = tl.zeros((BLOCK_R, BLOCK), dtype=tl.float32)
        for t in range(0, TILES):
            total += tl.load(part_a1_ptr + tl.cast(t, tl.int64) * RANK * IN + rr[:, None] * IN + cols[None, :], mask=ok,
                             other=0.0)
        tl.store(grad_a1_ptr + rr[:, None] * IN + cols[None, :], total, mask=ok)
    else:  # C = A₂·diag(w)·B₁:  dλ = s·m⊙diag(A₂ᵀ·dC·B₁ᵀ),  dB₁ = diag(w)·A₂ᵀ·dC,  dA₂ = dC·B₁ᵀ·diag(w)
        grad_core = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        for t in range(0, TILES):
            grad_core += tl.load(part_core_ptr + tl.cast(t, tl.int64) * BLOCK_R * BLOCK_R + rr[:, None] * BLOCK_R
                                 + rr[None, :])
        ri = tl.arange(0, BLOCK_RR)
        ri_ok = ri < R
        _, w, s = _core(q_up_ptr, sv_ptr, mask_ptr, p_down_ptr, R, RANK, alpha, SCALE_BY_KEPT, BLOCK_R, BLOCK_RR)
        m = tl.load(mask_ptr + ri, mask=ri_ok, other=0.0).to(tl.float32)
        a2 = tl.load(p_down_ptr + rr[:, None] * R + ri[None, :], mask=r_ok[:, None] & ri_ok[None, :],
                     other=0.0).to(tl.float32)  # k × r
        b1 = tl.load(q_up_ptr + ri[:, None] * RANK + rr[None, :], mask=ri_ok[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)  # r × k
        a2t_dc = tl.dot(tl.trans(a2), grad_core, input_precision="ieee")  # r × k
        grad_sv = tl.sum(a2t_dc * b1, axis=1) * m * s
        tl.store(grad_sv_ptr + ri, grad_sv, mask=ri_ok)
        tl.store(grad_q_up_ptr + ri[:, None] * RANK + rr[None, :], a2t_dc * w[:, None],
                 mask=ri_ok[:, None] & r_ok[None, :])
        grad_a2 = tl.dot(grad_core, tl.trans(b1), input_precision="ieee") * w[None, :]  # k × r
        tl.store(grad_p_down_ptr + rr[:, None] * R + ri[None, :], grad_a2, mask=r_ok[:, None] & ri_ok[None, :])


# --- configurations ------------------------------------------------------------------------------

# Hopper-first tile shapes (wgmma wants BLOCK_M of 64·warpgroups and wide BLOCK_N) for tensor-core
# dots (bf16 / fp16, and fp32 as TF32).
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
# fp32 inputs under torch's default matmul precision ("highest") get IEEE dots, which Triton lowers to
# FMAs (no tensor cores): every tile above spills there, so they have small tiles of their own.
IEEE_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
]
# A 4-bit W is dequantised in registers, which costs registers the plain tiles do not have (the
# sm_80 tiles above spill with it): eight warps over mid-size tiles, for 4-bit launches only.
QUANT_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    # the one tile of dX over a 4-bit W with dropout at k = 32 on sm_80 that does not spill (236 registers;
    # every tile above spilled there, 4 B at best: compile_all, 2026-12-04)
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
]
ALL_CONFIGS = MATMUL_CONFIGS + IEEE_CONFIGS + QUANT_CONFIGS  # appended: SPILLS keys hold indices
# (sm, kernel, element size, dropout, index in ALL_CONFIGS, BLOCK_R) that spill registers: read off
# `compile_all --resources` over the whole grid (ptxas -v, Triton 3.6; k = 1, 8, 16 for BLOCK_R 16 and
# k = 32 for 32, r = 8 and 32, dropout 0 and 0.1; 2026-12-04). The autotuner never runs them on that GPU,
# and the compile test fails on any spill not listed here, so the list stays true. Every key keeps at least
# one config (at k = 32 with dropout only the 8-warp tiles of the 4-bit set: see eight_warp_tiles).
SPILLS = {
    (80, "dx", 2, False, 0, 16), (80, "dx", 2, False, 0, 32), (80, "dx", 2, False, 3, 32), (80, "dx", 2, True, 0, 16),
    (80, "dx", 2, True, 0, 32), (80, "dx", 2, True, 1, 16), (80, "dx", 2, True, 1, 32), (80, "dx", 2, True, 2, 16),
    (80, "dx", 2, True, 2, 32), (80, "dx", 2, True, 3, 16), (80, "dx", 2, True, 3, 32), (80, "dx", 2, True, 4, 16),
    (80, "dx", 2, True, 4, 32), (80, "dx", 2, True, 7, 16), (80, "dx", 2, True, 7, 32), (80, "dx", 2, True, 8, 32),
    (80, "dx", 4, True, 5, 16), (80, "dx", 4, True, 6, 32), (80, "forward", 2, False, 0, 16),
    (80, "forward", 2, False, 0, 32), (80, "forward", 2, False, 3, 32), (80, "forward", 2, True, 0, 16),
    (80, "forward", 2, True, 0, 32), (80, "forward", 2, True, 3, 32), (80, "forward", 2, True, 4, 16),
    (80, "forward", 4, True, 5, 16), (90, "dx", 2, False, 3, 32), (90, "dx", 2, False, 4, 32),
    (90, "dx", 2, True, 0, 16), (90, "dx", 2, True, 0, 32), (90, "dx", 2, True, 1, 16), (90, "dx", 2, True, 1, 32),
    (90, "dx", 2, True, 2, 16), (90, "dx", 2, True, 2, 32), (90, "dx", 2, True, 3, 16), (90, "dx", 2, True, 3, 32),
    (90, "dx", 2, True, 4, 32), (90, "dx", 2, True, 7, 16), (90, "dx", 2, True, 7, 32), (90, "dx", 4, True, 6, 32),
    (90, "forward", 2, False, 3, 32), (90, "forward", 2, True, 3, 32),
}
# The same for the 4-bit kernels (`compile_all --resources --cases 4bit`: k = 1, 8, 16, 32, NF4 with and
# without double quantisation, and dropout at k = 8; the union of the two quant levels).
QUANT_SPILLS = {
    (80, "dx", 2, False, 3, 16), (80, "dx", 2, False, 3, 32), (80, "dx", 2, False, 4, 16),
    (80, "dx", 2, False, 7, 16), (80, "dx", 2, False, 9, 16), (80, "dx", 2, True, 3, 16), (80, "dx", 2, True, 3, 32),
    (80, "dx", 2, True, 4, 32), (80, "dx", 2, True, 7, 16), (80, "dx", 2, True, 7, 32), (80, "dx", 2, True, 8, 32),
    (80, "dx", 2, True, 9, 32), (80, "forward", 2, False, 3, 16), (80, "forward", 2, False, 3, 32),
    (80, "forward", 2, False, 4, 16), (80, "forward", 2, False, 7, 16), (80, "forward", 2, False, 9, 16),
    (80, "forward", 2, True, 3, 16), (80, "forward", 2, True, 3, 32), (80, "forward", 2, True, 7, 16),
    (80, "forward", 2, True, 9, 16), (90, "dx", 2, False, 3, 32), (90, "dx", 2, True, 3, 16),
    (90, "dx", 2, True, 3, 32), (90, "dx", 2, True, 4, 32), (90, "dx", 2, True, 7, 16), (90, "dx", 2, True, 7, 32),
    (90, "forward", 2, False, 3, 32), (90, "forward", 2, True, 3, 32),
    # the 4-warp tile appended for dX with dropout at k = 32 (compile_all over the 4-bit cases, 2026-12-04)
    (80, "dx", 2, False, 10, 16), (80, "forward", 2, False, 10, 16), (80, "forward", 2, False, 10, 32),
    (80, "forward", 2, True, 10, 16), (80, "forward", 2, True, 10, 32),
}
# The same for the cuBLAS split's kernels (BASE False: `compile_all --resources --cases split`; the split is
# not offered to fp32 inputs under IEEE precision, whose both FMA tiles spill at k = 32).
SPLIT_SPILLS = {
    (80, "dx", 2, False, 0, 16), (80, "dx", 2, False, 0, 32), (80, "dx", 2, False, 3, 32), (80, "dx", 2, True, 0, 16),
    (80, "dx", 2, True, 0, 32), (80, "dx", 2, True, 1, 16), (80, "dx", 2, True, 1, 32), (80, "dx", 2, True, 2, 16),
    (80, "dx", 2, True, 2, 32), (80, "dx", 2, True, 3, 16), (80, "dx", 2, True, 3, 32), (80, "dx", 2, True, 4, 32),
    (80, "dx", 2, True, 7, 16), (80, "dx", 2, True, 7, 32), (80, "dx", 2, True, 8, 32), (80, "dx", 4, False, 3, 32),
    (80, "dx", 4, True, 3, 16), (80, "dx", 4, True, 3, 32), (80, "dx", 4, True, 4, 16), (80, "dx", 4, True, 4, 32),
    (80, "dx", 4, True, 7, 16), (80, "dx", 4, True, 7, 32), (80, "dx", 4, True, 8, 32),
    (80, "forward", 2, False, 0, 16), (80, "forward", 2, False, 0, 32), (80, "forward", 2, False, 3, 32),
    (80, "forward", 2, True, 0, 16), (80, "forward", 2, True, 0, 32), (80, "forward", 2, True, 3, 32),
    (80, "forward", 4, False, 3, 16), (80, "forward", 4, False, 3, 32), (80, "forward", 4, False, 7, 32),
    (80, "forward", 4, True, 3, 16), (80, "forward", 4, True, 3, 32), (80, "forward", 4, True, 7, 32),
    (90, "dx", 2, False, 0, 16), (90, "dx", 2, False, 0, 32), (90, "dx", 2, False, 3, 32), (90, "dx", 2, True, 0, 16),
    (90, "dx", 2, True, 0, 32), (90, "dx", 2, True, 1, 16), (90, "dx", 2, True, 1, 32), (90, "dx", 2, True, 2, 16),
    (90, "dx", 2, True, 2, 32), (90, "dx", 2, True, 3, 16), (90, "dx", 2, True, 3, 32), (90, "dx", 2, True, 7, 16),
    (90, "dx", 2, True, 7, 32), (90, "dx", 4, False, 3, 32), (90, "dx", 4, False, 7, 32), (90, "dx", 4, True, 2, 16),
    (90, "dx", 4, True, 2, 32), (90, "dx", 4, True, 3, 16), (90, "dx", 4, True, 3, 32), (90, "dx", 4, True, 4, 32),
    (90, "dx", 4, True, 7, 16), (90, "dx", 4, True, 7, 32), (90, "dx", 4, True, 8, 32),
    (90, "forward", 2, False, 0, 16), (90, "forward", 2, False, 3, 32), (90, "forward", 2, True, 0, 16),
    (90, "forward", 2, True, 3, 32), (90, "forward", 4, False, 3, 32), (90, "forward", 4, True, 3, 32),
}
FINISH_BLOCK = 128
CAST_BLOCK = 1024
# Under the interpreter: small tiles, so the tests cross tile boundaries in every dimension.
INTERPRETER_MATMUL_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
SMALLEST_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in ALL_CONFIGS + [triton.Config(INTERPRETER_MATMUL_CONFIG)])
TENSOR_CORE_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in MATMUL_CONFIGS)


# Shared memory per W element and stage of the 4-bit kernels (QUANT 1, 2), as Triton 3.6 lays it out
# (fitted to compile_all's figures): every value's byte and absmax (and, double-quantised, the 8-bit
# absmax and its scale) are staged per element.
QUANT_BYTES_PER_ELEMENT = {1: 5, 2: 8}


def shared_memory_bytes(config: triton.Config, element_size: int, rank_block: int = 16, quant: int = 0,
                        w_as_a: bool = False) -> int:
    """Estimated shared memory of a config's pipelined tiles: x / dY, W and the rank-k tile per stage.

    A 4-bit W stages its packed bytes and scales instead, and its dequantised tile is written to shared
    memory for the dot (one buffer per stage but the last), plus some scratch; in the transposed form
    (``w_as_a``, sm_90) the tile stays in registers and the fp32 accumulator is transposed through shared
    memory once a tile instead (fitted to compile_all's figures, 2026-12-04: at or above every one)."""
    kw = config.kwargs
    w_tile = kw["BLOCK_K"] * kw["BLOCK_N"]
    if not quant:
        per_stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + w_tile + kw["BLOCK_K"] * rank_block) * element_size
        return per_stage * config.num_stages
    per_stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * rank_block) * element_size
    per_stage += w_tile * QUANT_BYTES_PER_ELEMENT[quant]
    if w_as_a:
        return per_stage * config.num_stages + kw["BLOCK_M"] * kw["BLOCK_N"] * 4 + 6144
    return per_stage * config.num_stages + (config.num_stages - 1) * w_tile * element_size + 6144


def eight_warp_tiles(kernel: str, flags: dict) -> bool:
    """Launches that may also take the 8-warp tiles of the 4-bit set: a 32-wide rank tile with dropout or the
    split's band (every 4-warp tensor-core tile spills there, compile_all over the whole grid, 2026-12-04), and
    dX with dropout (its epilogue holds the mask, the x tile and two dots: on sm_80 every 4-warp tile spilled
    at k ≤ 16 too)."""
    dropout = bool(flags["DROPOUT"])
    return (flags["BLOCK_R"] >= 32 and (dropout or not flags.get("BASE", True))) or (kernel == "dx" and dropout)


def config_excluded(config: triton.Config, kernel: str, arch: int, element_size: int, flags: dict,
                    shared_memory_limit: int) -> str | None:
    """Why the autotuner must not run ``config`` for this launch on an sm_``arch`` GPU, or None."""
    ieee = flags["PRECISION"] == "ieee" and element_size == 4
    if ieee != (config in IEEE_CONFIGS):
        return "IEEE fp32 dots take the FMA tiles, tensor-core dots the others"
    if config in QUANT_CONFIGS and not flags.get("QUANT") and not (config.num_warps == 8
                                                                   and eight_warp_tiles(kernel, flags)):
        return "a 4-bit weight's tiles: for 4-bit launches (and eight_warp_tiles) only"
    if shared_memory_bytes(config, element_size, flags["BLOCK_R"], flags.get("QUANT", 0),
                           bool(flags.get("W_AS_A"))) > shared_memory_limit:
        return "does not fit this GPU's shared memory"
    table = QUANT_SPILLS if flags.get("QUANT") else SPILLS if flags.get("BASE", True) else SPLIT_SPILLS
    if (arch, kernel, element_size, bool(flags["DROPOUT"]), ALL_CONFIGS.index(config), flags["BLOCK_R"]) in table:
        return "spills registers on this GPU"
    return None


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        device = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(device)
        limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
        size = named_args["x_ptr" if kernel == "forward" else "dy_ptr"].element_size()
        kept = [c for c in configs if config_excluded(c, kernel, 10 * major + minor, size, kwargs, limit) is None]
        if kept:
            return kept
        # Every candidate spills on this GPU (no key of the whole grid since the 4-bit set's 4-warp tile, 2026-12-04;
        # a kernel changed without re-deriving the tables could): the smallest tile of the launch's kind runs, and
        # the log says so
        ieee = kwargs["PRECISION"] == "ieee" and size == 4
        kind = QUANT_CONFIGS if kwargs.get("QUANT") else [c for c in configs
                                                           if (c in IEEE_CONFIGS) == ieee and c not in QUANT_CONFIGS]
        logger.warning("lora2 kernels: every %s config spills registers on sm_%d%d for %s; running %s", kernel, major,
                       minor, {k: kwargs[k] for k in ("DROPOUT", "QUANT", "BLOCK_R") if k in kwargs}, kind[-1])
        return kind[-1:]

    return prune


# The token count is keyed by its power-of-two bucket (M_BUCKET, an argument the kernels never read):
# with dynamic padding nearly every batch has another M, and keying on M would re-run the tuning.
_KEY = ["M_BUCKET", "N", "K", "RANK"]
_FLAGS = ["DROPOUT", "PRECISION", "QUANT", "BASE", "ADAPTERS"]
if not INTERPRET:
    _forward = triton.autotune(ALL_CONFIGS, key=_KEY + ["HAS_BIAS"] + _FLAGS, cache_results=True,
                               prune_configs_by={"early_config_prune": _prune("forward")})(forward_kernel)
    _dx = triton.autotune(ALL_CONFIGS, key=_KEY + ["COMPUTE_DX"] + _FLAGS, cache_results=True,
                          prune_configs_by={"early_config_prune": _prune("dx")})(dx_kernel)


# --- host functions --------------------------------------------------------------------------------

# Plain Python on the host: triton.cdiv and triton.next_power_of_2 are ConstexprFunctions, ~3.6 µs a call
# (14 calls a step of one projection: a tenth of its host time).


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass
class Launch:
    """One kernel launch, built before it runs: the compile check (compile_all.py) builds the same
    launches on CPU tensors and compiles them for a GPU it does not have."""

    kernel: str  # "forward", "dx", "finish" or "cast"
    args: tuple
    flags: dict[str, object]  # constexpr arguments other than the tile configuration
    grid: Callable[[dict[str, int]], tuple[int, ...]]
    device: torch.device

    def autotune_key(self) -> tuple:
        """What the autotuner keys this launch's tuning on: its key arguments and the tensors' dtypes."""
        values = dict(zip(KERNELS[self.kernel].arg_names, self.args), **self.flags)
        keys = _KEY + (["HAS_BIAS"] if self.kernel == "forward" else ["COMPUTE_DX"]) + _FLAGS
        return (self.kernel, *(values[k] for k in keys),
                *(str(a.dtype) for a in self.args if isinstance(a, torch.Tensor)))

    def run(self) -> dict[str, int]:
        """Launch (on the tensors' GPU, whatever the current device is); the tile config used."""
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with guard:
            if self.kernel in AUTOTUNED and not INTERPRET:
                tuned = AUTOTUNED[self.kernel]
                tuned[self.grid](*self.args, **self.flags)
                return dict(tuned.best_config.kwargs)
            config = INTERPRETER_MATMUL_CONFIG if self.kernel in AUTOTUNED else {}
            KERNELS[self.kernel][self.grid(config)](*self.args, **self.flags, **config)
            return dict(config)


KERNELS = {"forward": forward_kernel, "dx": dx_kernel, "finish": finish_kernel, "cast": cast_factors_kernel,
           "dequantize": dequantize_kernel}
CONFIGS = {"forward": ALL_CONFIGS, "dx": ALL_CONFIGS}
AUTOTUNED = {"forward": None, "dx": None} if INTERPRET else {"forward": _forward, "dx": _dx}


def rank_block(rank: int) -> int:
    """BLOCK_R (and BLOCK_RR for r): padded to a power of two of at least 16."""
    return max(16, next_power_of_2(rank))


# Column groups under the interpreter (CPU tensors, CI): one, so a row tile's rank-k product and dropout
# mask are computed once; tests set more to run the multi-group path.
INTERPRETER_COLUMN_GROUPS = 1
_SM_COUNT: dict[int, int] = {}


def column_groups(row_tiles: int, col_tiles: int, device: torch.device) -> int:
    """Programs per row tile in the row-band kernels (each one a contiguous run of the column tiles; every
    group recomputes the row tile's rank-k product and dropout mask). One where the row tiles alone fill
    the GPU's SMs; else as many as one wave of programs holds, and no group without a tile."""
    if device.type != "cuda":
        wanted = INTERPRETER_COLUMN_GROUPS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        wanted = _SM_COUNT[index] // max(row_tiles, 1)
    wanted = max(1, min(wanted, col_tiles))
    return cdiv(col_tiles, cdiv(col_tiles, wanted))  # the groups a run of that length needs


def max_column_groups(rows: int, cols: int, device: torch.device, adapters: int = 1) -> int:
    """The most column groups any config could launch for an (rows × cols) output: buffers with a slot per
    group are sized by it before the autotuner picks the tiles."""
    configs = [INTERPRETER_MATMUL_CONFIG] if device.type != "cuda" else [c.kwargs for c in ALL_CONFIGS]
    return max(column_groups(row_tile_bound(rows, adapters, c["BLOCK_M"]), cdiv(cols, c["BLOCK_N"]), device)
               for c in configs)


def row_tile_bound(rows: int, adapters: int, block_m: int) -> int:
    """The row tiles of a row-band launch: with several adapters, the most any split of ``rows`` into their
    segments can need (each segment's last tile may be partial), so the grid never depends on the split and
    the host never reads it (see _row_band)."""
    return cdiv(rows, block_m) + adapters - 1


def seed_pointer(seed: "torch.Tensor | int", dropout_p: float, like: torch.Tensor) -> torch.Tensor:
    """The dropout seed as the kernels take it: an int64 tensor on the input's device whose first element
    is the seed (``ops.lora2_linear`` draws one there with torch's generator: nothing read on the host,
    nothing a captured graph would freeze). An int (tests, tools) is copied there. Without dropout the
    kernels never read it: any tensor will do."""
    if dropout_p <= 0:
        return like
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() < 1:
            raise ValueError(f"the dropout seed must be an int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed.to(like.device)
    return torch.tensor([int(seed)], dtype=torch.int64, device=like.device)


def token_bucket(tokens: int) -> int:
    """The autotuning key of a token count: the next power of two (at least 16)."""
    return max(16, next_power_of_2(max(tokens, 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision of the GEMMs for fp32 inputs: IEEE unless torch allows TF32 for fp32 matmuls.

    bf16 / fp16 operands ignore it; for half inputs the fp32 rank-k epilogue dots use TF32 (the
    result is rounded to the half dtype anyway). The k × k core products are always IEEE."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@dataclass
class Factors:
    """A LoRA² adapter as the kernels read it (every tensor contiguous, fp32 or the params' dtype).

    Several adapters over one base: each factor stacked, (adapters, ...), and ``segments`` the adapters' row
    offsets in the batch (adapters + 1, int32, ascending, on the device): rows [segments[i], segments[i + 1])
    go through adapter i. α and the dropout are the adapters' in common."""

    q_down: torch.Tensor  # A₁: k × in
    q_up: torch.Tensor  # B₁: r × k
    singular_values: torch.Tensor  # λ: r
    p_down: torch.Tensor  # A₂: k × r
    p_up: torch.Tensor  # B₂: out × k
    rank_mask: torch.Tensor  # m: r
    alpha: float
    scale_by_kept: bool  # s = α / kept values instead of α / r
    segments: torch.Tensor | None = None  # several adapters: their rows

    @property
    def r(self) -> int:
        return self.singular_values.shape[-1]

    @property
    def k(self) -> int:
        return self.q_down.shape[-2]

    @property
    def adapters(self) -> int:
        return 1 if self.q_down.dim() == 2 else self.q_down.shape[0]

    def segment_pointer(self) -> torch.Tensor:
        """The kernels' ``seg_ptr``: the segments, or (one adapter) a pointer they never read."""
        return self.segments if self.segments is not None else self.rank_mask

    def core_args(self) -> tuple:
        return self.q_up, self.singular_values, self.rank_mask, self.p_down


@dataclass
class Quant4:
    """A bitsandbytes 4-bit weight as the kernels read it (see ``_load_weight``)."""

    packed: torch.Tensor  # uint8, two values a byte, row-major (out × in) order
    absmax: torch.Tensor  # fp32 per block of ``blocksize`` values; uint8 when double-quantised
    code: torch.Tensor  # 16 fp32 values: NF4 or FP4
    blocksize: int
    shape: tuple[int, int]  # (out, in)
    absmax2: torch.Tensor | None = None  # double quantisation: fp32 per block of ``blocksize2`` absmax
    code2: torch.Tensor | None = None  # 256 fp32 values
    blocksize2: int = 256
    offset: float | torch.Tensor = 0.0  # bitsandbytes' is a device tensor: never read on the host

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def args(self) -> tuple:
        return (self.absmax, self.code, self.absmax2 if self.nested else self.absmax,
                self.code2 if self.nested else self.code, self.offset_pointer())

    def offset_pointer(self) -> torch.Tensor:
        """The double quantisation's offset as a 1-element device tensor (bitsandbytes keeps it as one);
        without double quantisation a pointer the kernels never read."""
        if not self.nested:
            return self.absmax
        if isinstance(self.offset, torch.Tensor):
            return self.offset.reshape(1).to(torch.float32)
        return torch.tensor([self.offset], dtype=torch.float32, device=self.absmax.device)

    def flags(self) -> dict[str, int]:
        return {"QUANT": 2 if self.nested else 1, "QBLOCK": int(self.blocksize), "QBLOCK2": int(self.blocksize2)}


NO_QUANT_FLAGS = {"QUANT": 0, "QBLOCK": 1, "QBLOCK2": 1}

# Over a 4-bit W on Hopper the GEMM runs transposed (yᵀ = W·xᵀ, dXᵀ = Wᵀ·dYᵀ), the dequantised tile as the
# wgmma's register operand A: as operand B it went through shared memory and Triton 3.6 waited for every
# wgmma reading it. On sm_80 (mma.sync takes both operands from registers) the plain form stays: the
# transposed one spilled there. Under the interpreter the transposed form runs; tests set False for the other.
INTERPRETER_W_AS_A = True
_CAPABILITY: dict[int, int] = {}


def w_as_a(quant: "Quant4 | None", device: torch.device) -> bool:
    """Whether a launch over ``quant`` (None: a 16-bit W) runs the transposed GEMM (the W_AS_A constexpr)."""
    if quant is None:
        return False
    if device.type != "cuda":
        return INTERPRETER_W_AS_A
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0]
    return _CAPABILITY[index] >= 9


def _quant_args(weight: torch.Tensor, quant: Quant4 | None) -> tuple:
    """The 4-bit arguments of a launch; for a plain W, pointers the kernel never reads."""
    return quant.args() if quant is not None else (weight, weight, weight, weight, weight)


# Where a 4-bit W is dequantised. Inside the K loop, every row tile dequantises the whole W again:
# about 8 instructions a value a row tile on the CUDA cores (~0.4 ps a value on an H100, modelled),
# while W is read at 0.56 B a value. Once per launch into a transient buffer, it costs a pass
# (0.56 B read + 2 B written a value, plus the same instructions once) and the GEMM then reads 2 B a
# value: ~1.8 ps a value. In-loop wins up to about three 128-row tiles (benchmarks/cost_model.py
# models both). The buffer lives for one launch, never across steps.
FUSED_DEQUANT_MAX_TOKENS = 384
DEQUANT_BLOCK = 1024


def dequantize_launch(quant: Quant4, dtype: torch.dtype) -> tuple[Launch, torch.Tensor]:
    """W (out × in, ``dtype``) from a 4-bit weight in one launch: the launch and the buffer it fills."""
    out = torch.empty(quant.shape, device=quant.packed.device, dtype=dtype)
    numel = out.numel()
    launch = Launch("dequantize", (quant.packed, out, numel, *quant.args()), {**quant.flags(), "BLOCK": DEQUANT_BLOCK},
                    lambda meta: (cdiv(numel, DEQUANT_BLOCK),), quant.packed.device)
    return launch, out


def cast_launch(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """A cast to ``dtype`` and B cast and transposed, in one launch; returns (launch, A, Bᵀ). A stacked B
    (adapters, out, k) is transposed as one (adapters·out) × k matrix: Bᵀ is k × (adapters·out)."""
    b = b.reshape(-1, b.shape[-1])
    a_out = torch.empty(a.shape, device=a.device, dtype=dtype)
    b_out = torch.empty(b.shape[::-1], device=b.device, dtype=dtype)
    programs = cdiv(a.numel(), CAST_BLOCK) + cdiv(b.numel(), CAST_BLOCK)
    launch = Launch("cast", (a, a_out, a.numel(), b, b_out, b.shape[0], b.shape[1]), {"BLOCK": CAST_BLOCK},
                    lambda meta: (programs,), a.device)
    return launch, a_out, b_out


def factors_cast(f: "Factors", dtype: torch.dtype) -> bool:
    """Whether ``in_activation_dtype`` casts A₁ and B₂ (then B₂ comes back transposed) for ``dtype``."""
    return not (f.q_down.dtype == dtype and f.p_up.dtype == dtype)


def b2_strides(b2: torch.Tensor, f: "Factors", dtype: torch.dtype) -> tuple[int, int, int]:
    """(stride over out, stride over k, stride over adapters) of B₂ as the dX kernel reads it: the cast Bᵀ
    (k × adapters·out) or p_up itself.
    Decided from the dtypes, as the forward decided, never from ``b2 is f.p_up``: a saved tensor comes back
    from torch.utils.checkpoint's recompute (or saved-tensor hooks) as another object, and read with the
    other layout's strides its B₂ was transposed (wrong gradients under gradient checkpointing)."""
    out_features = f.p_up.shape[-2]
    if factors_cast(f, dtype):
        return b2.stride(1), b2.stride(0), out_features
    return b2.stride(-2), b2.stride(-1), out_features * f.k


def in_activation_dtype(f: Factors, dtype: torch.dtype) -> tuple[list[Launch], torch.Tensor, torch.Tensor]:
    """(launches, A₁, B₂) in the activation dtype: the dot operands of the K loops (B₂ transposed,
    k × out (k × adapters·out), when cast; the parameter itself when it already has the dtype)."""
    if not factors_cast(f, dtype):
        return [], f.q_down, f.p_up
    launch, a1, b2 = cast_launch(f.q_down, f.p_up, dtype)
    return [launch], a1, b2


def forward_launch(x: torch.Tensor, weight: torch.Tensor, w_strides: tuple[int, int], bias: torch.Tensor | None,
                   f: Factors, a1: torch.Tensor, out_features: int, dropout_p: float, seed: "torch.Tensor | int",
                   quant: Quant4 | None = None, y: torch.Tensor | None = None
                   ) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """y (M × out) and h (M × k, fp32) for a 2-D x (M × in): the launch and its outputs. Given ``y`` (the
    cuBLAS split: it holds x·Wᵀ), the launch adds the bias and the adapter into it."""
    m, k_in = x.shape
    base = y is None
    if y is None:
        y = torch.empty((m, out_features), device=x.device, dtype=x.dtype)
    h = torch.empty((m, f.k), device=x.device, dtype=torch.float32)
    # z = h·Cᵀ, a slot per column group (see forward_kernel); freed with this call
    z = torch.empty((max_column_groups(m, out_features, x.device, f.adapters), m, f.k), device=x.device,
                    dtype=torch.float32)
    args = (x, weight, bias if bias is not None else y, a1, *f.core_args(), f.p_up, y, h, z, m, out_features, k_in,
            f.r, f.k, token_bucket(m), float(f.alpha),
            float(dropout_p), seed_pointer(seed, dropout_p, x), x.stride(0), x.stride(1), *w_strides, y.stride(0),
            y.stride(1),
            *_quant_args(weight, quant), f.segment_pointer())
    flags = {"HAS_BIAS": bias is not None, "SCALE_BY_KEPT": bool(f.scale_by_kept), "DROPOUT": dropout_p > 0,
             "PRECISION": dot_precision(x.dtype), **(quant.flags() if quant is not None else NO_QUANT_FLAGS),
             "BASE": base, "W_AS_A": w_as_a(quant, x.device), "ADAPTERS": f.adapters, "BLOCK_R": rank_block(f.k),
             "BLOCK_RR": rank_block(f.r)}

    def grid(meta: dict[str, int]) -> tuple[int, ...]:
        row_tiles, col_tiles = row_tile_bound(m, f.adapters, meta["BLOCK_M"]), cdiv(out_features, meta["BLOCK_N"])
        return (row_tiles * column_groups(row_tiles, col_tiles, x.device),)

    return Launch("forward", args, flags, grid, x.device), y, h


def dx_launch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, w_strides: tuple[int, int],
              h: torch.Tensor, f: Factors, b2: torch.Tensor, dropout_p: float, seed: "torch.Tensor | int",
              compute_dx: bool, quant: Quant4 | None = None, dx: torch.Tensor | None = None
              ) -> tuple[Launch, torch.Tensor | None, dict[str, torch.Tensor]]:
    """dX (M × in) and the per-row-tile partials of dB₂, dA₁ and dC: the launch and its outputs. Given
    ``dx`` (the cuBLAS split: it holds dY·W), the launch adds the adapter's share into it."""
    base = dx is None
    m, out_features = dy.shape
    in_features = x.shape[1]
    block_r = rank_block(f.k)
    # enough row tiles for any config that can run (the finish reads only the ones written): the FMA
    # tiles of IEEE fp32 and the interpreter's are 32 rows, the tensor-core ones at least 64
    ieee = dot_precision(dy.dtype) == "ieee" and dy.element_size() == 4
    tiles = row_tile_bound(m, f.adapters, SMALLEST_BLOCK_M if INTERPRET or ieee else TENSOR_CORE_BLOCK_M)
    partials = {"b2": torch.empty((tiles, out_features, f.k), device=dy.device, dtype=torch.float32),
                "a1": torch.empty((tiles, f.k, in_features), device=dy.device, dtype=torch.float32),
                "core": torch.empty((tiles, block_r, block_r), device=dy.device, dtype=torch.float32)}
    if dx is None and compute_dx:
        dx = torch.empty((m, in_features), device=dy.device, dtype=dy.dtype)
    out = dx if dx is not None else partials["a1"]  # a pointer the launch never writes without dX
    # g = dL/dh, a slot per column group (see dx_kernel); freed with this call
    grad_h = torch.empty((max_column_groups(m, in_features, dy.device, f.adapters), m, f.k), device=dy.device,
                         dtype=torch.float32)
    args = (dy, weight if weight is not None else dy, x, h, f.q_down, b2, *f.core_args(), out,
            partials["b2"], partials["a1"], partials["core"], grad_h, m, in_features, out_features, f.r, f.k,
            token_bucket(m), float(f.alpha), float(dropout_p), seed_pointer(seed, dropout_p, dy), dy.stride(0),
            dy.stride(1), *w_strides,
            x.stride(0), x.stride(1), out.stride(0) if dx is not None else 0, out.stride(1) if dx is not None else 0,
            *b2_strides(b2, f, dy.dtype),
            *_quant_args(weight if weight is not None else dy, quant if compute_dx else None), f.segment_pointer())
    flags = {"COMPUTE_DX": compute_dx, "SCALE_BY_KEPT": bool(f.scale_by_kept), "DROPOUT": dropout_p > 0,
             "PRECISION": dot_precision(dy.dtype),
             **(quant.flags() if quant is not None and compute_dx else NO_QUANT_FLAGS),
             "BASE": base, "W_AS_A": w_as_a(quant if compute_dx else None, dy.device), "ADAPTERS": f.adapters,
             "BLOCK_R": block_r, "BLOCK_RR": rank_block(f.r)}

    def grid(meta: dict[str, int]) -> tuple[int, ...]:
        row_tiles = row_tile_bound(m, f.adapters, meta["BLOCK_M"])
        return (row_tiles * column_groups(row_tiles, cdiv(in_features, meta["BLOCK_N"]), dy.device),)

    return Launch("dx", args, flags, grid, dy.device), dx, partials


def finish_launch(partials: dict[str, torch.Tensor], tiles: int, f: Factors, tile_rows: int = 1
                  ) -> tuple[Launch, dict[str, torch.Tensor]]:
    """Sum the partials of `dx_launch` over its ``tiles`` row tiles (of ``tile_rows`` rows: several adapters
    find their own tiles with it) and take the core's gradients (each in its factor's dtype)."""
    _, out_features, _ = partials["b2"].shape
    in_features = partials["a1"].shape[2]
    device = partials["b2"].device
    # each gradient in its factor's dtype (summed in fp32, rounded once by the store): a bf16 adapter's
    # gradients need no cast launches after this one
    grads = {name: torch.empty(getattr(f, name).shape, device=device, dtype=getattr(f, name).dtype)
             for name in ("p_up", "q_down", "q_up", "singular_values", "p_down")}
    programs = cdiv(out_features, FINISH_BLOCK) + cdiv(in_features, FINISH_BLOCK) + 1
    args = (partials["b2"], partials["a1"], partials["core"], *f.core_args(), grads["p_up"], grads["q_down"],
            grads["q_up"], grads["singular_values"], grads["p_down"], tiles, out_features, in_features, f.r, f.k,
            float(f.alpha), f.segment_pointer(), tile_rows)
    flags = {"SCALE_BY_KEPT": bool(f.scale_by_kept), "ADAPTERS": f.adapters, "BLOCK": FINISH_BLOCK,
             "BLOCK_R": rank_block(f.k), "BLOCK_RR": rank_block(f.r)}
    return Launch("finish", args, flags, lambda meta: (programs, f.adapters), device), grads


# The row bands address a row tile's rows with int32 offsets (row · stride < 2³¹ for up to 128 rows): what
# keeps their loops over column tiles in registers (forward_kernel). A 2-D input whose rows lie further apart
# than this is refused, not read wrong.
MAX_ROW_STRIDE = (2**31 - 1) // max(c.kwargs["BLOCK_M"] for c in ALL_CONFIGS)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view (tokens × features) of ``t``, as the kernels address it."""
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[0] > 1 and flat.stride(0) > MAX_ROW_STRIDE:
        raise ValueError(f"lora2 kernels: rows {flat.stride(0)} elements apart (at most {MAX_ROW_STRIDE}); the "
                         "kernels address rows with 32-bit offsets: pass a contiguous tensor (.contiguous())")
    return flat


def _weight_view(weight: torch.Tensor, quant: Quant4 | None, fan_in_fan_out: bool, backward: bool
                 ) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """(W's pointer, out features, strides of B) with B[k, n] = W[n, k] in the forward (k over in)
    and B[k, n] = W[k, n] in the backward (k over out). A 4-bit W is addressed by element index of
    its row-major (out × in) layout; a Conv1D keeps its (in × out) storage."""
    if quant is not None:
        out_features, in_features = quant.shape
        return quant.packed, out_features, (in_features, 1) if backward else (1, in_features)
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    strides = (weight.stride(0), weight.stride(1))
    return weight, out_features, strides if fan_in_fan_out != backward else strides[::-1]


def _dequantize_for(tokens: int, weight: torch.Tensor, quant: Quant4 | None, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, Quant4 | None, list[Launch]]:
    """(weight, quant, launches): a 4-bit W stays packed for the kernels' K loops up to
    FUSED_DEQUANT_MAX_TOKENS rows; above, one launch dequantises it into a buffer for this call."""
    if quant is None or tokens <= FUSED_DEQUANT_MAX_TOKENS:
        return weight, quant, []
    launch, dense = dequantize_launch(quant, dtype)
    return dense, None, [launch]


# The cuBLAS split (issue "Kernels v3", item 5): the base GEMM through torch.mm (cuBLAS) and the adapter in a
# Triton launch that adds into its output (forward_kernel / dx_kernel with BASE False: no W in their K loops,
# row bands), one launch more each way. The fused kernels' GEMM core loads through pointers
# (no TMA, not persistent, no warp specialisation); where cuBLAS's GEMM is faster by more than the split's
# extra read and write of y (or dX), the split wins. On a GPU the first call of a key times both and keeps
# the faster (logged); LORA2_BASE_GEMM=fused or =cublas forces one. Never during a CUDA-graph capture or
# under the interpreter (there: fused, unless forced), and never over a 4-bit W kept packed nor for fp32
# under IEEE precision (FMA tiles, no cuBLAS tensor cores to win back).
BASE_GEMM_CHOICES = ("auto", "fused", "cublas")
_BASE_GEMM_CHOSEN: dict[tuple, str] = {}
logger = logging.getLogger("lora2_kernels.triton_kernels")


def base_gemm(key: tuple, device: torch.device, run: Callable[[bool], object]) -> str:
    """"fused" or "cublas" for this launch key; ``run(split)`` runs the whole variant (for timing)."""
    forced = os.environ.get("LORA2_BASE_GEMM", "auto")
    if forced not in BASE_GEMM_CHOICES:
        raise ValueError(f"LORA2_BASE_GEMM={forced!r}: use one of {BASE_GEMM_CHOICES}")
    if forced != "auto":
        return forced
    if key in _BASE_GEMM_CHOSEN:
        return _BASE_GEMM_CHOSEN[key]
    if device.type != "cuda" or INTERPRET or torch.cuda.is_current_stream_capturing():
        return "fused"
    import triton.testing

    times = {}
    for choice in ("fused", "cublas"):
        run(choice == "cublas")  # compiles and autotunes outside the timing
        times[choice] = triton.testing.do_bench(lambda: run(choice == "cublas"), warmup=5, rep=25,
                                                return_mode="median")
    chosen = min(times, key=times.get)
    _BASE_GEMM_CHOSEN[key] = chosen
    logger.info("lora2 kernels: %s %s → %s (fused %.1f µs, cuBLAS split %.1f µs)", key[0], key[1:], chosen,
                1000 * times["fused"], 1000 * times["cublas"])
    return chosen


def ieee_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs with IEEE dots (torch's "highest" matmul precision): the FMA tiles, which take no split."""
    return dtype == torch.float32 and dot_precision(dtype) == "ieee"


def _dense_weight(weight: torch.Tensor, fan_in_fan_out: bool, backward: bool) -> torch.Tensor:
    """W as torch.mm's right operand: in × out in the forward (x·Wᵀ), out × in in the backward (dY·W)."""
    forward_operand = weight if fan_in_fan_out else weight.t()
    return forward_operand.t() if backward else forward_operand


def lora2_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, f: Factors,
                  fan_in_fan_out: bool = False, dropout_p: float = 0.0, seed: "torch.Tensor | int" = 0,
                  quant: Quant4 | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, B₂ in x's dtype): the forward of a LoRA² layer in one launch (plus the factors' cast where
    their dtype is not x's; plus cuBLAS's GEMM where the split is faster, see `base_gemm`).

    x and W share a dtype (callers apply autocast); h (fp32) and B₂ (cast) are for the backward.
    With ``quant`` W is bitsandbytes' 4-bit weight, dequantised tile by tile inside the K loop."""
    x2 = _flat(x)
    casts, a1, b2 = in_activation_dtype(f, x.dtype)
    dense, quant, dequant = _dequantize_for(x2.shape[0], weight, quant, x.dtype)
    w_ptr, out_features, w_strides = _weight_view(dense, quant, fan_in_fan_out, backward=False)

    def run(split: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.mm(x2, _dense_weight(dense, fan_in_fan_out, backward=False)) if split else None
        launch, y, h = forward_launch(x2, w_ptr, w_strides, bias, f, a1, out_features, dropout_p, seed, quant, y)
        if x2.shape[0]:
            launch.run()
        return y, h

    if x2.shape[0]:
        for cast in casts + dequant:
            cast.run()
    elif casts:
        # nothing launched for an empty batch; the backward needs B₂ᵀ (k × adapters·out)
        b2 = f.p_up.reshape(-1, f.k).t().contiguous().to(x.dtype)
    split = False
    if quant is None and x2.shape[0] and not ieee_fp32(x.dtype):
        key = ("forward", token_bucket(x2.shape[0]), out_features, x2.shape[1], f.k, f.r, x.dtype, dropout_p > 0,
               bias is not None, fan_in_fan_out, x.device)
        split = base_gemm(key, x.device, run) == "cublas"
    y, h = run(split)
    return y.view(*x.shape[:-1], out_features), h.view(*x.shape[:-1], f.k), b2


def lora2_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, f: Factors, hidden: torch.Tensor,
                   b2: torch.Tensor, fan_in_fan_out: bool = False, dropout_p: float = 0.0,
                   seed: "torch.Tensor | int" = 0,
                   needs_input_grad: bool = True, needs_weight_grad: bool = False, needs_bias_grad: bool = False,
                   quant: Quant4 | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(dX, dW, db, {factor: gradient}) of `lora2_forward`: two launches (plus cuBLAS's dY·W where the split
    is faster; dW and db, only for an unfrozen base, are plain torch ops; a 4-bit base is always frozen)."""
    if quant is not None and needs_weight_grad:
        raise RuntimeError("a 4-bit weight is frozen: it has no gradient.")
    dy = _flat(grad_y)
    x2 = _flat(x)
    h = _flat(hidden)
    dense, quant, dequant = _dequantize_for(dy.shape[0] if needs_input_grad else 0, weight, quant, dy.dtype)
    w_ptr, _, w_strides = _weight_view(dense, quant, fan_in_fan_out, backward=True)

    def run(split: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], int, int]:
        dx = torch.mm(dy, _dense_weight(dense, fan_in_fan_out, backward=True)) if split else None
        launch, grad_x, partials = dx_launch(dy, x2, w_ptr if needs_input_grad else None, w_strides, h, f, b2,
                                             dropout_p, seed, needs_input_grad, quant, dx)
        tiles, tile_rows = 0, 1
        if dy.shape[0]:
            config = launch.run()
            tile_rows = config["BLOCK_M"]
            tiles = row_tile_bound(dy.shape[0], f.adapters, tile_rows)
        return grad_x, partials, tiles, tile_rows

    if dy.shape[0]:
        for step in dequant:
            step.run()
    split = False
    if quant is None and needs_input_grad and dy.shape[0] and not ieee_fp32(dy.dtype):
        key = ("dx", token_bucket(dy.shape[0]), x2.shape[1], dy.shape[1], f.k, f.r, dy.dtype, dropout_p > 0,
               fan_in_fan_out, dy.device)
        split = base_gemm(key, dy.device, run) == "cublas"
    grad_x, partials, tiles, tile_rows = run(split)
    finish, grads = finish_launch(partials, tiles, f, tile_rows)
    finish.run()
    grad_weight = grad_bias = None
    if needs_weight_grad:
        grad_weight = dy.t() @ x2
        grad_weight = grad_weight.t().contiguous() if fan_in_fan_out else grad_weight
    if needs_bias_grad:
        grad_bias = dy.sum(0)
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    return grad_x, grad_weight, grad_bias, grads


def dropout_keep_mask(seed: "torch.Tensor | int", rows: int, cols: int, p: float, device: torch.device | str
                      ) -> torch.Tensor:
    """The keep mask the kernels draw for a (rows × cols) input (bool): for tests and the reference."""
    out = torch.empty((rows, cols), device=device, dtype=torch.int8)
    if out.numel():
        keep_mask_kernel[(cdiv(rows, 32), cdiv(cols, 32))](out, rows, cols, float(p),
                                                                         seed_pointer(seed, p, out), BLOCK=32)
    return out.bool()


@triton.jit
def keep_mask_kernel(out_ptr, M, N, p, seed_ptr, BLOCK: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], _keep(seed_ptr, rm, tl.program_id(1) * BLOCK, BLOCK, p).to(tl.int8),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def warmup(keys, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", buckets: int = 4) -> int:
    """Compile and autotune the kernels now for every ``(tokens, in, out, k, r, bias, dropout)`` key
    (`lora2_kernels.warmup_keys(model, tokens)` lists a model's), so no training step waits on it.

    The tuning is keyed by the power-of-two bucket of the token count, the sizes, the bias and
    dropout flags, whether dX is needed, and the dtypes: this tunes the bucket of ``tokens`` and
    the ``buckets - 1`` below it (short last batches, shorter padded sequences), with and without
    dX (a model's first adapted layers get no input gradient). Triton caches the choices on disk.
    Returns the number of keys tuned.
    """
    done = set()
    for tokens, in_features, out_features, rank, r, has_bias, dropout in keys:
        for i in range(buckets):
            rows = max(16, token_bucket(int(tokens)) >> i)
            key = (rows, int(in_features), int(out_features), int(rank), int(r), bool(has_bias), float(dropout))
            if key in done:
                continue
            done.add(key)
            x = torch.randn(rows, key[1], device=device, dtype=dtype)
            weight = torch.randn(key[2], key[1], device=device, dtype=dtype)
            b = torch.randn(key[2], device=device, dtype=dtype) if has_bias else None
            f = Factors(torch.randn(rank, key[1], device=device), torch.randn(r, rank, device=device),
                        torch.randn(r, device=device), torch.randn(rank, r, device=device),
                        torch.randn(key[2], rank, device=device), torch.ones(r, device=device), 16.0, False)
            y, h, b2 = lora2_forward(x, weight, b, f, dropout_p=dropout, seed=0)
            for needs_input_grad in (True, False):
                lora2_backward(torch.randn_like(y), x, weight, f, h, b2, dropout_p=dropout, seed=0,
                               needs_input_grad=needs_input_grad)
    return len(done)
