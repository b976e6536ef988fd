"""Mutation check: does the test suite catch a wrong kernel?

    python scripts/mutants.py                 # every mutant a CPU can see; a table; exit 1 on a survivor
    python scripts/mutants.py --list          # the mutants and the tests each one is checked against
    python scripts/mutants.py bias-dropped-half beta-swapped-cpp

Each mutant is one small deliberate bug: an exact text substitution in one file of the package (the
substitution must match, or the mutant is reported as stale). For each mutant the script copies the
working tree (git's tracked and untracked-not-ignored files) to a temporary folder, applies the
substitution, rebuilds the compiled importance op there if the mutant is in csrc/, and runs only the
tests that should catch it, with the copy first on PYTHONPATH. Outcomes:

- killed:   the tests failed (pytest exit 1): the suite sees this bug;
- SURVIVED: the tests passed: a wrong kernel would land. Exit status 1;
- BROKEN:   the tests could not run (collection error, build failure): the mutant proves nothing.
            Exit status 1 too, so a stale or broken mutant is fixed rather than counted;
- needs a GPU: the mutant is in code only a GPU runs (the CUDA kernel); run this on a GPU machine.

Before the mutants, the union of the selected tests runs once on the unmutated copy: a mutant only
counts as killed if the same tests pass without it.
"""

from __future__ import annotations

import argparse
import queue
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = "tests/test_triton_kernels.py"
IMPORTANCE_TESTS = "tests/test_importance_op.py"
HALF = "bfloat16 or float16"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file of the package, relative to the repository root
    old: str  # exact text to replace (every occurrence)
    new: str
    tests: tuple[str, ...]  # pytest arguments: files / node ids and -k expressions
    why: str  # the bug it stands for
    gpu: bool = False  # only code a GPU runs is changed


KERNEL = "triton_kernels/lora_linear.py"
REFERENCE = "lora2_kernels/reference.py"
CPP = "csrc/importance.cpp"

