"""The roofline cost model's terms (benchmarks/cost_model.py): each one moves the modelled step the way
its cause does, and the split is only taken where it is faster. A model, not a measurement: these tests
check its arithmetic, the GPU checks its numbers (scripts/gpu_session.sh)."""

from __future__ import annotations

import pytest

from benchmarks import cost_model as cm

Q_O = (8192, 2048, 2048)


def test_the_floor_is_two_gemms_at_the_roofline():
    tokens, in_f, out_f = Q_O
    seconds = sum(launch.seconds(cm.H100) for launch in cm.floor_launches(*Q_O))
    gemm = 2.0 * tokens * in_f * out_f / cm.H100.tensor_flops  # compute-bound at this shape
    assert seconds == pytest.approx(2 * gemm + 2 * cm.H100.launch_seconds)


def test_dropout_costs_one_draw_per_x_element_each_way_and_computes_h_once():
    tokens, in_f, out_f = Q_O
    plain = {launch.name: launch for launch in cm.lora2_launches(*Q_O)}
    dropped = {launch.name: launch for launch in cm.lora2_launches(*Q_O, dropout=0.1)}
    for name in ("forward", "dx"):
        assert dropped[name].alu - plain[name].alu == cm.DROPOUT_OPS * tokens * in_f
    assert plain["forward"].flops == dropped["forward"].flops  # row bands either way


def test_row_bands_compute_the_rank_k_products_once_per_row_tile_and_column_group():
    tokens, in_f, out_f = Q_O  # 64 row tiles of 128 on 132 SMs: two column groups of four 256-wide tiles
    assert cm.column_groups(64, 8, 132) == 2 and cm.column_groups(200, 8, 132) == 1
    banded = {launch.name: launch for launch in cm.lora2_launches(*Q_O)}
    per_tile = {launch.name: launch for launch in cm.lora2_launches(*Q_O, bands=False)}
    # h = x·A₁ᵀ (16 wide, padded) twice per row tile instead of once per column tile (8)
    assert per_tile["forward"].flops - banded["forward"].flops == pytest.approx(2.0 * tokens * in_f * 16 * 6)
    one_wave = {launch.name: launch for launch in cm.lora2_launches(*Q_O, sms=64)}  # one group: gB once
    assert banded["dx"].flops - one_wave["dx"].flops == pytest.approx(2.0 * tokens * out_f * 16)


def test_a_slower_gemm_core_costs_in_proportion_and_the_split_caps_it():
    base = cm.step_seconds(*Q_O)
    slow = cm.step_seconds(*Q_O, efficiency=0.5)
    assert slow > base * 1.5  # two GEMMs at half the rate dominate the step
    capped = cm.step_seconds(*Q_O, efficiency=0.5, split=True)
    floor = sum(launch.seconds(cm.H100) for launch in cm.floor_launches(*Q_O))
    assert capped < slow and capped < 1.6 * floor  # cuBLAS GEMM + an adapter pass over x and y each way
    assert cm.step_seconds(*Q_O, split=True) == base  # at cuBLAS's rate the fused kernels stay faster


def test_the_dx_epilogue_read_of_x_is_exposed():
    tokens, in_f, _ = Q_O
    dx = {launch.name: launch for launch in cm.lora2_launches(*Q_O)}["dx"]
    assert dx.exposed_bytes == 2 * tokens * in_f
    hidden = cm.Launch(dx.name, dx.flops, dx.bytes + dx.exposed_bytes, dx.alu, 0.0, dx.efficiency)
    assert dx.seconds(cm.H100) > hidden.seconds(cm.H100)  # not hidden under the compute-bound max()


def test_the_table_reports_every_term_for_every_layer():
    table = cm.model_table(cm.layer_models())
    assert "at 85 % of cuBLAS" in table and "cuBLAS split where faster" in table and "dropout 0.1 / 0" in table
    assert "**llama-1.1b layer**" in table and "**deberta layer**" in table


def test_several_adapters_in_one_step_share_w_and_the_launches_not_the_gemm_flops():
    """Three adapters' batches in one step: the base GEMM's FLOPs are the three single steps' (every row still
    goes through W), each adapter's factors are read once, and the step is cheaper than three single steps by W's
    re-reads and the launches only: more so for small batches."""
    tokens, in_f, out_f = 1024, 768, 768
    together = {launch.name: launch for launch in cm.lora2_launches(3 * tokens, in_f, out_f, adapters=3)}
    single = {launch.name: launch for launch in cm.lora2_launches(tokens, in_f, out_f)}
    assert together["forward"].flops == pytest.approx(3 * single["forward"].flops, rel=0.02)
    assert together["cast"].bytes == 3 * single["cast"].bytes
    big, small = (cm.step_seconds(3 * t, in_f, out_f, adapters=3) / (3 * cm.step_seconds(t, in_f, out_f))
                  for t in (8192, 1024))
    assert small < big < 1.0
    assert "one / singles" in cm.adapters_table()
