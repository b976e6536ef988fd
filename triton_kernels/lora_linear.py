"""Fused Triton kernels for a linear layer plus a rank-k LoRA, the op every LoRA2Linear runs:

    y = x·Wᵀ + b + (x·downᵀ)·upᵀ          h = x·downᵀ (float32, saved for the backward)

For LoRA², down = A₁ (k × in) and up = B₂·C (out × k), where the k × k core
C = s·A₂·diag(λ⊙mask)·B₁ holds the masked singular values; lora2_kernels.ops forms it with one
tiny torch op before the launch (out·k² FLOPs) and autograd takes the gradient of ``up`` back to
λ, B₁, A₂ and B₂. The reference of every function here is lora2_kernels/reference.py.

Kernels (two; each launch below is one of them):

``lora_matmul_kernel``: OUT = X·B + (X·D)·U (+ bias), and H = X·D.
    forward: X = x, B = Wᵀ, D = downᵀ, U = upᵀ   → y and h
    dX:      X = dY, B = W, D = up, U = down      → dX = dY·W + (dY·up)·down and g = dY·up
    The rank-k product X·D rides in the K loop of the base GEMM: each program loads its X tile
    once and feeds both dots, so x (or dY) is read once for both, there is no extra launch and
    no out-sized temporary, and the LoRA term is added to the fp32 accumulator before the single
    rounding to the output dtype. The price is that every N-tile program recomputes its rows of
    X·D: with k padded to BLOCK_R = 16 that is 16 / BLOCK_N (6–12 %) extra tensor-core work. The
    alternative — a separate skinny GEMM for h, then the base GEMM with h·Uᵀ in its epilogue —
    reads x twice and launches twice. Which is faster on an H100 is owed a measurement
    (`python -m benchmarks.throughput`); this session had no GPU.

``rank_reduce_kernel``: OUT[r, n] = Σ_t A[t, r]·B[t, n], the k-wide gradient reductions
    d down = gᵀ·x (A = g, B = x) and d up = (hᵀ·dY)ᵀ (A = h, B = dY).
    The token dimension is split across programs (enough of them to fill the GPU even for
    k × 256 outputs); each writes its own partial sum and the host adds the partials. No atomics
    anywhere, so every kernel here is deterministic: same inputs, same bits.

Rank-k tiles are padded to BLOCK_R = max(16, next power of two of k) with masked loads (Triton
3.6 rejects a tl.dot whose K is below 16); no padded copy of any tensor is made. All rank-k
quantities accumulate in fp32. Sizes need not be multiples of any block.

Autotuning: each kernel has a small config set, timings are cached on disk by Triton
(``cache_results``), and `warmup()` runs the tuning for given shapes up front, so a training
step never waits on it. Under ``TRITON_INTERPRET=1`` (CPU tensors, CI) autotuning is skipped and
a fixed small config runs, which exercises the tile-boundary masks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_RANK = 64  # the k the kernels cover; larger inner widths take the reference path

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton 3.6's interpreter keeps bf16 as uint16 and its tl.dot multiplies those bit patterns as
# integers (runtime/interpreter.py, create_dot). Under the interpreter only, dot operands are
# upcast to fp32 first; bf16·bf16 products are exact in fp32, so this computes what the GPU's
# bf16 tensor-core dot computes. Compiled for a GPU, this is False and no cast is emitted.
DOT_OPERANDS_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_matmul_kernel(
    x_ptr, b_ptr, d_ptr, u_ptr, bias_ptr, out_ptr, h_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_bk, stride_bn, stride_dk, stride_dr, stride_ur, stride_un,
    stride_om, stride_on, stride_hm, stride_hr,
    HAS_BIAS: tl.constexpr, COMPUTE_OUT: tl.constexpr, STORE_H: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-tiles share their B column-tiles while they sit in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N) if COMPUTE_OUT else 1
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        d = tl.load(d_ptr + (k0 + rk)[:, None] * stride_dk + rr[None, :] * stride_dr,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0).to(x.dtype)
        if DOT_OPERANDS_IN_FP32:
            x = x.to(tl.float32)
            d = d.to(tl.float32)
        if COMPUTE_OUT:
            b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_OPERANDS_IN_FP32:
                b = b.to(tl.float32)
            acc = tl.dot(x, b, acc, input_precision=PRECISION)
        hidden = tl.dot(x, d, hidden, input_precision=PRECISION)

    if COMPUTE_OUT:
        u = tl.load(u_ptr + rr[:, None] * stride_ur + rn[None, :] * stride_un,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(hidden, u.to(tl.float32), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if STORE_H:
        if pid_n == 0:  # every N-tile computed the same rows of H; one of them writes them
            tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, hidden,
                     mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["T_BUCKET"])
def rank_reduce_kernel(
    a_ptr, b_ptr, partial_ptr,
    T, N, R, ROWS_PER_SPLIT, T_BUCKET,
    stride_at, stride_ar, stride_bt, stride_bn, stride_ps, stride_pr, stride_pn,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rt = tl.arange(0, BLOCK_T)
    n_ok = rn < N
    r_ok = rr < R
    start = split * ROWS_PER_SPLIT
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, ROWS_PER_SPLIT, BLOCK_T):
        rows = (start + t0 + rt).to(tl.int64)
        t_ok = rows < T
        a = tl.load(a_ptr + rows[:, None] * stride_at + rr[None, :] * stride_ar,
                    mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bt + rn[None, :] * stride_bn,
                    mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(partial_ptr + split * stride_ps + rr[:, None] * stride_pr + rn[None, :] * stride_pn, acc,
             mask=r_ok[:, None] & n_ok[None, :])


# --- configurations ------------------------------------------------------------------------------

# Hopper-first tile shapes (wgmma wants BLOCK_M of 64·warpgroups and wide BLOCK_N); the last two
# keep fp32 inputs inside an A100's 164 KiB of shared memory.
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
REDUCE_CONFIGS = [
    triton.Config({"BLOCK_T": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 32, "BLOCK_N": 256}, num_warps=8, num_stages=3),
]
# Under the interpreter: small tiles, so the tests cross tile boundaries in every dimension.
INTERPRETER_MATMUL_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
INTERPRETER_REDUCE_CONFIG = {"BLOCK_T": 32, "BLOCK_N": 32}
REDUCE_ROW_GRANULE = 128  # ROWS_PER_SPLIT is a multiple of every BLOCK_T


def shared_memory_bytes(config: triton.Config, element_size: int, kernel: str) -> int:
    """Estimated shared memory of a config's pipelined tiles (for pruning what a GPU cannot fit)."""
    kw = config.kwargs
    if kernel == "matmul":
        per_stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"] + kw["BLOCK_K"] * 16) * element_size
    else:
        per_stage = (kw["BLOCK_T"] * 16 + kw["BLOCK_T"] * kw["BLOCK_N"]) * 4
    return per_stage * config.num_stages