MUTANTS = [
    Mutant("bias-dropped-half", KERNEL,
           "acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]",
           "acc += 0.0 * tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]",
           (KERNEL_TESTS, "-k", HALF), "the fused forward forgets the bias (seen by the half-precision tests alone)"),
    Mutant("base-gemm-dropped-half", KERNEL, "acc = _dot(x, w, acc, PRECISION)", "acc = acc",
           (KERNEL_TESTS, "-k", HALF), "the frozen layer's GEMM is dropped (seen by the half-precision tests alone)"),
    Mutant("dx-base-gemm-dropped-half", KERNEL, "acc = _dot(dy, wt, acc, PRECISION)", "acc = acc",
           (KERNEL_TESTS, "-k", HALF), "dX loses dY·W (seen by the half-precision tests alone)"),
    Mutant("conv1d-strides-ignored", KERNEL,
           "return weight, out_features, strides if fan_in_fan_out != backward else strides[::-1]",
           "return weight, out_features, strides if backward else strides[::-1]",
           (KERNEL_TESTS, "-k", f"conv1d and ({HALF})"), "GPT-2 Conv1D's transposed weight read as an nn.Linear's"),
    Mutant("4bit-nibble-order-swapped", KERNEL,
           "nibble = (packed >> ((1 - (offsets & 1)) << 2)) & 15",
           "nibble = (packed >> ((offsets & 1) << 2)) & 15",
           ("tests/test_four_bit.py", "-k", "oracle and 37rows-nf4-float32"),
           "the 4-bit kernels read the low nibble first (bitsandbytes packs the even value high)"),
    Mutant("rank-k-term-doubled", KERNEL, "acc = tl.dot(z, b2t, acc, input_precision=PRECISION)",
           "acc = tl.dot(2.0 * z, b2t, acc, input_precision=PRECISION)",
           (KERNEL_TESTS, "-k", "oracle"), "the adapter term added twice"),
    Mutant("partial-sum-dropped", KERNEL,
           "        for t in range(0, TILES):\n            total += tl.load(part_b2_ptr",
           "        for t in range(1, TILES):\n            total += tl.load(part_b2_ptr",
           (KERNEL_TESTS, "-k", "oracle"), "the first row tile's partial of dB₂ is lost"),
    Mutant("fp32-always-tf32", KERNEL, 'return "ieee"', 'return "tf32"',
           (KERNEL_TESTS, "-k", "precision"), "fp32 inputs use TF32 dots although torch asked for IEEE"),
    Mutant("core-scale-doubled", KERNEL, "        s = alpha / R\n", "        s = 2 * alpha / R\n",
           (KERNEL_TESTS, "-k", "oracle"), "the kernels' k × k core applies α / r twice"),
    Mutant("mask-dropped", KERNEL, "w = lam * m * s", "w = lam * s",
           (KERNEL_TESTS, "-k", "oracle"), "the kernels do not apply the rank mask to λ"),
    Mutant("masked-lambda-gets-gradient", KERNEL, "grad_sv = tl.sum(a2t_dc * b1, axis=1) * m * s",
           "grad_sv = tl.sum(a2t_dc * b1, axis=1) * s",
           (KERNEL_TESTS, "-k", "oracle"), "the folded core's backward gives masked values a gradient"),
    Mutant("dropout-not-regenerated-for-da1", KERNEL, "                x = x * keep\n", "                x = x\n",
           (KERNEL_TESTS, "-k", "dropout"), "the backward forgets the dropout mask in dA₁"),
    Mutant("dropout-unscaled", KERNEL, "        hidden = hidden * (1.0 / (1.0 - dropout_p))",
           "        hidden = hidden", (KERNEL_TESTS, "-k", "dropout"), "the fused dropout does not rescale by 1 / (1 − p)"),
    Mutant("reference-core-scale-doubled", REFERENCE, "weighted = singular_values * rank_mask * scale  # r",
           "weighted = singular_values * rank_mask * scale * 2  # r",
           ("tests/test_linear.py", "-k", "papers_formula or every_gradient"),
           "the reference's k × k core applies α / r twice"),
    Mutant("reference-bias-dropped", REFERENCE,
           "base = F.linear(x, base_weight(weight, fan_in_fan_out), bias)",
           "base = F.linear(x, base_weight(weight, fan_in_fan_out), None)",
           ("tests/test_linear.py",), "the CPU (reference) path forgets the bias"),
    Mutant("beta-swapped-cpp", CPP, "beta1, beta2, finite)", "beta2, beta1, finite)",
           (IMPORTANCE_TESTS, "-k", "not nvcc and not glue"), "the compiled op swaps the EMAs' β₁ and β₂"),
    Mutant("uncertainty-from-old-ema-cpp", CPP,
           "*ema = e;\n    *unc = beta2 * *unc + (1.0f - beta2) * std::fabs(sensitivity - e);",
           "*unc = beta2 * *unc + (1.0f - beta2) * std::fabs(sensitivity - *ema);\n    *ema = e;",
           (IMPORTANCE_TESTS, "-k", "not nvcc and not glue"), "Ū measured against the previous step's Ī"),
    Mutant("score-term-dropped-cpp", CPP,
           "out[li] = score + b1_sum / static_cast<float>(k) + a2_sum / static_cast<float>(k);",
           "out[li] = score + b1_sum / static_cast<float>(k);",
           (IMPORTANCE_TESTS, "-k", "not nvcc and not glue"), "A₂'s share of the score is dropped"),
    Mutant("beta-swapped-reference", REFERENCE, "ema.mul_(beta1).add_((1 - beta1) * sensitivity)",
           "ema.mul_(beta2).add_((1 - beta2) * sensitivity)",
           (IMPORTANCE_TESTS, "-k", "not nvcc and not glue"), "the PyTorch reference uses β₂ for Ī"),
    Mutant("budget-schedule-quadratic", "lora2/allocator.py", "* (1.0 - progress) ** 3", "* (1.0 - progress) ** 2",
           ("tests/test_allocator.py", "-k", "budget"), "the budget decays quadratically, not cubically"),
    Mutant("row-band-tile-skipped", KERNEL,
           "    for pid_n in range(first, last):\n        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
           "        n_ok = rn < N\n        acc = tl.zeros(",
           "    for pid_n in range(first + 1, last):\n        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)\n"
           "        n_ok = rn < N\n        acc = tl.zeros(", (KERNEL_TESTS, "-k", "dropout_in_the_kernels"),
           "the forward's row band skips its group's first column tile"),
    # Kernels v3 (2026-12-04)
    Mutant("split-base-dropped", KERNEL, "    if not BASE:  # the cuBLAS split: y holds x·Wᵀ already",
           "    if False:  # the cuBLAS split: y holds x·Wᵀ already", (KERNEL_TESTS, "-k", "cublas_split"),
           "the cuBLAS split's forward overwrites cuBLAS's x·Wᵀ instead of adding to it"),
    Mutant("b2-layout-by-identity", KERNEL,
           "    if factors_cast(f, dtype):\n        return b2.stride(1), b2.stride(0), out_features",
           "    if b2 is not f.p_up:\n        return b2.stride(1), b2.stride(0), out_features",
           (KERNEL_TESTS, "-k", "checkpointing"),
           "B₂'s layout taken from object identity, which torch.utils.checkpoint's saved tensors break"),
    Mutant("dx-band-group-skips-gb", KERNEL,
           "    else:  # the same rows' gB again (a GPU with more SMs than row tiles runs several groups)\n"
           "        for k0 in range(0, K, BLOCK_K):",
           "    else:  # the same rows' gB again (a GPU with more SMs than row tiles runs several groups)\n"
           "        for k0 in range(0, 0, BLOCK_K):", (KERNEL_TESTS, "-k", "several_column_groups"),
           "dX's row band: a column group other than the first takes g = 0 (gB is group 0's alone)"),
    # several adapters over one base (issue 32): the row-tile → adapter table and each adapter's partials
    Mutant("adapter-tiles-without-slack", KERNEL,
           "    return cdiv(rows, block_m) + adapters - 1",
           "    return cdiv(rows, block_m)", ("tests/test_adapters.py",),
           "the grid as one adapter's: segments ending mid-tile need more tiles; the last rows are never computed"),
    Mutant("adapter-finish-sums-every-tile", KERNEL,
           "            first = tl.where(adapter == i, before, first)",
           "            first = tl.where(adapter == i, 0, first)", ("tests/test_adapters.py",),
           "an adapter's gradients sum the partials of the adapters before it"),
    Mutant("adapter-b2-shared", KERNEL,
           "        b2_ptr += tl.cast(adapter_id, tl.int64) * stride_b2a",
           "        b2_ptr += 0 * stride_b2a", ("tests/test_adapters.py",),
           "dX reads the first adapter's B₂ for every adapter"),
    Mutant("sweep-gradients-of-adapter-0", "lora2/sweep.py",
           "self.slices[i][index].grad = None if p.grad is None else p.grad[i]",
           "self.slices[i][index].grad = None if p.grad is None else p.grad[0]", ("tests/test_sweep.py",),
           "every adapter's optimiser steps on the first adapter's gradient"),
    Mutant("sweep-adapters-share-a-budget", "lora2/allocator.py",
           "flat = scores.reshape(self.groups, -1)", "flat = scores.reshape(1, -1)", ("tests/test_sweep.py",),
           "a sweep's adapters compete for one adapter's budget instead of each keeping its own"),
    # issue 32, the command line: what keeps each member of a sweep its single run
    Mutant("sweep-waiting-member-scored", "lora2/train_sweep.py",
           "        _restore_allocator_part(sweep, m.index, part)", "        pass",
           ("tests/test_train_sweep.py", "-k", "ahead"),
           "a member waiting for the others (checkpointed ahead) has its importance averages and masks moved"),
    Mutant("sweep-diverged-gradients-kept", "lora2/train_sweep.py",
           "    _keep_from_allocator(sweep, torch.stack(", "    (lambda *a: None)(sweep, torch.stack(",
           ("tests/test_train_sweep.py", "-k", "diverged"),
           "a diverged member's non-finite gradients reach the allocator's one importance call: the others skip it"),
    Mutant("sweep-member-head-shared", "lora2/train_sweep.py",
           "            if int(copy_index) == index:", "            if int(copy_index) == 0:",
           ("tests/test_train_sweep.py", "-k", "each_single"),
           "every member's optimiser trains member 0's head copy"),
    # issue 31: six kinds of bug the suite did not see (one mutant per kind)
    Mutant("nested-absmax-group-ignored", KERNEL,
           "scale = scale * tl.load(absmax2_ptr + block // QBLOCK2, mask=ok, other=0.0)",
           "scale = scale * tl.load(absmax2_ptr + (block // QBLOCK2) * 0, mask=ok, other=0.0)",
           ("tests/test_four_bit.py", "-k", "several_nested_groups"),
           "double-quantised absmax: every block takes the first nested group's scale"),
    Mutant("half-rounded-twice", KERNEL,
           "acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]",
           "acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(bias_ptr + rn, mask=n_ok, "
           "other=0.0).to(tl.float32)[None, :]",
           (KERNEL_TESTS, "-k", "rounded_once"), "the half-precision forward rounds the accumulator before the bias"),
    Mutant("compiled-backward-loses-seed", "lora2_kernels/ops.py",
           "scale_by_kept, fan_in_fan_out, dropout_p, seed, needs[0]",
           "scale_by_kept, fan_in_fan_out, dropout_p, (seed if seed is None else seed + 1), needs[0]",
           (KERNEL_TESTS, "-k", "agree or compile_with_dropout"),
           "the custom op's registered backward (what torch.compile runs) redraws another dropout mask"),
    Mutant("last-scoring-step-skipped", "lora2/allocator.py", "        if global_step <= self.decay_end:",
           "        if global_step < self.decay_end:", ("tests/test_allocator.py", "-k", "kept_set"),
           "the allocator stops scoring one step before its last masking"),
    Mutant("monotone-export-over-k", "lora2/export.py", 'return cfg["alpha"] / mask.sum().clamp_min(1.0)',
           'return cfg["alpha"] / (0 * mask.sum() + cfg["k"])', ("tests/test_export.py", "-k", "monotone"),
           "a monotone adapter exported with α / k instead of α / kept"),
    Mutant("labels-sorted-as-text", "lora2/data.py", "return [str(v) for v in sorted(values, key=float)]",
           "return sorted(values)", ("tests/test_data.py",), "numeric labels ordered as text: 10 before 2"),
    Mutant("ema-doubled-cuda", "csrc/importance_cuda.cu", "const float e = beta1 * *ema + (1.0f - beta1) * sensitivity;",
           "const float e = 2.0f * (beta1 * *ema + (1.0f - beta1) * sensitivity);",
           (IMPORTANCE_TESTS, "-k", "cuda and not nvcc"), "the CUDA kernel's EMA doubled", gpu=True),
]


