"""Model surgery on tiny BERT / RoBERTa / DeBERTa-v2 / GPT-2 / LLaMA models."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make_model, randomize_adapters
from torch import nn

from lora2 import LoRA2Config, LoRA2Linear, get_lora2_model, parameter_report

EXPECTED_TARGETS = {  # adapted linears per transformer layer with the default targets
    "bert": 6, "roberta": 6, "deberta-v2": 6, "gpt2": 4, "llama": 7,
}


def _logits(model, seed=0):
    with torch.no_grad():
        return model(**batch(seed)).logits


def test_defaults_adapt_all_attention_and_mlp_linears(family):
    model = get_lora2_model(make_model(family), LoRA2Config(r=4, k=2, target_rank=2))
    layers = model.lora2_layers()
    assert len(layers) == 2 * EXPECTED_TARGETS[family]
    assert not any("pooler" in n or "classifier" in n or n.endswith("score") for n in layers)


def test_starts_exactly_at_base_model(family):
    base = make_model(family)
    expected = _logits(base)
    model = get_lora2_model(base, LoRA2Config(r=4, k=2, target_rank=2))
    assert torch.equal(_logits(model), expected)


def test_gradients_reach_only_adapters_and_saved_modules(family):
    model = get_lora2_model(make_model(family), LoRA2Config(r=4, k=2, target_rank=2))
    randomize_adapters(model)
    model.train()
    out = model(**batch(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    head = model.modules_to_save
    assert head, "classification head should be trained by default"
    for name, p in model.base_model.named_parameters():
        is_adapter = name.rsplit(".", 1)[-1] in ("q_down", "q_up", "singular_values", "p_down", "p_up")
        is_head = any(name.startswith(h + ".") for h in head)
        if is_adapter or is_head:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merged_model_equals_adapted_model(family):
    model = get_lora2_model(make_model(family), LoRA2Config(r=4, k=2, target_rank=2, alpha=8))
    randomize_adapters(model, scale=0.3)
    adapted = _logits(model)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoRA2Linear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), adapted, rtol=1e-4, atol=1e-5)


def test_merged_model_round_trips_through_plain_save_pretrained(tmp_path):
    import transformers
    model = get_lora2_model(make_model("bert"), LoRA2Config(r=4, k=2, target_rank=2))
    randomize_adapters(model, scale=0.3)
    adapted = _logits(model)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), adapted, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_restores_weights(family):
    model = get_lora2_model(make_model(family), LoRA2Config(r=4, k=2, target_rank=2))
    randomize_adapters(model, scale=0.3)
    before = {n: l.weight.detach().clone() for n, l in model.lora2_layers().items()}
    adapted = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for n, layer in model.lora2_layers().items():
        assert (layer.weight - before[n]).abs().max() < 1e-6, n


def test_print_trainable_parameters(capsys):
    model = get_lora2_model(make_model("bert"), LoRA2Config(r=4, k=2, target_rank=2))
    trainable, total = model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {trainable:,d}" in printed and "trainable%" in printed
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


def test_parameter_report_counts():
    cfg = LoRA2Config(r=4, k=2, target_rank=2)
    model = get_lora2_model(make_model("bert"), cfg)
    layers = model.lora2_layers()
    first = next(iter(layers.values()))
    first.set_rank_mask(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    report = parameter_report(model)
    assert report.adapter_trainable == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    per = {m.name: m for m in report.modules}
    m0 = per[next(iter(layers))]
    assert m0.kept == 2
    assert m0.budget == m0.trainable - 2 * (2 * cfg.k + 1)
    assert report.scored_elements == len(layers) * cfg.r * (1 + 2 * cfg.k)
    assert 0 < report.scoring_saving < 1
    assert "budget after pruning" in report.format_table()


def test_target_matching_nothing_lists_linear_names():
    with pytest.raises(ValueError, match=r"matches no module.*query"):
        get_lora2_model(make_model("bert"), LoRA2Config(target_modules=["nonexistent_proj"]))


def test_target_matching_unsupported_layer_is_named():
    with pytest.raises(ValueError, match=r"word_embeddings \(Embedding\)"):
        get_lora2_model(make_model("bert"), LoRA2Config(target_modules=["word_embeddings", "query"]))


def test_regex_targets():
    model = get_lora2_model(make_model("llama"), LoRA2Config(target_modules=r".*\.(q_proj|v_proj)"))
    assert len(model.lora2_layers()) == 4


def test_unknown_architecture_without_targets_is_an_error():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no defaults for model_type=None"):
        get_lora2_model(Tiny(), LoRA2Config())
    model = get_lora2_model(Tiny(), LoRA2Config(target_modules=["fc"]))
    assert list(model.lora2_layers()) == ["fc"]


def test_double_injection_refused():
    model = get_lora2_model(make_model("bert"), LoRA2Config())
    with pytest.raises(ValueError, match="already"):
        get_lora2_model(model, LoRA2Config())
    with pytest.raises(ValueError, match="already"):
        get_lora2_model(model.base_model, LoRA2Config())


def test_modules_to_save_validation():
    with pytest.raises(ValueError, match="match no module"):
        get_lora2_model(make_model("bert"), LoRA2Config(modules_to_save=["not_a_head"]))
    with pytest.raises(ValueError, match="both target_modules and modules_to_save"):
        get_lora2_model(make_model("bert"), LoRA2Config(modules_to_save=["attention"]))


def test_causal_lm_has_no_head_by_default():
    model = get_lora2_model(make_model("llama", task="lm"), LoRA2Config())
    assert model.modules_to_save == []
    out = model(**batch(), labels=batch()["input_ids"])
    out.loss.backward()
    assert model.base_model.lm_head.weight.grad is None


def test_disabling_a_merged_adapter_gives_the_base_model(family):
    base = make_model(family)
    expected = _logits(base)
    model = get_lora2_model(base, LoRA2Config(r=4, k=2, target_rank=2))
    randomize_adapters(model, scale=0.3)
    adapted = _logits(model)
    model.merge_adapter()
    model.set_adapter_enabled(False)  # disabled means the base model, merged or not (unmerges, as PEFT does)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-5)
    model.set_adapter_enabled(True)
    torch.testing.assert_close(_logits(model), adapted, rtol=1e-4, atol=1e-5)


def test_unload_gives_back_the_plain_base_model(family):
    base = make_model(family)
    types = {n: type(m) for n, m in base.named_modules()}
    expected = _logits(base)
    model = get_lora2_model(base, LoRA2Config(r=4, k=2, target_rank=2))
    randomize_adapters(model, scale=0.3)
    plain = model.unload()
    assert {n: type(m) for n, m in plain.named_modules()} == types  # nn.Linear / Conv1D again, no adapter
    assert torch.equal(_logits(plain), expected)
