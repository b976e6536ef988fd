"""save_pretrained / from_pretrained: bit-identical round trips and every refusal path."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import batch, make_model, randomize_adapters

from lora2 import LoRA2Config, LoRA2Linear, LoRA2Model, get_lora2_model
from lora2.model import CONFIG_NAME, WEIGHTS_NAME


def _trained(family="bert", **cfg):
    model = get_lora2_model(make_model(family), LoRA2Config(r=4, k=2, target_rank=2, **cfg))
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        for h in model.modules_to_save:
            for p in model.base_model.get_submodule(h).parameters():
                p.add_(0.5)
    first = next(iter(model.lora2_layers().values()))
    first.set_rank_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    return model


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_round_trip_is_bit_identical(tmp_path, family):
    model = _trained(family)
    model.eval()
    expected = model(**batch()).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = LoRA2Model.from_pretrained(make_model(family), tmp_path)
    got = loaded(**batch()).logits
    assert torch.equal(got, expected)
    original = model.adapter_state_dict()
    for key, value in loaded.adapter_state_dict().items():
        assert torch.equal(value, original[key]), key
    assert loaded.rank_pattern() == model.rank_pattern()
    first = next(iter(loaded.lora2_layers().values()))
    assert int(first.rank_mask.sum()) == 3
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["rank_pattern"][next(iter(model.lora2_layers()))] == [0, 2, 3]
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_trainable(tmp_path):
    _trained().save_pretrained(tmp_path)
    loaded = LoRA2Model.from_pretrained(make_model("bert"), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in loaded.parameters())


def test_adapter_from_another_base_is_refused_and_model_untouched(tmp_path):
    _trained("bert").save_pretrained(tmp_path)
    import transformers
    other = transformers.AutoModelForSequenceClassification.from_config(
        transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=101))
    names_before = [n for n, _ in other.named_modules()]
    with pytest.raises(ValueError, match="does not fit this model.*shape mismatch"):
        LoRA2Model.from_pretrained(other, tmp_path)
    assert [n for n, _ in other.named_modules()] == names_before
    assert not any(isinstance(m, LoRA2Linear) for m in other.modules())


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path)
    _trained().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path)


def test_truncated_weights_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    base = make_model("bert")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        LoRA2Model.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, LoRA2Linear) for m in base.modules())


def test_a_rank_mask_edited_to_a_fraction_is_refused(tmp_path):
    """A mask keeps or prunes a value; 0.5 used to load and silently halve it (issue 23, item 15)."""
    from safetensors.torch import load_file, save_file

    _trained().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    key = next(k for k in state if k.endswith(".rank_mask"))
    state[key][1] = 0.5
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    base = make_model("bert")
    with pytest.raises(ValueError, match=r"rank_mask holds \[0.5\]: a rank mask keeps \(1\) or prunes \(0\)"):
        LoRA2Model.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, LoRA2Linear) for m in base.modules())


def test_garbage_weights_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path)


def test_corrupted_config_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path)


def test_newer_config_version_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["lora2"]["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path)


def test_version_1_adapters_load_with_the_semantics_they_were_trained_with(tmp_path):
    """lora2 0.1 scaled ΔW by α / kept values and pruned for good: such a file loads as
    pruning="monotone", so it computes the same function it was trained as."""
    model = _trained(pruning="monotone")
    model.eval()
    expected = model(**batch()).logits
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("pruning", "backend"):
        del meta["lora2"][key]
    meta["lora2"]["format_version"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    loaded = LoRA2Model.from_pretrained(make_model("bert"), tmp_path)
    assert loaded.lora2_config.pruning == "monotone" and loaded.lora2_config.format_version == 2
    assert torch.equal(loaded(**batch()).logits, expected)


def test_unknown_config_field_refused(tmp_path):
    _trained().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["lora2"]["shiny_new_option"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shiny_new_option.*upgrade lora2"):
        LoRA2Model.from_pretrained(make_model("bert"), tmp_path)


def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    model = _trained()
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_adapters(model, seed=7)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lora2.model.save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files left behind, nothing half-written


def test_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        _trained().save_pretrained(target)


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through private temp files; the results must be as readable as a plain write."""
    from lora2.io import atomic_write_dir

    old = os.umask(0o022)
    try:
        model = get_lora2_model(make_model("bert"), LoRA2Config(r=4, k=2, target_rank=2))
        atomic_write_dir(tmp_path / "adapter", model.save_pretrained)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    for f in (tmp_path / "adapter").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_a_failed_from_pretrained_leaves_the_model_as_it_was(tmp_path):
    """An adapter for a 2-label head loaded into a 3-label model fails; the model keeps its modules and
    which of its parameters train (issue: it used to be left frozen, 105 trainable tensors → 2)."""
    _trained().save_pretrained(tmp_path)
    torch.manual_seed(0)
    import transformers

    from conftest import TINY

    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3))
    before = {n: (type(m), m.weight.requires_grad if hasattr(m, "weight") and m.weight is not None else None)
              for n, m in model.named_modules()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError):
        LoRA2Model.from_pretrained(model, tmp_path)
    assert {n: (type(m), m.weight.requires_grad if hasattr(m, "weight") and m.weight is not None else None)
            for n, m in model.named_modules()} == before
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_get_lora2_model_does_not_write_into_the_callers_config():
    config = LoRA2Config(r=4, k=4, target_rank=2)
    model = make_model("bert")
    model.config.name_or_path = "some/base"
    assert get_lora2_model(model, config).lora2_config.base_model_name_or_path == "some/base"
    assert config.base_model_name_or_path is None  # reusing the config on another model records no wrong base


def test_a_merged_layers_state_dict_does_not_apply_delta_twice():
    """merge(), state_dict, load into a fresh layer: the same outputs (W already holds ΔW, and the state
    dict says so), and unmerge() there gives back the base."""
    torch.manual_seed(0)
    layer = LoRA2Linear(24, 16, r=4, k=4, backend="reference")
    with torch.no_grad():
        layer.singular_values.normal_()
    x = torch.randn(5, 24)
    adapted = layer(x)
    base_weight = layer.weight.detach().clone()
    layer.merge()
    fresh = LoRA2Linear(24, 16, r=4, k=4, backend="reference")
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    torch.testing.assert_close(fresh(x), adapted)
    fresh.unmerge()
    torch.testing.assert_close(fresh.weight, base_weight)
    unmerged = LoRA2Linear(24, 16, r=4, k=4, backend="reference")
    state = {k: v for k, v in LoRA2Linear(24, 16, r=4, k=4).state_dict().items() if k != "merged"}
    unmerged.load_state_dict(state)  # a state dict from before the flag loads, as unmerged
    assert not unmerged.merged
