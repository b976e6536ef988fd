"""A learning-rate sweep as one run against its runs one by one, on the same machine in the same invocation.

    python -m benchmarks.sweep                      # MiniLM on SST-2, 3 rates; CPU or the GPU there is
    python -m benchmarks.sweep --steps 10 --smoke   # a few steps (CI)

Each side runs the way a user runs it, as fresh ``python -m lora2 train`` processes with the same settings:

- wall time: ``--learning-rate a,b,c`` (one process: one model load, one tokenisation, one forward and
  backward a step for all three) against three processes of one rate each, one after the other. Whole
  processes: start-up, loading, evaluations and writing included, which is what a sweep costs its user;
- memory: the peak resident set of the process (``wait4``'s ru_maxrss: the base, the activations, Python
  and torch) of a 4-rate sweep against one run, and on a GPU also the runs' own device peaks (result.json's
  ``peak_memory_mb``, above the loaded model).

Ratios compare the two sides of this invocation only (issue 32: peak memory of N = 4 at most 1.3 × one run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATES = ("5e-3", "1e-2", "2e-2", "4e-2")


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of ``python -m lora2 train ARGS`` in a fresh process."""
    tick = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lora2", "train", *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - tick
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lora2 train {' '.join(args)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def device_peak(folder: Path) -> float:
    return json.loads((folder / "result.json").read_text())["peak_memory_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="a few steps and rows: that the benchmark runs")
    parser.add_argument("--out", help="keep the runs' folders here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lora2-sweep-bench-"))
    common = ["--model", args.model, "--dataset", "sst2", "--max-steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--max-length", str(args.max_length), "--eval-every", str(args.steps),
              "--log-every", str(max(1, args.steps // 4)), "--max-train-samples", "64" if args.smoke else "2000",
              "--max-eval-samples", "32" if args.smoke else "200", "--overwrite"]
    try:
        three = RATES[:3]
        sweep_seconds, _ = run([*common, "--learning-rate", ",".join(three), "--output-dir", str(root / "sweep3")])
        single = [run([*common, "--learning-rate", rate, "--output-dir", str(root / f"single-{rate}")])
                  for rate in three]
        singles_seconds = sum(seconds for seconds, _ in single)
        _, sweep4_rss = run([*common, "--learning-rate", ",".join(RATES), "--output-dir", str(root / "sweep4")])
        single_rss = max(rss for _, rss in single)
        lines = [
            f"## A learning-rate sweep in one run ({args.model}, SST-2, {args.steps} steps of "
            f"{args.batch_size} × {args.max_length} tokens; {'smoke' if args.smoke else 'measured'})", "",
            "| | sweep in one run | runs one by one | ratio |", "|---|---:|---:|---:|",
            f"| wall time, 3 rates (s) | {sweep_seconds:.1f} | {singles_seconds:.1f} | "
            f"{sweep_seconds / singles_seconds:.2f} |",
            f"| peak resident memory, 4 rates vs one run (MiB) | {sweep4_rss:.0f} | {single_rss:.0f} | "
            f"{sweep4_rss / single_rss:.2f} |",
            f"| the same, vs 4 runs at once (4 × one run, computed) | {sweep4_rss:.0f} | {4 * single_rss:.0f} | "
            f"{sweep4_rss / (4 * single_rss):.2f} |",
        ]
        member = root / "sweep4" / f"lr-{float(RATES[0]):g}" / "seed-0"
        peaks = (device_peak(member), max(device_peak(root / f"single-{rate}") for rate in three))
        lines.append(f"| the run's own peak above the loaded model, 4 rates vs one run (MiB) | {peaks[0]:.0f} | "
                     f"{peaks[1]:.0f} | {peaks[0] / max(peaks[1], 1e-9):.2f} |")
        share = (sweep4_rss - single_rss) / 3
        lines += ["", f"Each member past the first adds {share:.0f} MiB (its activations, gradients and state): the "
                      f"base, Python and torch ({single_rss - share:.0f} MiB of one run) are there once."]
        print("\n".join(lines))  # noqa: T201
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
