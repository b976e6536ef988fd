"""QLoRA²: LoRA² over bitsandbytes' 4-bit Linear4bit (lora2_kernels/four_bit.py).

The fused kernels dequantise the packed weight inside their K loops; they are held to the same
float64 oracle and tolerance rule as the plain kernels (test_triton_kernels.py), with W the weight
bitsandbytes' own ``dequantize_4bit`` returns. Runs under the Triton interpreter on CPU (conftest).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_DEVICE, make_model, require
from test_triton_kernels import ALPHA, PARAMS, assert_matches_oracle, make_layer, oracle, run_layer, tolerances
from torch import nn

from lora2 import LoRA2Config, LoRA2Model, get_lora2_model
from lora2.errors import InputError
from lora2_kernels import LoRA2Linear, four_bit

bnb = require("bitsandbytes", "pip install bitsandbytes==0.50.2")
QUANTS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
QUANT_IDS = ["nf4", "nf4-double-quant", "fp4", "fp4-double-quant"]


def quantised(layer: LoRA2Linear, raw: dict, quant_type: str, double_quant: bool, backend: str = "triton"
              ) -> tuple[LoRA2Linear, dict]:
    """The same layer over a 4-bit copy of its base; raw["weight"] becomes what bitsandbytes dequantises."""
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        base.weight.copy_(raw["weight"].float())
        if layer.bias is not None:
            base.bias.copy_(layer.bias.float())
    q = four_bit.quantize_linear(base, quant_type, double_quant)
    q4 = LoRA2Linear.from_linear(q, r=layer.r, k=layer.k, alpha=ALPHA, backend=backend)
    with torch.no_grad():
        for name in (*PARAMS, "rank_mask"):
            getattr(q4, name).copy_(getattr(layer, name))
    raw = dict(raw, weight=bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double())
    return q4.to(KERNEL_DEVICE), raw


# 192 × 130 = 24,960 values: 390 absmax blocks of 64, so a double-quantised weight has two groups of 256
# absmax values, each with its own second-level scale (a smaller weight has one: an error in which group
# a block belongs to would not show). 192 is a whole number of blocks: bitsandbytes' CPU dequantize_4bit,
# the oracle, is wrong for even widths that are not (see four_bit.straddles_rows).
SEVERAL_NESTED_GROUPS = {"in_f": 192, "out_f": 130}


@pytest.mark.parametrize("quant_type, double_quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("size", [(70, 45), (192, 130)], ids=["one-nested-group", "two-nested-groups"])
def test_dequantize_is_bitsandbytes_dequantize_4bit(quant_type, double_quant, size):
    """The dequantisation the kernels and the reference compute, bit for bit (rows of 70 values: the
    blocks of 64 straddle rows; 24,960 values: two nested absmax groups)."""
    q = four_bit.quantize_linear(nn.Linear(*size), quant_type, double_quant)
    if double_quant and size == (192, 130):
        assert q.weight.quant_state.absmax.numel() > q.weight.quant_state.state2.blocksize
    expected = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    assert torch.equal(four_bit.dequantize(four_bit.quant_of(q.weight)), expected)


MASKED = {"r": 7, "k": 3, "mask": [1, 0, 1, 1, 0, 1, 0], "bias": False}
# Every quant type in fp32 and bf16 on odd sizes (the blocks of 64 straddle rows); the masked, bias-free
# case and the dequantise-once path (530 rows) on a spread of them: each one costs interpreter seconds.
KERNEL_CASES = [({}, 37, *q, dtype) for q in QUANTS for dtype in (torch.float32, torch.bfloat16)] + [
    (MASKED, 37, "nf4", True, torch.float32), (MASKED, 37, "fp4", False, torch.bfloat16),
    ({}, 530, "nf4", False, torch.bfloat16), ({}, 530, "fp4", True, torch.float32)]


@pytest.mark.parametrize("case, rows, quant_type, double_quant, dtype", KERNEL_CASES,
                         ids=[f"{'masked' if c else 'odd'}-{r}rows-{q}{'-dq' if d else ''}-{str(t)[6:]}"
                              for c, r, q, d, t in KERNEL_CASES])
def test_fused_4bit_kernels_match_the_oracle(case, rows, quant_type, double_quant, dtype, monkeypatch):
    """Forward and every gradient through the 4-bit kernels (dX reads W transposed): up to
    FUSED_DEQUANT_MAX_TOKENS rows dequantised in the K loops, above it once per launch."""
    from lora2_kernels.triton_kernels import lora_linear

    launched = []
    real = lora_linear.dequantize_launch
    monkeypatch.setattr(lora_linear, "dequantize_launch", lambda *a: launched.append(1) or real(*a))
    layer, raw = make_layer(**case)
    q4, raw = quantised(layer, raw, quant_type, double_quant)
    assert q4.is_4bit and q4.weight.dtype == torch.uint8  # stays packed: no full-precision copy
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, raw["weight"].shape[1], generator=g).to(dtype)
    grad_y = torch.randn(rows, raw["weight"].shape[0], generator=g).to(dtype)
    expected = oracle(raw, x, grad_y)
    got = run_layer(q4, x, grad_y)
    assert got[0].dtype == dtype and q4.weight.grad is None
    assert len(launched) == (2 if rows > lora_linear.FUSED_DEQUANT_MAX_TOKENS else 0)  # forward and dX
    assert_matches_oracle(got, expected, tolerances(raw, x, grad_y, dtype, expected), f"{quant_type} {dtype}")


@pytest.mark.parametrize("quant_type, double_quant, dtype", [("nf4", True, torch.bfloat16), ("fp4", False, torch.float32)],
                         ids=["nf4-dq-bfloat16", "fp4-float32"])
def test_the_plain_gemm_form_over_a_4bit_w_matches_the_oracle_too(quant_type, double_quant, dtype, monkeypatch):
    """On Hopper the 4-bit K loops compute yᵀ = W·xᵀ and dXᵀ = Wᵀ·dYᵀ (the dequantised tile as the wgmma's register
    operand), which the interpreter runs by default; sm_80 keeps the plain form (lora_linear.w_as_a). Both match."""
    from lora2_kernels.triton_kernels import lora_linear

    monkeypatch.setattr(lora_linear, "INTERPRETER_W_AS_A", False)
    layer, raw = make_layer()
    q4, raw = quantised(layer, raw, quant_type, double_quant)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, raw["weight"].shape[1], generator=g).to(dtype)
    grad_y = torch.randn(37, raw["weight"].shape[0], generator=g).to(dtype)
    expected = oracle(raw, x, grad_y)
    assert_matches_oracle(run_layer(q4, x, grad_y), expected, tolerances(raw, x, grad_y, dtype, expected), "plain form")


@pytest.mark.parametrize("rows", [37, 530], ids=["in-the-k-loop", "dequantised-once"])
def test_double_quantised_weights_of_several_nested_groups_match_the_oracle(rows):
    """Every other 4-bit kernel case fits its absmax in one nested group; here blocks 256-389 take the
    second group's scale, in the K loops and in the dequantise-once path."""
    layer, raw = make_layer(**SEVERAL_NESTED_GROUPS)
    q4, raw = quantised(layer, raw, "nf4", double_quant=True)
    state = q4.weight.quant_state
    assert state.nested and state.absmax.numel() > state.state2.blocksize  # two groups
    assert not torch.equal(state.state2.absmax[0], state.state2.absmax[1])  # of different scales
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, raw["weight"].shape[1], generator=g)
    grad_y = torch.randn(rows, raw["weight"].shape[0], generator=g)
    expected = oracle(raw, x, grad_y)
    assert_matches_oracle(run_layer(q4, x, grad_y), expected, tolerances(raw, x, grad_y, torch.float32, expected),
                          f"{rows} rows, two nested groups")


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)], ids=["nf4-double-quant", "fp4"])
def test_torch_compile_fullgraph_over_a_4bit_base(quant_type, double_quant):
    """Inductor, forward and backward, through the custom ops with the 4-bit tables as their tensors
    (the double quantisation's offset too: no float() of it, no graph break): the oracle, and bit for
    bit what the eager path computes."""
    layer, raw = make_layer(r=4, k=4)
    q4, raw = quantised(layer, raw, quant_type, double_quant)
    graphs = []

    def inductor_recording(gm, example_inputs):
        graphs.append(gm.code)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(q4, fullgraph=True, backend=inductor_recording)
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(2, 9, 70, generator=g), torch.randn(2, 9, 45, generator=g)
    expected = oracle(raw, x, grad_y)
    got = run_layer(compiled, x, grad_y)
    assert_matches_oracle(got, expected, tolerances(raw, x, grad_y, torch.float32, expected), "compiled 4-bit")
    eager = run_layer(q4, x, grad_y)
    assert all(torch.equal(a, b) for a, b in zip(got, eager) if a is not None)
    assert len(graphs) == 1 and "torch.ops.lora2.lora2_linear(" in graphs[0] and "quant_state_absmax" in graphs[0]


