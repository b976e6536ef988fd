"""benchmarks/speed.py stays runnable: every peer measures on a small shape and the table renders.
(No timing is asserted here: speed is proven by running the benchmark, not by unit tests.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_method_measures_and_the_table_has_ratios():
    speed = _load()
    shape = speed.Shape("cpu-small", batch=2, length=16, causal_lm=False)
    device = torch.device("cpu")
    results = [speed.measure(shape, method, "eager", device, steps=2, warmup=1) for method in speed.METHODS]
    assert [r.error for r in results] == [None] * len(results)
    by_method = {r.method: r for r in results}
    assert by_method["floor"].trainable_parameters == 0
    assert by_method["full"].trainable_parameters > by_method["lora"].trainable_parameters > 0
    assert by_method["lora2"].allocator_ms is not None and by_method["adalora"].allocator_ms is not None
    assert by_method["lora2"].regularizer_ms is not None and by_method["lora"].allocator_ms is None
    table = speed.table(results).splitlines()
    rows = {line.split()[2]: line.split() for line in table[2:]}  # shape, mode, method, ms, x floor, x LoRA, ...
    assert rows.keys() == set(speed.METHODS)
    assert rows["floor"][4] == "1.00" and rows["lora"][5] == "1.00"  # each reference against itself
    assert all(r.ms_per_step > 0 and r.tokens_per_s > 0 for r in results)