def _max_shared_memory() -> int:
    device = torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


def _prune_matmul(configs, named_args, **kwargs):
    size = named_args["x_ptr"].element_size()
    limit = _max_shared_memory()
    fitting = [c for c in configs if shared_memory_bytes(c, size, "matmul") <= limit]
    return fitting or configs[-1:]


def _prune_reduce(configs, named_args, **kwargs):
    limit = _max_shared_memory()
    fitting = [c for c in configs if shared_memory_bytes(c, 4, "reduce") <= limit]
    return fitting or configs[-1:]


# The token count is keyed by its power-of-two bucket (M_BUCKET / T_BUCKET, arguments the kernels
# never read): with dynamic padding nearly every batch has another M, and keying on M itself would
# re-run the tuning for each of them.
if not INTERPRET:
    _matmul = triton.autotune(MATMUL_CONFIGS, key=["M_BUCKET", "N", "K", "R", "COMPUTE_OUT"], cache_results=True,
                              prune_configs_by={"early_config_prune": _prune_matmul})(lora_matmul_kernel)
    _reduce = triton.autotune(REDUCE_CONFIGS, key=["T_BUCKET", "N", "R"], cache_results=True,
                              prune_configs_by={"early_config_prune": _prune_reduce})(rank_reduce_kernel)