def test_a_double_quantised_layer_never_reads_a_device_value_on_the_host(monkeypatch):
    """bitsandbytes keeps the double quantisation's offset as a device tensor; float() of it in every
    forward (and again for each launch) stalled the launch queue. The kernels read it themselves."""
    from lora2_kernels.triton_kernels import lora_linear

    layer, raw = make_layer(r=4, k=4)
    q4, raw = quantised(layer, raw, "nf4", True)
    assert isinstance(four_bit.quant_of(q4.weight).offset, torch.Tensor)
    ours = (str(Path(lora_linear.__file__).parent), str(Path(four_bit.__file__).parent))
    reads = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def counted(real):
        def read(self):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(ours):
                reads.append(f"{caller.co_name} ({Path(caller.co_filename).name})")
            return real(self)
        return read

    x = torch.randn(6, 70, device=KERNEL_DEVICE)
    monkeypatch.setattr(torch.Tensor, "__float__", counted(real_float))
    monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
    run_layer(q4, x, torch.randn(6, 45, device=KERNEL_DEVICE))
    monkeypatch.undo()
    assert reads == []


def test_the_4bit_custom_ops_pass_opcheck():
    """Schema, fake (shapes, dtypes, strides: out_features comes from the layer, not the packed bytes)
    against the real outputs, and the autograd registration, with double-quantised tables."""
    from lora2_kernels.ops import _quant_tensors

    layer, raw = make_layer(r=6, k=4)
    q4, raw = quantised(layer, raw, "nf4", True)
    quant = four_bit.quant_of(q4.weight)
    torch.manual_seed(0)
    x = torch.randn(5, 70, device=KERNEL_DEVICE, requires_grad=True)
    factors = [getattr(q4, n).detach().clone().requires_grad_(True) for n in PARAMS]
    args = (x, quant.packed, q4.bias.detach(), *factors, q4.rank_mask, ALPHA, False, False, 0.0, None,
            *_quant_tensors(quant))
    torch.library.opcheck(torch.ops.lora2.lora2_linear.default, args)
    with torch.no_grad():
        y, hidden, b2 = torch.ops.lora2.lora2_linear(*args)
    assert y.shape == (5, 45)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    backward_args = (torch.randn_like(y), detached[0], detached[1], *detached[3:9], hidden, b2, *detached[9:14])
    torch.library.opcheck(torch.ops.lora2.lora2_linear_backward.default,
                          (*backward_args, True, False, True, *_quant_tensors(quant)))


