"""The mutation check as part of the suite: every deliberate bug of scripts/mutants.py that a CPU can
see (a dropped bias or base GEMM, Conv1D strides swapped, the core's scale doubled, the mask dropped,
β₁ ↔ β₂ in the compiled op, ...) must make the tests that should catch it fail.

The unmutated baseline of those tests is the rest of this run, so the script runs with --no-baseline.
CI leaves out the three mutants of csrc/ (each rebuilds the C++ op, 35 s: they would push CI past its
time budget); `python scripts/mutants.py` runs all of them, and README has that run's table.
About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_cpu_visible_mutant_is_killed():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutants.py"), "--no-baseline", "--skip-csrc"], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200, check=False)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "0 survived, 0 broken" in run.stdout
