"""The mutation check as part of the suite: every deliberate bug of scripts/mutants.py that a CPU can
see (a dropped bias or base GEMM, Conv1D strides swapped, the core's scale doubled, the mask dropped,
β₁ ↔ β₂ in the compiled op, ...) must make the tests that should catch it fail.

The unmutated baseline of those tests is the rest of this run, so the script runs with --no-baseline.
CI runs the 18 below, one per kind of bug: it leaves out the three mutants of csrc/ (each rebuilds the
C++ op, 35 s), the CUDA kernel's (GPU only) and nine whose bug another CI mutant's kind already covers.
`python scripts/mutants.py` runs all 30 a CPU can see, and README has a run's table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_MUTANTS = ["bias-dropped-half", "conv1d-strides-ignored", "4bit-nibble-order-swapped", "rank-k-term-doubled",
              "partial-sum-dropped", "mask-dropped", "masked-lambda-gets-gradient", "dropout-unscaled",
              "beta-swapped-reference",
              # issue 31's kinds, one each
              "nested-absmax-group-ignored", "half-rounded-twice", "compiled-backward-loses-seed",
              "last-scoring-step-skipped", "monotone-export-over-k", "labels-sorted-as-text",
              # Kernels v3's kinds: the cuBLAS split, a layout read off object identity, a row band's group
              "split-base-dropped", "b2-layout-by-identity", "dx-band-group-skips-gb",
              # several adapters over one base: an adapter's gradients from its own row tiles only
              "adapter-finish-sums-every-tile",
              # a sweep's member: a diverged one keeps its non-finite gradients from the others
              "sweep-diverged-gradients-kept"]


@pytest.mark.slow
def test_every_cpu_visible_mutant_is_killed():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutants.py"), "--no-baseline", *CI_MUTANTS], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200, check=False)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert f"{len(CI_MUTANTS)} killed, 0 survived, 0 broken" in run.stdout