def test_reference_path_matches_the_oracle_and_the_quantisation_is_visible():
    """The CPU reference path (dequantise, then the reference layer) meets the oracle too, and a layer
    that read the weight wrong (here: the unquantised one) would be far outside the tolerance."""
    layer, unquantised_raw = make_layer()
    ref, raw = quantised(layer, unquantised_raw, "nf4", True, backend="reference")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(29, 70, generator=g)
    grad_y = torch.randn(29, 45, generator=g)
    expected = oracle(raw, x, grad_y)
    tols = tolerances(raw, x, grad_y, torch.float32, expected)
    assert_matches_oracle(run_layer(ref.to(KERNEL_DEVICE), x, grad_y), expected, tols, "reference")
    unquantised = oracle(unquantised_raw, x, grad_y)
    assert (unquantised[0] - expected[0]).abs().max() > 20 * tols[0]  # the quantisation error shows


def test_other_linear_subclasses_are_refused_before_anything_changes():
    """bitsandbytes' 8-bit layer (and any nn.Linear whose weight is not a plain float out × in tensor)."""
    model = make_model("bert")
    int8 = bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=False)
    model.bert.encoder.layer[0].attention.self.query = int8
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(InputError, match=r"layer\.0\.attention\.self\.query \(Linear8bitLt\).*Int8Params.*Linear4bit"
                                         r".*nothing was changed"):
        get_lora2_model(model, LoRA2Config(r=4, k=4, target_rank=2, total_steps=10))
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(TypeError, match="cannot adapt this Linear8bitLt: its weight is a Int8Params"):
        LoRA2Linear.from_linear(int8)


