"""What the fused kernels do, counted under the Triton interpreter (no GPU): the FLOPs of every tl.dot and the
Philox values drawn, per launch, for one training step of one projection.

    TRITON_INTERPRET=1 python -m benchmarks.kernel_counts            # 64 × 512 → 1024, k = 8, dropout 0.1
    TRITON_INTERPRET=1 python -m benchmarks.kernel_counts --tokens 128 --in 768 --out 768 --json

Every tl.dot is recorded from the interpreter's ``create_dot`` (its operand tiles' shapes), every draw from
``tl.philox`` (its counters' size); the ratios are against the base GEMM's 2·M·in·out (forward) and dX's
2·M·out·in (backward). Padded rank tiles count as the interpreter computes them: what the GPU computes too.
``--column-groups`` sets how many programs share a row tile's column tiles (the GPU's choice depends on its
SM count, lora_linear.column_groups); the default is what the interpreter runs.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from contextlib import contextmanager

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


@contextmanager
def recording():
    """{launch kernel: {"flops": ..., "draws": ...}} filled while the block runs (interpreter only)."""
    import triton.language as tl
    from triton.runtime import interpreter

    counts: dict[str, dict[str, float]] = defaultdict(lambda: {"flops": 0.0, "draws": 0.0, "launches": 0})
    current = ["?"]
    real_dot = interpreter.InterpreterBuilder.create_dot
    real_philox = tl.philox
    real_call = interpreter.GridExecutor.__call__

    def create_dot(self, a, b, d, *args, **kwargs):
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        counts[current[0]]["flops"] += 2.0 * m * n * k
        return real_dot(self, a, b, d, *args, **kwargs)

    def philox(seed, c0, *args, **kwargs):  # one Philox evaluation per counter, i.e. per masked element
        counts[current[0]]["draws"] += float(c0.handle.data.size)
        return real_philox(seed, c0, *args, **kwargs)

    def call(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", "?").removesuffix("_kernel")
        previous, current[0] = current[0], name
        counts[name]["launches"] += 1
        try:
            return real_call(self, *args, **kwargs)
        finally:
            current[0] = previous

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.GridExecutor.__call__ = call
    philox.__name__ = "philox"
    tl.philox = philox
    tl.random.philox = philox
    # the kernels' jitted functions look tl.philox up in tl at run time under the interpreter
    try:
        yield counts
    finally:
        interpreter.InterpreterBuilder.create_dot = real_dot
        interpreter.GridExecutor.__call__ = real_call
        tl.philox = real_philox
        tl.random.philox = real_philox


def count_step(tokens: int = 64, in_features: int = 512, out_features: int = 1024, k: int = 8, r: int = 8,
               dropout: float = 0.1, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Counts of one forward and backward through the fused kernels, with the ratios the issues quote."""
    from lora2_kernels.triton_kernels import lora_linear as kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
    f = kernels.Factors(torch.randn(k, in_features, generator=g), torch.randn(r, k, generator=g),
                        torch.randn(r, generator=g), torch.randn(k, r, generator=g),
                        torch.randn(out_features, k, generator=g), torch.ones(r), 16.0, False)
    with recording() as counts:
        y, h, b2 = kernels.lora2_forward(x, weight, None, f, dropout_p=dropout, seed=3)
        forward = {name: dict(c) for name, c in counts.items()}
        counts.clear()
        kernels.lora2_backward(torch.randn_like(y), x, weight, f, h, b2, dropout_p=dropout, seed=3)
        backward = {name: dict(c) for name, c in counts.items()}
    gemm = 2.0 * tokens * in_features * out_features
    elements = tokens * in_features
    return {
        "tokens": tokens, "in": in_features, "out": out_features, "k": k, "r": r, "dropout": dropout,
        "forward_flops_over_gemm": sum(c["flops"] for c in forward.values()) / gemm,
        "backward_flops_over_gemm": sum(c["flops"] for c in backward.values()) / gemm,
        "forward_draws_per_element": sum(c["draws"] for c in forward.values()) / elements,
        "backward_draws_per_element": sum(c["draws"] for c in backward.values()) / elements,
        "forward_launches": sum(c["launches"] for c in forward.values()),
        "backward_launches": sum(c["launches"] for c in backward.values()),
        "per_launch": {"forward": forward, "backward": backward},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--in", dest="in_features", type=int, default=512)
    parser.add_argument("--out", dest="out_features", type=int, default=1024)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--column-groups", type=int, help="programs per row tile (default: the interpreter's)")
    parser.add_argument("--tiles", help="BLOCK_M x BLOCK_N x BLOCK_K of the forward and dX programs, e.g. 128x256x64 "
                                        "(a GPU config's; default: the interpreter's 32x32x32, which crosses every "
                                        "tile boundary in the tests and recomputes more rank-k work than a GPU)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("run under TRITON_INTERPRET=1: the counts are taken by the interpreter")
    if args.column_groups:
        from lora2_kernels.triton_kernels import lora_linear

        lora_linear.INTERPRETER_COLUMN_GROUPS = args.column_groups
    tiles = "interpreter tiles"
    if args.tiles:
        from lora2_kernels.triton_kernels import lora_linear

        block_m, block_n, block_k = (int(v) for v in args.tiles.lower().split("x"))
        lora_linear.INTERPRETER_MATMUL_CONFIG = {**lora_linear.INTERPRETER_MATMUL_CONFIG, "BLOCK_M": block_m,
                                                 "BLOCK_N": block_n, "BLOCK_K": block_k}
        tiles = f"{block_m} × {block_n} × {block_k} tiles"
    result = count_step(args.tokens, args.in_features, args.out_features, args.k, args.r, args.dropout)
    if args.json:
        print(json.dumps(result, indent=2))  # noqa: T201
        return 0
    print(f"{args.tokens} × {args.in_features} → {args.out_features}, k = {args.k}, r = {args.r}, "  # noqa: T201
          f"dropout {args.dropout} ({tiles})")
    for phase in ("forward", "backward"):
        print(f"  {phase:<8} tl.dot FLOPs / GEMM {result[f'{phase}_flops_over_gemm']:.3f}   "  # noqa: T201
              f"Philox evaluations / x element {result[f'{phase}_draws_per_element']:.2f}   "
              f"launches {result[f'{phase}_launches']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