def working_tree_files() -> list[str]:
    run = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True)
    return [p for p in run.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def make_copy(destination: Path) -> None:
    """The working tree as the editable install sees it: lora2_kernels.triton_kernels is triton_kernels/."""
    for rel in working_tree_files():
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    (destination / "lora2_kernels" / "triton_kernels").symlink_to("../triton_kernels", target_is_directory=True)
    for built in (ROOT / "lora2_kernels").glob("_C*.so"):  # the compiled op as installed (rebuilt for csrc/ mutants)
        shutil.copy2(built, destination / "lora2_kernels" / built.name)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
               LORA2_BUILD_CUDA="1" if has_gpu() else "0")  # the .cu mutant needs the CUDA op rebuilt
    env.setdefault("CI", "1")  # missing prerequisites fail rather than skip, as in CI
    return env


def check_copy_is_imported(copy: Path) -> None:
    probe = "import lora2_kernels, lora2_kernels.triton_kernels.lora_linear as k, lora2; print(lora2_kernels.__file__)"
    run = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=environment(copy), capture_output=True,
                         text=True, check=False)
    if run.returncode != 0 or not run.stdout.strip().startswith(str(copy)):
        sys.exit(f"mutants: the copy's packages are not the ones imported ({run.stdout.strip()}{run.stderr[-2000:]})")