def test_missing_bitsandbytes_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match=r"a 4-bit base needs bitsandbytes: pip install 'bitsandbytes>=0.46,<0.51'"):
        four_bit.quantize_model(make_model("bert"))


def _adapted_4bit_model(double_quant: bool = False) -> tuple[nn.Module, LoRA2Model]:
    model = make_model("llama", wide=True)
    names = four_bit.quantize_model(model, "nf4", double_quant)
    assert names and all(four_bit.is_linear4bit(model.get_submodule(n)) for n in names)
    lora = get_lora2_model(model, LoRA2Config(r=4, k=4, target_rank=2, total_steps=10, backend="reference"))
    with torch.no_grad():  # a nonzero ΔW: λ starts at 0
        for layer in lora.lora2_layers().values():
            layer.singular_values.normal_()
    return model, lora


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double-quant"])
def test_base_weights_take_under_0_6_bytes_a_parameter(double_quant):
    """Half a byte a value plus the absmax (4 B, or 1 B double-quantised, per 64): 0.5625 or 0.516."""
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert four_bit.weight_bytes(model) == 4 * params
    four_bit.quantize_model(model, "nf4", double_quant)
    assert four_bit.weight_bytes(model) / params == pytest.approx(0.516 if double_quant else 0.5625, abs=0.003)


def test_merge_and_unload_gives_a_bf16_model_with_delta_folded_in(caplog):
    _, lora = _adapted_4bit_model()
    lora.eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = lora(input_ids=ids).logits.float()
    merged = lora.merge_and_unload()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not any(four_bit.is_linear4bit(m) for m in merged.modules())
    with torch.no_grad():
        out = merged(input_ids=ids).logits.float()
    # the same model up to bf16 rounding of the merged weights (ΔW is not small here: λ ~ N(0, 1))
    torch.testing.assert_close(out, adapted, rtol=0.05, atol=0.05)


def test_requantising_the_merged_model_says_what_it_costs(caplog):
    _, lora = _adapted_4bit_model(double_quant=True)
    with caplog.at_level(logging.WARNING, logger="lora2.model"):
        merged = lora.merge_and_unload(requantize=True)
    assert any(four_bit.is_linear4bit(m) and m.weight.quant_state.nested for m in merged.modules())
    assert "re-quantised" in caplog.text and "relative error added" in caplog.text


def test_an_eval_forward_leaves_the_4bit_layers_as_they_were_then_merge_and_training_work():
    """bitsandbytes >= 0.48 repacks a Linear4bit into a CPU inference layout (absmax rounded to bf16) on its
    first eval forward without gradients, after which its training forward and lora2's dequantise failed.
    lora2 keeps its 4-bit layers in the standard layout: adapted or not, they compute the same after an
    evaluation, train, and merge."""
    model, lora = _adapted_4bit_model()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    quants = {n: four_bit.dequantize(four_bit.quant_of(m.weight)) for n, m in model.named_modules()
              if four_bit.is_linear4bit(m) or (isinstance(m, LoRA2Linear) and m.is_4bit)}
    lora.eval()
    with torch.no_grad():
        evaluated = lora(input_ids=ids).logits
    for name, weight in quants.items():  # nothing repacked: every 4-bit weight dequantises to the very same W
        module = model.get_submodule(name)
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), name
        assert torch.equal(four_bit.dequantize(four_bit.quant_of(module.weight)), weight), name
    lora.train()
    lora(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()  # the training forward after an evaluation
    lora.eval()
    merged = lora.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits.float(), evaluated.float(), rtol=0.05, atol=0.05)


