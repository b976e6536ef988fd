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
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
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

# The inner widths the compile check covers (the rank tile changes registers and shared memory).
RANKS = (1, 8, 16, 32)  # k = 64 is above lora_linear.MAX_RANK: every tile shape spills there
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
    # sm_90: the `pendings` of every wgmma wait inside a loop; a 0 there makes each wgmma wait for the
    # previous one (the loop is serialised), 1-2 keeps them in flight
    loop_wait_pendings: list[int] | None = None
    error: str | None = None


def quant4(out_f: int, in_f: int, nested: bool) -> kernels.Quant4:
    """Empty tensors shaped as bitsandbytes' 4-bit weight of an (out_f × in_f) layer, blocksize 64."""
    blocks = out_f * in_f // 64
    return kernels.Quant4(torch.empty(out_f * in_f // 2, dtype=torch.uint8),
                          torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32), torch.empty(16), 64,
                          (out_f, in_f), torch.empty(blocks // 256 + 1) if nested else None,
                          torch.empty(256) if nested else None, 256, 0.0)


@contextlib.contextmanager
def tf32_allowed():
    """torch's fp32 matmul precision "high" while launches are built (their dot precision follows it)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def launches(ranks: tuple[int, ...] = (8,)) -> dict[str, kernels.Launch]:
    """The launches the host functions make, on small CPU tensors of real-model divisibility.

    Every case at k = 8 (r = 8); with more ``ranks``, the Linear forward / dX cases of every dtype at
    those k too (the rank tile changes registers and shared memory)."""
    tokens, in_f, out_f, r = 256, 768, 2304, 8
    cases: dict[str, kernels.Launch] = {}

    def factors(rank: int, r: int = r) -> kernels.Factors:
        return kernels.Factors(torch.empty(rank, in_f), torch.empty(r, rank), torch.empty(r), torch.empty(rank, r),
                               torch.empty(out_f, rank), torch.empty(r), 16.0, False)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for conv in (False, True) if dtype == torch.bfloat16 else (False,):
            layout = "conv1d" if conv else "linear"
            x = torch.empty(tokens, in_f, dtype=dtype)
            weight = torch.empty((in_f, out_f) if conv else (out_f, in_f), dtype=dtype)
            bias = torch.empty(out_f, dtype=dtype)
            dy = torch.empty(tokens, out_f, dtype=dtype)
            fwd_w = (weight.stride(0), weight.stride(1)) if conv else (weight.stride(1), weight.stride(0))
            dx_w = (weight.stride(1), weight.stride(0)) if conv else (weight.stride(0), weight.stride(1))
            for rank in ranks if not conv else (8,):
                f = factors(rank)
                a1 = torch.empty(rank, in_f, dtype=dtype)
                b2 = torch.empty(rank, out_f, dtype=dtype) if dtype != torch.float32 else f.p_up  # Bᵀ as cast
                h = torch.empty(tokens, rank)
                tag = f"{layout}/{name}/k{rank}"
                cases[f"forward/{tag}"] = kernels.forward_launch(x, weight, fwd_w, bias, f, a1, out_f, 0.0, 0)[0]
                cases[f"dx/{tag}"] = kernels.dx_launch(dy, x, weight, dx_w, h, f, b2, 0.0, 0, True)[0]
                if rank == 8 and dtype == torch.bfloat16 and not conv:
                    cases[f"rank-only/{tag}"] = kernels.dx_launch(dy, x, None, dx_w, h, f, b2, 0.0, 0, False)[0]
                    cases[f"forward-no-bias/{tag}"] = kernels.forward_launch(x, weight, fwd_w, None, f, a1, out_f,
                                                                             0.0, 0)[0]
                    cases[f"forward-dropout/{tag}"] = kernels.forward_launch(x, weight, fwd_w, bias, f, a1, out_f,
                                                                             0.1, 1)[0]
                    cases[f"dx-dropout/{tag}"] = kernels.dx_launch(dy, x, weight, dx_w, h, f, b2, 0.1, 1, True)[0]
                    partials = kernels.dx_launch(dy, x, weight, dx_w, h, f, b2, 0.0, 0, True)[2]
                    cases[f"finish/{tag}"] = kernels.finish_launch(partials, 4, f)[0]
                    cases[f"cast/{tag}"] = kernels.cast_launch(f.q_down, f.p_up, dtype)[0]
                    # several adapters over one base (stacked factors, a row-tile → adapter table)
                    stacked = (torch.empty(3, *t.shape) for t in (f.q_down, f.q_up, f.singular_values, f.p_down,
                                                                   f.p_up, f.rank_mask))
                    many = kernels.Factors(*stacked, 16.0, False, torch.empty(4, dtype=torch.int32))
                    a1_many = torch.empty(3, rank, in_f, dtype=dtype)
                    b2_many = torch.empty(rank, 3 * out_f, dtype=dtype)
                    for p in (0.0, 0.1):
                        kind = "-dropout" if p else ""
                        cases[f"forward-adapters{kind}/{tag}"] = kernels.forward_launch(
                            x, weight, fwd_w, bias, many, a1_many, out_f, p, 1)[0]
                        cases[f"dx-adapters{kind}/{tag}"] = kernels.dx_launch(
                            dy, x, weight, dx_w, h, many, b2_many, p, 1, True)[0]
                    many_partials = kernels.dx_launch(dy, x, weight, dx_w, h, many, b2_many, 0.0, 0, True)[2]
                    cases[f"finish-adapters/{tag}"] = kernels.finish_launch(many_partials, 4, many, 64)[0]
                if not conv and len(ranks) > 1:
                    # the whole grid (issue "Kernels v3", item 6): dropout at every k and dtype, r = 32 (the core's
                    # BLOCK_RR) with and without dropout, and the cuBLAS split's kernels (BASE False)
                    if rank != 8 or dtype != torch.bfloat16:
                        cases[f"forward-dropout/{tag}"] = kernels.forward_launch(x, weight, fwd_w, bias, f, a1, out_f,
                                                                                 0.1, 1)[0]
                        cases[f"dx-dropout/{tag}"] = kernels.dx_launch(dy, x, weight, dx_w, h, f, b2, 0.1, 1, True)[0]
                    wide = factors(rank, 32)
                    b2_wide = b2 if dtype != torch.float32 else wide.p_up
                    for p in (0.0, 0.1):
                        kind = "-dropout" if p else ""
                        cases[f"forward{kind}/{layout}/{name}/r32/k{rank}"] = kernels.forward_launch(
                            x, weight, fwd_w, bias, wide, a1, out_f, p, 1)[0]
                        cases[f"dx{kind}/{layout}/{name}/r32/k{rank}"] = kernels.dx_launch(
                            dy, x, weight, dx_w, h, wide, b2_wide, p, 1, True)[0]
                        # the split is offered to fp32 only where torch allows TF32 (lora_linear.ieee_fp32)
                        with tf32_allowed():
                            cases[f"forward-split{kind}/{tag}"] = kernels.forward_launch(
                                x, weight, fwd_w, bias, f, a1, out_f, p, 1,
                                y=torch.empty(tokens, out_f, dtype=dtype))[0]
                            cases[f"dx-split{kind}/{tag}"] = kernels.dx_launch(
                                dy, x, weight, dx_w, h, f, b2, p, 1, True,
                                dx=torch.empty(tokens, in_f, dtype=dtype))[0]
                if dtype == torch.bfloat16 and not conv:
                    # a bitsandbytes 4-bit base (NF4 / FP4 share the kernel; double quantisation adds a table)
                    for nested, p in ((False, 0.0), (True, 0.0), (False, 0.1)):
                        if p and rank != 8 and len(ranks) == 1:
                            continue
                        q = quant4(out_f, in_f, nested)
                        kind = "4bit-nested" if nested else "4bit-dropout" if p else "4bit"
                        cases[f"forward-{kind}/{tag}"] = kernels.forward_launch(
                            x, q.packed, (1, in_f), bias, f, a1, out_f, p, 1, q)[0]
                        cases[f"dx-{kind}/{tag}"] = kernels.dx_launch(
                            dy, x, q.packed, (in_f, 1), h, f, b2, p, 1, True, q)[0]
                        if rank == 8 and not p:  # the large-batch path: W dequantised once, then the above
                            cases[f"dequantize-{kind}/{tag}"] = kernels.dequantize_launch(q, dtype)[0]
                if rank == 8 and dtype == torch.float32:  # fp32 where torch allows TF32: tensor-core tiles
                    with tf32_allowed():
                        cases[f"forward/{layout}/float32-tf32/k8"] = kernels.forward_launch(
                            x, weight, fwd_w, bias, f, a1, out_f, 0.0, 0)[0]
                        cases[f"dx/{layout}/float32-tf32/k8"] = kernels.dx_launch(
                            dy, x, weight, dx_w, h, f, b2, 0.0, 0, True)[0]
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


def loop_wait_pendings(ttgir: str) -> list[int]:
    """`pendings` of each ttng.warp_group_dot_wait in the K loops of a TTGIR module: the innermost scf.for
    loops where a wgmma accumulates into one of the loop's iter_args.

    Other loops wait for their dots once an iteration, and that serialises nothing: a loop holding a K loop
    (the row-band kernels' loop over column tiles), or one whose dots each start from a fresh accumulator
    (the cuBLAS split's tiles, whose epilogue dot is waited before its store)."""
    pendings, loops = [], []  # [brace depth at which its body opened, holds a loop, its waits, iter_args, K loop]
    depth = 0
    for line in ttgir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            if loops:
                loops[-1][1] = True
            carried = re.search(r"iter_args\((.*?)\)\s*->", line)
            names = set(re.findall(r"(%[\w#]+) =", carried.group(1))) if carried else set()
            loops.append([depth, False, [], names, False])
        if loops and "ttng.warp_group_dot " in line:
            operands = re.search(r"ttng\.warp_group_dot (%[\w#]+), (%[\w#]+), (%[\w#]+)", line)
            if operands and operands.group(3) in loops[-1][3]:
                loops[-1][4] = True
        if loops and "warp_group_dot_wait" in line:
            found = re.search(r"pendings\s*=\s*(\d+)", line)
            loops[-1][2].append(int(found.group(1)) if found else -1)
        depth += line.count("{") - line.count("}")
        while loops and depth <= loops[-1][0]:
            _, outer, waits, _, k_loop = loops.pop()
            if not outer and k_loop:
                pendings.extend(waits)
    return pendings


def compile_case(case: str, arch: int, resources: bool = False, check_exclusions: bool = False) -> list[Result]:
    """Every config of one launch case for sm_``arch``; the ones the autotuner excludes there are not
    compiled, except with ``check_exclusions``, which compiles the ones excluded for spilling (to
    re-derive kernels.SPILLS)."""
    if resources:
        # read the registers and spills off Triton's own ptxas run (so no cached kernel may skip it)
        os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    launch = launches(RANKS)[case]
    if "W_AS_A" in launch.flags:  # the host decides it from the GPU (lora_linear.w_as_a): as on an sm_``arch`` one
        launch.flags["W_AS_A"] = bool(launch.flags["QUANT"]) and arch >= 90
    fn = kernels.KERNELS[launch.kernel]
    element_size = launch.args[0].element_size()
    results = []
    for config in kernels.CONFIGS.get(launch.kernel, [triton.Config({}, num_warps=4, num_stages=1)]):
        label = config_label(config)
        excluded = launch.kernel in kernels.CONFIGS and kernels.config_excluded(
            config, launch.kernel, arch, element_size, launch.flags, SHARED_MEMORY_LIMIT[arch])
        if excluded and (not check_exclusions or "spills" not in excluded):
            results.append(Result(case, launch.kernel, arch, label, True, 0.0, pruned=True, error=excluded))
            continue  # never launched on this GPU
        signature, constexprs, attrs = specialise(fn, launch, config)
        start = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # Triton prints the log of its own `ptxas -v` run there
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
        if arch == 90:
            result.loop_wait_pendings = loop_wait_pendings(compiled.asm["ttgir"])
        if resources:
            text = log.getvalue()
            registers, spills = re.findall(r"Used (\d+) registers", text), re.findall(r"(\d+) bytes spill stores", text)
            result.registers = int(registers[0]) if registers else None
            result.spill_bytes = int(spills[0]) if spills else None
        results.append(result)
    return results


def config_label(config: triton.Config) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f", w{config.num_warps} s{config.num_stages}"


def spill_tables(results: list[dict]) -> dict[str, set[tuple]]:
    """lora_linear's SPILLS, QUANT_SPILLS and SPLIT_SPILLS as a run with ``--resources --check-exclusions``
    over the whole grid finds them: the key of every forward / dX config that spilled."""
    cases = launches(RANKS)
    index = {config_label(c): i for i, c in enumerate(kernels.ALL_CONFIGS)}
    tables: dict[str, set[tuple]] = {"SPILLS": set(), "QUANT_SPILLS": set(), "SPLIT_SPILLS": set()}
    for r in results:
        if r["kernel"] not in ("forward", "dx") or not r["spill_bytes"]:
            continue
        launch = cases[r["case"]]
        flags = launch.flags
        name = "QUANT_SPILLS" if flags.get("QUANT") else "SPILLS" if flags.get("BASE", True) else "SPLIT_SPILLS"
        tables[name].add((r["arch"], r["kernel"], launch.args[0].element_size(), bool(flags["DROPOUT"]),
                          index[r["config"]], flags["BLOCK_R"]))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--cases", nargs="*", help="substrings of case names to compile (default: all)")
    parser.add_argument("--exclude", nargs="*", default=[], help="substrings of case names not to compile")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--resources", action="store_true", help="also report registers and spills (ptxas -v)")
    parser.add_argument("--check-exclusions", action="store_true",
                        help="also compile the configs excluded for spilling (to re-derive lora_linear.SPILLS)")
    parser.add_argument("--tables", metavar="JSON",
                        help="print lora_linear's spill tables as a saved `--resources --check-exclusions --json` run "
                             "over the whole grid found them, and compile nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    if args.tables:
        with open(args.tables) as saved:
            for name, table in spill_tables(json.load(saved)["results"]).items():
                print(f"{name} = {{\n    " + ", ".join(map(str, sorted(table))) + ",\n}")
        return 0
    jobs = [(case, arch) for case in launches(RANKS) if (not args.cases or any(c in case for c in args.cases))
            and not any(c in case for c in args.exclude)
            for arch in args.arch]
    # spawn, not fork: a forked child of a process running torch's and LLVM's threads can deadlock
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(compile_case, case, arch, args.resources, args.check_exclusions) for case, arch in jobs]
        results = [r for f in futures for r in f.result()]
    if args.json:
        print(json.dumps({"triton": triton.__version__, "results": [asdict(r) for r in results]}, indent=1))
    else:
        for r in results:
            if r.pruned:
                print(f"sm_{r.arch} {r.case:<26} {r.config:<55} excluded: {r.error}")
                continue
            usage = f" regs {r.registers} spill {r.spill_bytes} B" if r.registers is not None else ""
            usage += f" loop waits {r.loop_wait_pendings}" if r.loop_wait_pendings else ""
            print(f"sm_{r.arch} {r.case:<26} {r.config:<55} {'ok' if r.ok else 'FAILED':<6} {r.seconds:5.2f} s "
                  f"smem {r.shared_bytes or 0:>6}{usage}{'  ' + r.error.splitlines()[0] if r.error else ''}")
        compiled = [r for r in results if not r.pruned]
        print(f"{sum(r.ok for r in compiled)} of {len(compiled)} compiled, {len(results) - len(compiled)} configs "
              f"pruned (Triton {triton.__version__})")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