def build_extension(copy: Path) -> str | None:
    """Rebuild lora2_kernels._C in the copy (with the CUDA op where a GPU is); the error text or None."""
    for built in (copy / "lora2_kernels").glob("_C*.so"):
        built.unlink()
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy,
                         env=environment(copy), capture_output=True, text=True, check=False)
    return None if run.returncode == 0 else (run.stdout + run.stderr)[-3000:]


def run_tests(copy: Path, tests: tuple[str, ...], stop_early: bool = True) -> tuple[int, str]:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-rN", *tests]
    if stop_early:
        args.append("-x")
    run = subprocess.run(args, cwd=copy, env=environment(copy), capture_output=True, text=True, check=False)
    return run.returncode, (run.stdout + run.stderr)[-3000:]


def apply(copy: Path, mutant: Mutant) -> int:
    path = copy / mutant.path
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.old)
    if count:
        path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
    return count


def restore(copy: Path, mutant: Mutant) -> None:
    shutil.copy2(ROOT / mutant.path, copy / mutant.path)


_GPU: list[bool] = []


def has_gpu() -> bool:
    if not _GPU:
        import torch

        _GPU.append(torch.cuda.is_available())
    return _GPU[0]


def run_mutant(copy: Path, m: Mutant, gpu: bool) -> tuple[Mutant, str, float, str]:
    """Apply ``m`` in ``copy``, run its tests, restore the copy: (mutant, outcome, seconds, output)."""
    start = time.perf_counter()
    if m.gpu and not gpu:
        return m, "needs a GPU", 0.0, ""
    if apply(copy, m) == 0:
        return m, "BROKEN (stale: text not found)", 0.0, ""
    try:
        error = build_extension(copy) if m.path.startswith("csrc/") else None
        if error is not None:
            outcome, detail = "BROKEN (build failed)", error
        else:
            code, detail = run_tests(copy, m.tests)
            outcome = {0: "SURVIVED", 1: "killed"}.get(code, f"BROKEN (pytest exit {code})")
    finally:
        restore(copy, m)
        if m.path.startswith("csrc/"):
            for built in (copy / "lora2_kernels").glob("_C*.so"):
                built.unlink()
            for built in (ROOT / "lora2_kernels").glob("_C*.so"):
                shutil.copy2(built, copy / "lora2_kernels" / built.name)
    return m, outcome, time.perf_counter() - start, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("--skip-csrc", action="store_true",
                        help="leave out the mutants of csrc/ (each rebuilds the C++ op: ~35 s); CI's suite does")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="mutants checked at once, each in its own copy of the tree")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; --list shows them")
    selected = [m for m in MUTANTS if (not args.names or m.name in args.names)
                and not (args.skip_csrc and m.path.startswith("csrc/"))]
    if args.list:
        for m in selected:
            print(f"{m.name:<32} {m.path:<34} {' '.join(m.tests)}\n{'':<32} {m.why}")
        return 0

    gpu = has_gpu()
    with tempfile.TemporaryDirectory(prefix="lora2-mutants-") as tmp:
        copies = [Path(tmp) / f"repo{i}" for i in range(max(1, args.jobs))]
        for copy in copies:
            make_copy(copy)
        check_copy_is_imported(copies[0])
        runnable = [m for m in selected if gpu or not m.gpu]
        if not args.no_baseline and runnable:
            files = sorted({t for m in runnable for t in m.tests if t.startswith("tests/")})
            start = time.perf_counter()
            code, output = run_tests(copies[0], tuple(files), stop_early=False)
            print(f"baseline: {' '.join(files)} → exit {code} ({time.perf_counter() - start:.0f} s)", flush=True)
            if code != 0:
                print(output)
                print("mutants: the selected tests fail without any mutant; fix them first.")
                return 1
        free: queue.Queue[Path] = queue.Queue()
        for copy in copies:
            free.put(copy)

        def task(m: Mutant) -> tuple[Mutant, str, float, str]:
            copy = free.get()
            try:
                result = run_mutant(copy, m, gpu)
            finally:
                free.put(copy)
            print(f"{m.name}: {result[1]} ({result[2]:.0f} s)", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            rows = list(pool.map(task, selected))

    print("\n| mutant | file | bug | tests run | result |\n|---|---|---|---|---|")
    for m, outcome, _, _ in rows:
        print(f"| {m.name} | {m.path} | {m.why} | `{' '.join(m.tests)}` | {outcome} |")
    killed = sum(outcome == "killed" for _, outcome, _, _ in rows)
    print(f"\n{killed} killed, {sum(o == 'SURVIVED' for _, o, _, _ in rows)} survived, "
          f"{sum(o.startswith('BROKEN') for _, o, _, _ in rows)} broken, "
          f"{sum(o == 'needs a GPU' for _, o, _, _ in rows)} need a GPU")
    for m, outcome, _, detail in rows:
        if outcome != "killed" and detail:
            print(f"\n--- {m.name}: {outcome}\n{detail}")
    return 0 if all(o in ("killed", "needs a GPU") for _, o, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