def test_a_layer_bitsandbytes_repacked_before_lora2_saw_it_is_brought_back():
    q = four_bit.quantize_linear(nn.Linear(128, 64), "nf4", double_quant=False)
    weight = four_bit.dequantize(four_bit.quant_of(q.weight))
    q.support_avx512bf16_for_cpu = True  # as bitsandbytes made it, on a CPU with AVX512-BF16
    q.eval()
    with torch.no_grad():
        q(torch.randn(2, 128))
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    layer = LoRA2Linear.from_linear(q, r=4, k=4)
    assert tuple(layer.weight.shape) == (128 * 64 // 2, 1)  # the standard packed layout again
    # only the absmax rounding bitsandbytes' repacking did (bf16: 2⁻⁸ relative) remains
    torch.testing.assert_close(four_bit.dequantize(four_bit.quant_of(layer.weight)), weight, rtol=2**-8, atol=0)


def test_a_linear_whose_rows_are_not_whole_blocks_stays_in_full_precision():
    """Narrower than a block (32) or straddling (160): bitsandbytes' CPU layout cannot hold the first, and its CPU
    dequantize_4bit returns other values than were quantised for the second."""
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 160), nn.ReLU(), nn.Linear(160, 32))
    assert four_bit.quantize_model(model, "nf4") == ["2"]
    assert type(model[0]) is nn.Linear and four_bit.is_linear4bit(model[2]) and type(model[4]) is nn.Linear
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 32))
    model.train()
    model(torch.randn(3, 32)).sum().backward()


def test_quantize_model_takes_only_the_modules_named():
    model = make_model("bert", wide=True)
    names = four_bit.quantize_model(model, "nf4", modules=["query", "value"])
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.bert.encoder.layer[0].attention.self.key) is nn.Linear


def test_torch_save_of_a_whole_4bit_layer_loads_back_and_computes_the_same(tmp_path):
    for double_quant in (False, True):
        layer = LoRA2Linear.from_linear(four_bit.quantize_linear(nn.Linear(128, 64), "nf4", double_quant), r=4, k=4)
        with torch.no_grad():
            layer.singular_values.normal_()
        x = torch.randn(3, 128)
        torch.save(layer, tmp_path / "layer.pt")
        loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
        assert loaded.is_4bit
        torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)


