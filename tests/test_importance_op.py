"""The compiled importance op (csrc/) against the PyTorch reference, on CPU here and on CUDA when a
GPU is there; its torch.library registration; and the CUDA kernels compiled by nvcc without a GPU."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lora2_kernels import available_backends, compiled_op_available, importance, reference
from lora2_kernels.importance import importance_update

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Distinct β: with β₁ = β₂ a swap of the two EMAs in a kernel would go unseen.
BETA1, BETA2 = 0.9, 0.5


def _modules(m=5, r=4, k=3, dtype=torch.float32, device="cpu", scale=1.0, seed=0, missing=(2,)):
    """λ, B₁, A₂ of ``m`` modules with gradients; the modules in ``missing`` have no .grad (unused)."""
    g = torch.Generator().manual_seed(seed)

    def param(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    lam, b1, a2 = [param(r) for _ in range(m)], [param(r, k) for _ in range(m)], [param(k, r) for _ in range(m)]
    for i, params in enumerate(zip(lam, b1, a2)):
        for p in params:
            if i not in missing:
                p.grad = (torch.randn(p.shape, generator=g) * scale).to(device=device, dtype=dtype)
    return lam, b1, a2


def _both(lam, b1, a2, state, steps=3):
    """Run the compiled op and the reference side by side for ``steps`` updates."""
    compiled, ref = copy.deepcopy(state), copy.deepcopy(state)
    for _ in range(steps):
        out_c = importance_update(lam, b1, a2, compiled, BETA1, BETA2, backend="compiled")
        out_r = importance_update(lam, b1, a2, ref, BETA1, BETA2, backend="reference")
    return out_c, out_r, compiled, ref


def _state(m=5, r=4, k=3, device="cpu"):
    return reference.new_importance_state(m, r, k, device=device)


def test_the_cpu_op_is_built_and_reported():
    assert compiled_op_available("cpu"), available_backends()["extension_error"]
    assert available_backends()["importance_cpu"] is True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.0, 1e15])
def test_matches_the_reference(device, dtype, scale):
    if device == "cuda" and not compiled_op_available("cuda"):
        pytest.fail("a GPU is here but the CUDA op was not built: rebuild with a CUDA torch and nvcc")
    if dtype == torch.float16 and scale > 1e4:
        scale = 1e4  # 1e15 is not a float16
    lam, b1, a2 = _modules(dtype=dtype, device=device, scale=scale)
    (scores_c, skipped_c), (scores_r, skipped_r), state_c, state_r = _both(lam, b1, a2, _state(device=device))
    assert scores_c.shape == (5, 4) and scores_c.dtype == torch.float32
    assert int(skipped_c) == int(skipped_r) == 0
    torch.testing.assert_close(scores_c, scores_r, rtol=1e-6, atol=0)  # fp32 state: to 1e-6 relative
    for name in reference.STATE_NAMES:
        torch.testing.assert_close(state_c[name], state_r[name], rtol=1e-6, atol=0)
    if scale == 0.0:
        assert torch.count_nonzero(scores_c) == 0
    else:
        assert torch.count_nonzero(scores_c[2]) == 0 and torch.count_nonzero(scores_c[0]) > 0  # no grad, no score


def _oracle_step(params, grads, ema, unc, beta1, beta2):
    """One update of AdaLoRA's smoothed sensitivity for one tensor, in float64, as the paper writes it."""
    sensitivity = (params.double() * grads.double()).abs()
    ema_new = beta1 * ema + (1 - beta1) * sensitivity
    unc_new = beta2 * unc + (1 - beta2) * (sensitivity - ema_new).abs()  # against the *updated* Ī
    return ema_new, unc_new


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_scores_follow_the_papers_formula(device, backend):
    """An oracle written out here in float64 (no code shared with the op or the reference), over three
    updates with new gradients each time and a module without gradients in the middle one:
    score[m, i] = Ī·Ū(λ_i) + mean_j Ī·Ū(B₁[i, j]) + mean_j Ī·Ū(A₂[j, i])."""
    m, r, k = 4, 5, 3
    state = _state(m, r, k, device=device)
    ema = {name: [torch.zeros(shape, dtype=torch.float64) for _ in range(m)]
           for name, shape in (("lambda", (r,)), ("q_up", (r, k)), ("p_down", (k, r)))}
    unc = {name: [torch.zeros_like(t) for t in tensors] for name, tensors in ema.items()}
    for step in range(3):
        lam, b1, a2 = _modules(m=m, r=r, k=k, device=device, seed=step, missing=(1,) if step == 1 else ())
        scores, skipped = importance_update(lam, b1, a2, state, BETA1, BETA2, backend=backend)
        assert int(skipped) == 0
        for name, tensors in (("lambda", lam), ("q_up", b1), ("p_down", a2)):
            for i, t in enumerate(tensors):
                grad = t.grad.cpu() if t.grad is not None else torch.zeros(t.shape)
                ema[name][i], unc[name][i] = _oracle_step(t.detach().cpu(), grad, ema[name][i], unc[name][i],
                                                          BETA1, BETA2)
        s = {name: [e * u for e, u in zip(ema[name], unc[name])] for name in ema}
        expected = torch.stack([s["lambda"][i] + s["q_up"][i].mean(1) + s["p_down"][i].mean(0) for i in range(m)])
        torch.testing.assert_close(scores.cpu().double(), expected, rtol=1e-5, atol=1e-7)
        for name in ema:
            torch.testing.assert_close(state[f"ema_{name}"].cpu().double(), torch.stack(ema[name]), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(state[f"unc_{name}"].cpu().double(), torch.stack(unc[name]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["grad", "value"])
def test_non_finite_inputs_skip_the_whole_update(device, bad, where):
    """Documented behaviour: one non-finite value or gradient anywhere leaves every EMA as it was,
    returns the unchanged state's scores and sets the skipped flag (on the device, no sync)."""
    lam, b1, a2 = _modules(device=device)
    state = _state(device=device)
    importance_update(lam, b1, a2, state, BETA1, BETA2, backend="compiled")
    before = copy.deepcopy(state)
    with torch.no_grad():
        target = a2[4].grad if where == "grad" else a2[4]
        target[1, 3] = bad
    for backend in ("compiled", "reference"):
        scores, skipped = importance_update(lam, b1, a2, state, BETA1, BETA2, backend=backend)
        assert int(skipped) == 1, backend
        assert all(torch.equal(before[n], state[n]) for n in reference.STATE_NAMES), backend
        torch.testing.assert_close(scores, reference.importance_scores(before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_an_overflowing_sensitivity_is_not_folded_into_the_emas(device, backend):
    """λ = g = 1e30 are finite but λ·g is not: folded in, the EMA would be inf and then NaN for good."""
    lam, b1, a2 = _modules(device=device)
    state = _state(device=device)
    importance_update(lam, b1, a2, state, BETA1, BETA2, backend=backend)
    before = copy.deepcopy(state)
    with torch.no_grad():
        lam[3][0] = 1e30
        lam[3].grad[0] = 1e30
    scores, skipped = importance_update(lam, b1, a2, state, BETA1, BETA2, backend=backend)
    assert int(skipped) == 1
    assert all(torch.equal(before[n], state[n]) for n in reference.STATE_NAMES)
    assert torch.isfinite(scores).all()


def test_bad_calls_are_refused_before_anything_changes():
    lam, b1, a2 = _modules()
    state = _state()
    before = copy.deepcopy(state)
    with pytest.raises(RuntimeError, match="module 3 q_up has shape"):
        importance_update(lam, b1[:3] + [torch.zeros(4, 5)] + b1[4:], a2, state, BETA1, BETA2, backend="compiled")
    with pytest.raises(RuntimeError, match="give all adapters one dtype"):
        importance_update(lam[:1] + [lam[1].detach().double()] + lam[2:], b1, a2, state, BETA1, BETA2,
                          backend="compiled")
    with pytest.raises(RuntimeError, match="state tensor 2 must be a contiguous float32 tensor of shape"):
        importance_update(lam, b1, a2, {**state, "ema_q_up": torch.zeros(5, 4, 4)}, BETA1, BETA2, backend="compiled")
    assert all(torch.equal(before[n], state[n]) for n in reference.STATE_NAMES)


def test_missing_extension_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(importance, "compiled_op_available", lambda device_type: False)
    monkeypatch.setattr(importance, "_warned", set())
    lam, b1, a2 = _modules()
    state = _state()
    with caplog.at_level("WARNING", logger="lora2_kernels.importance"):
        importance_update(lam, b1, a2, state, BETA1, BETA2)
        importance_update(lam, b1, a2, state, BETA1, BETA2)
    assert sum("using the PyTorch reference" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="compiled importance op is not available"):
        importance_update(lam, b1, a2, state, BETA1, BETA2, backend="compiled")


def test_torch_library_registration_passes_opcheck():
    lam, b1, a2 = _modules(m=3, missing=(1,))
    state = _state(m=3)
    args = (lam, b1, a2, [p.grad for p in lam], [p.grad for p in b1], [p.grad for p in a2],
            *(state[n] for n in reference.STATE_NAMES), BETA1, BETA2)
    torch.library.opcheck(torch.ops.lora2.importance_update.default, args)


def test_runs_under_torch_compile_without_graph_breaks():
    lam, b1, a2 = _modules(m=3, missing=())
    eager, compiled_state = _state(m=3), _state(m=3)

    def update(state):
        return torch.ops.lora2.importance_update(lam, b1, a2, [p.grad for p in lam], [p.grad for p in b1],
                                                 [p.grad for p in a2], *(state[n] for n in reference.STATE_NAMES),
                                                 BETA1, BETA2)[0]

    expected = update(eager)
    got = torch.compile(update, fullgraph=True, backend="aot_eager")(compiled_state)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_state["ema_q_up"], eager["ema_q_up"])


# --- the CUDA source, compiled without a GPU ---------------------------------------------------------


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_kernels_compile_with_nvcc(tmp_path, arch):
    """The .cu includes CUDA headers only, so nvcc alone compiles it: a CUDA syntax or type error fails CI."""
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on this CI machine: the CUDA kernels are not checked")
        pytest.skip("nvcc not found")
    run = subprocess.run([nvcc, "-c", "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings",
                          "-o", str(tmp_path / "importance_cuda.o"), str(ROOT / "csrc" / "importance_cuda.cu")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "importance_cuda.o").stat().st_size > 0


def test_cuda_glue_compiles_against_this_torch(tmp_path):
    """importance.cpp with its CUDA dispatch switched on, syntax-checked against the installed torch
    (the CPU wheel suffices: the glue needs no CUDA header)."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("no C++ compiler on this CI machine (apt-get install g++): the CUDA glue is not checked")
        pytest.skip("no C++ compiler")
    import sysconfig

    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    run = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-DLORA2_WITH_CUDA", *flags,
                          str(ROOT / "csrc" / "importance.cpp")], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