# --- host functions --------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch, built before it runs: the compile check (compile_all.py) builds the same
    launches on CPU tensors and compiles them for a GPU it does not have."""

    kernel: str  # "matmul" or "reduce"
    args: tuple
    flags: dict[str, object]  # constexpr arguments other than the tile configuration
    grid: Callable[[dict[str, int]], tuple[int, ...]]

    def run(self) -> None:
        if INTERPRET:  # one fixed small configuration; autotuning under the interpreter is pointless
            config = INTERPRETER_MATMUL_CONFIG if self.kernel == "matmul" else INTERPRETER_REDUCE_CONFIG
            KERNELS[self.kernel][self.grid(config)](*self.args, **self.flags, **config)
        else:
            _AUTOTUNED[self.kernel][self.grid](*self.args, **self.flags)


KERNELS = {"matmul": lora_matmul_kernel, "reduce": rank_reduce_kernel}
CONFIGS = {"matmul": MATMUL_CONFIGS, "reduce": REDUCE_CONFIGS}
_AUTOTUNED = {} if INTERPRET else {"matmul": _matmul, "reduce": _reduce}


def rank_block(rank: int) -> int:
    """BLOCK_R: k padded to a power of two of at least 16."""
    return max(16, triton.next_power_of_2(rank))


def token_bucket(tokens: int) -> int:
    """The autotuning key of a token count: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(tokens, 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 operands: IEEE unless torch allows TF32 for fp32 matmuls.

    Used for the main GEMM of fp32 inputs (bf16/fp16 operands ignore it) and for the fp32
    rank-k parts: for half inputs those always use TF32, which is 16/in of the main work."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def matmul_launch(x: torch.Tensor, b: torch.Tensor | None, b_strides: tuple[int, int], d: torch.Tensor,
                  d_strides: tuple[int, int], u: torch.Tensor | None, u_strides: tuple[int, int],
                  bias: torch.Tensor | None, n: int, rank: int,
                  compute_out: bool) -> tuple[Launch, torch.Tensor | None, torch.Tensor]:
    """OUT = X·B + (X·D)·U (+ bias) and H = X·D for a 2-D X (M × K): the launch and its outputs."""
    m, k = x.shape
    h = torch.empty((m, rank), device=x.device, dtype=torch.float32)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype) if compute_out else None
    placeholder = h  # pointer arguments this launch never reads still need a tensor
    args = (x, b if b is not None else placeholder, d, u if u is not None else placeholder,
            bias if bias is not None else placeholder, out if out is not None else placeholder, h,
            m, n if compute_out else 1, k, rank, token_bucket(m),
            x.stride(0), x.stride(1), *b_strides, *d_strides, *u_strides,
            out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0, h.stride(0), h.stride(1))
    flags = {"HAS_BIAS": bias is not None, "COMPUTE_OUT": compute_out, "STORE_H": True,
             "PRECISION": dot_precision(x.dtype), "BLOCK_R": rank_block(rank)}

    def grid(meta: dict[str, int]) -> tuple[int, ...]:
        tiles_n = triton.cdiv(n, meta["BLOCK_N"]) if compute_out else 1
        return (triton.cdiv(m, meta["BLOCK_M"]) * tiles_n,)

    return Launch("matmul", args, flags, grid), out, h


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def reduce_launch(a: torch.Tensor, b: torch.Tensor, programs: int | None = None) -> tuple[Launch, torch.Tensor]:
    """Σ_t a[t, :]ᵀ·b[t, :] for a: T × R (fp32) and b: T × N: the launch and its (splits, R, N) partials."""
    t, rank = a.shape
    n = b.shape[1]
    # Enough splits to fill the GPU when N is narrow (k/v projections of GQA models); each split's
    # rows are a multiple of every BLOCK_T, and a split never has fewer than REDUCE_ROW_GRANULE rows.
    programs = programs or _num_programs_target(a.device)
    splits = max(1, min(triton.cdiv(programs, triton.cdiv(n, 128)), triton.cdiv(t, REDUCE_ROW_GRANULE)))
    rows_per_split = triton.cdiv(triton.cdiv(max(t, 1), splits), REDUCE_ROW_GRANULE) * REDUCE_ROW_GRANULE
    splits = max(1, triton.cdiv(t, rows_per_split))
    partial = torch.zeros((splits, rank, n), device=a.device, dtype=torch.float32)
    args = (a, b, partial, t, n, rank, rows_per_split, token_bucket(t), a.stride(0), a.stride(1), b.stride(0),
            b.stride(1), partial.stride(0), partial.stride(1), partial.stride(2))
    flags = {"PRECISION": dot_precision(b.dtype), "BLOCK_R": rank_block(rank)}
    return Launch("reduce", args, flags, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)), partial