@pytest.mark.slow
def test_importing_lora2_and_peft_logs_no_bitsandbytes_hub_warning():
    """bitsandbytes >= 0.50 logs a warning at import on AVX512-BF16 CPUs when it cannot fetch an optional CPU
    kernel from a hub (peft imports it for every run); lora2 never uses that kernel and drops the notice."""
    import os
    import subprocess

    for offline in ("0", "1"):
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        done = subprocess.run([sys.executable, "-c", "import lora2.train, peft, bitsandbytes"], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert "gemm_4bit_forward" not in done.stderr and "kernels-community" not in done.stderr, done.stderr


def test_unload_gives_back_the_4bit_layers_and_the_adapter_round_trips(tmp_path):
    model, lora = _adapted_4bit_model()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    lora.eval()
    with torch.no_grad():
        before = lora(input_ids=ids).logits
    lora.save_pretrained(tmp_path)
    base = lora.unload()
    assert sum(four_bit.is_linear4bit(m) for m in base.modules()) == 14  # 2 layers × 7 projections
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    reloaded = LoRA2Model.from_pretrained(base, tmp_path)  # the adapter does not depend on the base's format
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    torch.testing.assert_close(after, before)
    assert (after - plain).abs().max() > 1e-3


def _train_4bit(model_dir, files, out, *extra):
    from lora2.cli import main

    return main(["train", "--model", model_dir, "--dataset", "none", "--train-file", str(files / "train.tsv"),
                 "--validation-file", str(files / "val.tsv"), "--output-dir", str(out), "--max-steps", "4",
                 "--batch-size", "8", "--max-length", "24", "--eval-every", "2", "--initial-rank", "4",
                 "--inner-width", "4", "--target-rank", "2", "--init-warmup", "1", "--final-warmup", "1",
                 "--no-progress", *extra])


def test_cli_trains_on_a_4bit_base_then_eval_and_merge_use_it(wide_bert_dir, small_files, tmp_path, capsys, caplog):
    """--load-in-4bit: the run quantises the adapted layers (not the pooler, not the head) and says so, evaluates
    before training, trains; eval rebuilds the same 4-bit base (the run's own final accuracy reproduces); merge
    writes a bf16 model with ΔW folded in that scores the same; a resumed 4-bit run trains past an evaluation."""
    import json

    import transformers

    from lora2.cli import main
    from lora2.data import Collator, build_dataset
    from lora2.train import evaluate, load_tokenizer

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert _train_4bit(wide_bert_dir, small_files, out, "--load-in-4bit", "--double-quant") == 0
    assert "quantised the 12 adapted linear layers to 4-bit nf4 with double quantisation" in caplog.text
    result = json.loads(capsys.readouterr().out)
    info = json.loads((out / "adapter" / "lora2_method.json").read_text())
    assert info["base_4bit"]["quant_type"] == "nf4" and info["base_4bit"]["double_quant"] is True
    assert len(info["base_4bit"]["modules"]) == 12 and not any("pooler" in n for n in info["base_4bit"]["modules"])
    assert main(["eval", "--model", wide_bert_dir, "--adapter", str(out / "adapter"), "--validation-file",
                 str(small_files / "val.tsv"), "--max-length", "24"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(result["metric_after"])
    assert main(["merge", "--model", wide_bert_dir, "--adapter", str(out / "adapter"), "--output",
                 str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    tok = load_tokenizer(str(tmp_path / "merged"))
    data = build_dataset(small_files / "val.tsv", tok, "classification", "sentence", "label", max_length=24)
    metrics = evaluate(merged, data, Collator(tok.pad_token_id, "classification"), 32, torch.device("cpu"))
    assert abs(metrics["accuracy"] - result["metric_after"]) <= 2 / 32  # bf16 rounding may flip a row or two

    # killed after step 1 (before any evaluation), resumed: steps 2-4 train around the step-2 evaluation
    import conftest
    import lora2.train

    killed = tmp_path / "killed"
    real_train = lora2.train.train
    lora2.train.train = conftest.train_killed_at(1)
    try:
        assert _train_4bit(wide_bert_dir, small_files, killed, "--load-in-4bit") == 130
    finally:
        lora2.train.train = real_train
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4


def test_cli_refuses_wrong_4bit_combinations(tiny_bert_dir, small_files, tmp_path, capsys):
    from lora2.train import TrainConfig

    with pytest.raises(InputError, match="--load-in-4bit freezes the base in 4 bits; --method full would train"):
        TrainConfig(method="full", load_in_4bit=True)
    with pytest.raises(SystemExit):
        _train_4bit(tiny_bert_dir, small_files, tmp_path / "run", "--load-in-4bit", "--bnb-4bit-quant-type", "int4")
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # the 32-wide tiny BERT: no adapted layer holds whole blocks, so a "4-bit" run would be a full-precision one
    assert _train_4bit(tiny_bert_dir, small_files, tmp_path / "narrow", "--load-in-4bit",
                       "--target-modules", "query", "value") == 2
    assert not (tmp_path / "narrow").exists()


def test_a_4bit_layout_the_kernels_do_not_cover_is_named():
    """The kernels take bitsandbytes' 16-value codes and even blocksizes; anything else takes the
    reference path, and the reason is what LoRA2Linear logs (once) on a GPU."""
    from lora2_kernels import ops

    quant = four_bit.quant_of(four_bit.quantize_linear(nn.Linear(70, 45), "nf4").weight)
    x = torch.zeros(2, 70)
    assert four_bit.kernel_unsupported(quant) is None
    odd = dataclasses.replace(quant, blocksize=63)
    assert "blocksize 63: the kernels take even blocksizes" in four_bit.kernel_unsupported(odd)
    small_code = dataclasses.replace(quant, code=quant.code[:8])
    if ops.triton_importable() and (ops.triton_interpreting() or x.is_cuda):
        assert "a 4-bit code table has 16 values, this one 8" in ops.triton_unsupported(
            x, quant.packed, torch.zeros(4, 70), 4, small_code)
