"""Compile every lora2 Triton kernel, for every autotune configuration, for GPUs this machine lacks.

    python -m lora2_kernels.triton_kernels.compile_all                 # sm_90 and sm_80, a table
    python -m lora2_kernels.triton_kernels.compile_all --arch 90 --json

The Triton interpreter (how CI runs the kernels on CPU tensors) skips the compiler's checks: a
kernel can pass it and still fail to compile for a GPU (Triton 3.6, for one, rejects a tl.dot
whose K is below 16). This script builds the launches the host code really makes — on CPU
tensors, for the forward, dX, rank-k-only and reduction cases, Linear and Conv1D weights, bf16,
fp16 and fp32 — specialises their arguments exactly as Triton does at launch (dtypes, 16-byte
alignment, unit strides), and compiles each through ttir → ttgir → ptx → cubin for
``GPUTarget("cuda", arch, 32)``. It also checks that every configuration the autotuner would keep
on that GPU fits its shared memory. Exit status 1 on any failure.

It must run without TRITON_INTERPRET: once the interpreter has patched triton.language in a
process, that process can no longer compile.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_all must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).")

import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import lora_linear as kernels  # noqa: E402

# Largest dynamic shared memory per block (bytes): what `max_shared_mem` reports on each GPU.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


@dataclass
class Result:
    case: str
    kernel: str
    arch: int
    config: str
    ok: bool
    seconds: float
    shared_bytes: int | None = None
    pruned: bool = False  # the autotuner drops this config on this GPU (estimated shared memory): not compiled
    registers: int | None = None  # per thread, from ptxas -v (with --resources)
    spill_bytes: int | None = None
    atomics: int | None = None  # atomic ops in the TTIR: none, or the kernels are not deterministic
    error: str | None = None


def launches() -> dict[str, kernels.Launch]:
    """The launches the host functions make, on small CPU tensors of real-model divisibility."""
    tokens, in_f, out_f, rank = 256, 768, 2304, 8
    cases: dict[str, kernels.Launch] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for conv in (False, True) if dtype == torch.bfloat16 else (False,):
            layout = "conv1d" if conv else "linear"
            x = torch.empty(tokens, in_f, dtype=dtype)
            weight = torch.empty((in_f, out_f) if conv else (out_f, in_f), dtype=dtype)
            bias = torch.empty(out_f, dtype=dtype)
            down, up = torch.empty(rank, in_f), torch.empty(out_f, rank)
            dy = torch.empty(tokens, out_f, dtype=dtype)
            fwd_b = (weight.stride(0), weight.stride(1)) if conv else (weight.stride(1), weight.stride(0))
            dx_b = (weight.stride(1), weight.stride(0)) if conv else (weight.stride(0), weight.stride(1))
            cases[f"forward/{layout}/{name}"] = kernels.matmul_launch(
                x, weight, fwd_b, down, (down.stride(1), down.stride(0)), up, (up.stride(1), up.stride(0)), bias,
                out_f, rank, compute_out=True)[0]
            cases[f"dx/{layout}/{name}"] = kernels.matmul_launch(
                dy, weight, dx_b, up, (up.stride(0), up.stride(1)), down, (down.stride(0), down.stride(1)), None,
                in_f, rank, compute_out=True)[0]
            if dtype == torch.bfloat16 and not conv:
                cases[f"rank-only/{layout}/{name}"] = kernels.matmul_launch(
                    dy, None, dx_b, up, (up.stride(0), up.stride(1)), None, (0, 0), None, in_f, rank,
                    compute_out=False)[0]
                cases[f"forward-no-bias/{layout}/{name}"] = kernels.matmul_launch(
                    x, weight, fwd_b, down, (down.stride(1), down.stride(0)), up, (up.stride(1), up.stride(0)),
                    None, out_f, rank, compute_out=True)[0]
            if not conv:
                hidden = torch.empty(tokens, rank)
                cases[f"reduce-down/{name}"] = kernels.reduce_launch(hidden, x, programs=528)[0]
                cases[f"reduce-up/{name}"] = kernels.reduce_launch(hidden, dy, programs=528)[0]
    return cases


def specialise(fn, launch: kernels.Launch, config: triton.Config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as JITFunction.run would build them for this launch."""
    values = dict(zip(fn.arg_names, launch.args))
    values.update(launch.flags)
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        param = fn.params[index]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
            continue
        kind, attr = native_specialize_impl(CUDABackend, values[name], False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":  # an int equal to 1 (a unit stride) is baked into the kernel
            constexprs[name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(index,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


def _ptxas_resources(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers per thread, spill-store bytes) as ptxas reports them for this PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
    text = run.stdout + run.stderr
    registers, spills = re.findall(r"Used (\d+) registers", text), re.findall(r"(\d+) bytes spill stores", text)
    return (int(registers[0]) if registers else None), (int(spills[0]) if spills else None)


def compile_case(case: str, arch: int, resources: bool = False) -> list[Result]:
    launch = launches()[case]
    fn = kernels.KERNELS[launch.kernel]
    element_size = launch.args[0].element_size() if launch.kernel == "matmul" else 4
    results = []
    for config in kernels.CONFIGS[launch.kernel]:
        label = ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f", w{config.num_warps} s{config.num_stages}"
        if kernels.shared_memory_bytes(config, element_size, launch.kernel) > SHARED_MEMORY_LIMIT[arch]:
            results.append(Result(case, launch.kernel, arch, label, True, 0.0, pruned=True))
            continue  # never launched on this GPU
        signature, constexprs, attrs = specialise(fn, launch, config)
        start = time.perf_counter()
        try:
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        except Exception as e:  # noqa: BLE001 -- every compiler error is a result to report
            results.append(Result(case, launch.kernel, arch, label, False, time.perf_counter() - start,
                                  error=f"{type(e).__name__}: {str(e)[:2000]}"))
            continue
        shared = int(compiled.metadata.shared)
        fits = shared <= SHARED_MEMORY_LIMIT[arch]
        result = Result(case, launch.kernel, arch, label, fits, time.perf_counter() - start, shared,
                        error=None if fits else f"needs {shared} bytes of shared memory, sm_{arch} has "
                                                f"{SHARED_MEMORY_LIMIT[arch]}; the autotuner's estimate kept it")
        result.atomics = len(re.findall(r"\batomic_", compiled.asm["ttir"]))
        if resources:
            result.registers, result.spill_bytes = _ptxas_resources(compiled.asm["ptx"], arch)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--cases", nargs="*", help="substrings of case names to compile (default: all)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--resources", action="store_true", help="also report registers and spills (ptxas -v)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    jobs = [(case, arch) for case in launches() if not args.cases or any(c in case for c in args.cases)
            for arch in args.arch]
    # spawn, not fork: a forked child of a process running torch's and LLVM's threads can deadlock
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(compile_case, case, arch, args.resources) for case, arch in jobs]
        results = [r for f in futures for r in f.result()]
    if args.json:
        print(json.dumps({"triton": triton.__version__, "results": [asdict(r) for r in results]}, indent=1))
    else:
        for r in results:
            if r.pruned:
                print(f"sm_{r.arch} {r.case:<26} {r.config:<55} pruned: does not fit this GPU's shared memory")
                continue
            usage = f" regs {r.registers} spill {r.spill_bytes} B" if r.registers is not None else ""
            print(f"sm_{r.arch} {r.case:<26} {r.config:<55} {'ok' if r.ok else 'FAILED':<6} {r.seconds:5.2f} s "
                  f"smem {r.shared_bytes or 0:>6}{usage}{'  ' + r.error.splitlines()[0] if r.error else ''}")
        compiled = [r for r in results if not r.pruned]
        print(f"{sum(r.ok for r in compiled)} of {len(compiled)} compiled, {len(results) - len(compiled)} configs "
              f"pruned (Triton {triton.__version__})")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