def rank_reduce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_t a[t, :]ᵀ·b[t, :] for a: T × R (fp32) and b: T × N → R × N (fp32), split over t."""
    launch, partial = reduce_launch(a, b)
    if a.shape[0]:
        launch.run()
    return partial.sum(0)  # a fixed-order sum of the partials: deterministic


def _launch_matmul(*args, **kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
    launch, out, h = matmul_launch(*args, **kwargs)
    if h.shape[0]:
        launch.run()
    return out, h


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                        up: torch.Tensor, fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x·Wᵀ + b + (x·downᵀ)·upᵀ and h = x·downᵀ (fp32): one kernel launch.

    Same contract as reference.lora_linear_forward; x and W share a dtype (callers apply autocast).
    """
    x2 = _flat(x)
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    rank = down.shape[0]
    # B[k, n] = W[n, k] (Linear, out × in) or Wc[k, n] (Conv1D storage, in × out)
    b_strides = (weight.stride(0), weight.stride(1)) if fan_in_fan_out else (weight.stride(1), weight.stride(0))
    y, h = _launch_matmul(x2, weight, b_strides, down, (down.stride(1), down.stride(0)), up,
                          (up.stride(1), up.stride(0)), bias, out_features, rank, compute_out=True)
    return y.view(*x.shape[:-1], out_features), h.view(*x.shape[:-1], rank)


def lora_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
    hidden: torch.Tensor, fan_in_fan_out: bool = False, needs_input_grad: bool = True,
    needs_weight_grad: bool = False, needs_bias_grad: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dX, dW, db, d down, d up) of `lora_linear_forward`; see reference.lora_linear_backward.

    Launches: one fused GEMM for dX = dY·W + (dY·up)·down that also writes g = dY·up (fp32), and
    two k-wide reductions, d down = gᵀ·x and d up = dYᵀ·h. Without an input gradient the GEMM
    runs in its rank-k-only mode and computes just g. dW (only if the frozen weight was
    unfrozen) and db are plain torch ops.
    """
    dy = _flat(grad_y)
    x2 = _flat(x)
    h = _flat(hidden)
    in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    rank = down.shape[0]
    # B[k, n] = W[k, n] (Linear) or Wc[n, k] (Conv1D storage)
    b_strides = (weight.stride(1), weight.stride(0)) if fan_in_fan_out else (weight.stride(0), weight.stride(1))
    grad_x, g = _launch_matmul(dy, weight if needs_input_grad else None, b_strides, up, (up.stride(0), up.stride(1)),
                               down if needs_input_grad else None, (down.stride(0), down.stride(1)), None,
                               in_features, rank, compute_out=needs_input_grad)
    grad_down = rank_reduce(g, x2).to(down.dtype)
    grad_up = rank_reduce(h, dy).t().to(up.dtype)
    grad_weight = grad_bias = None
    if needs_weight_grad:
        grad_weight = dy.t() @ x2
        grad_weight = grad_weight.t() if fan_in_fan_out else grad_weight
    if needs_bias_grad:
        grad_bias = dy.sum(0)
    if grad_x is not None:
        grad_x = grad_x.view(x.shape)
    return grad_x, grad_weight, grad_bias, grad_down, grad_up


def warmup(shapes, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", bias: bool = True,
           buckets: int = 4) -> int:
    """Compile and autotune the kernels now for every ``(tokens, in_features, out_features, rank)``.

    The tuning is keyed by the power-of-two bucket of the token count; this tunes the bucket of
    ``tokens`` and the ``buckets - 1`` below it (short last batches, shorter padded sequences).
    Triton caches the choices on disk, so a later run starts tuned. Calling this before training
    keeps the tuning out of the training steps. Returns the number of (shape, bucket) pairs tuned.
    """
    done = set()
    for tokens, in_features, out_features, rank in shapes:
        top = token_bucket(int(tokens))
        for i in range(buckets):
            rows = max(16, top >> i)
            key = (rows, int(in_features), int(out_features), int(rank))
            if key in done:
                continue
            done.add(key)
            x = torch.randn(rows, key[1], device=device, dtype=dtype)
            weight = torch.randn(key[2], key[1], device=device, dtype=dtype)
            b = torch.randn(key[2], device=device, dtype=dtype) if bias else None
            down = torch.randn(key[3], key[1], device=device)
            up = torch.randn(key[2], key[3], device=device)
            y, h = lora_linear_forward(x, weight, b, down, up)
            lora_linear_backward(torch.randn_like(y), x, weight, down, up, h)
    return len(done)
