"""Config validation: every impossible value is a ValueError naming the field and its range."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora2 import LoRA2Config

BAD_VALUES = [
    ("r", 0, "r must be an integer >= 1"),
    ("r", 2.5, "r must be an integer"),
    ("k", 0, "k must be an integer >= 1"),
    ("k", -3, "k must be an integer >= 1"),
    ("target_rank", 9, "target_rank must be between 1 and r=8"),
    ("target_rank", 0, "target_rank must be between 1 and r=8"),
    ("alpha", 0.0, "alpha must be a finite number > 0"),
    ("alpha", float("nan"), "alpha must be a finite number > 0"),
    ("dropout", -0.1, r"dropout must be in \[0, 1\)"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("init_std", 0.0, "init_std must be a finite number > 0"),
    ("init_warmup", -1, "init_warmup must be an integer >= 0"),
    ("final_warmup", -1, "final_warmup must be an integer >= 0"),
    ("mask_interval", 0, "mask_interval must be an integer >= 1"),
    ("beta1", 1.0, r"beta1 must be in \[0, 1\)"),
    ("beta2", -0.5, r"beta2 must be in \[0, 1\)"),
    ("orth_reg_weight", -1.0, "orth_reg_weight must be a finite number >= 0"),
    ("total_steps", 0, "total_steps must be an integer >= 1"),
    ("target_modules", [], "target_modules must be None, a regex"),
    ("target_modules", [""], "target_modules must be None, a regex"),
    ("modules_to_save", "classifier", "modules_to_save must be None or a list"),
    ("format_version", 1, "format_version must be 2"),
    ("pruning", "greedy", r"pruning must be one of \('adalora', 'monotone'\)"),
    ("backend", "cuda", r"backend must be one of \('auto', 'triton', 'reference'\)"),
    ("init", "xavier", "init must be 'orthogonal' or 'normal'"),
    ("init_std", float("inf"), "init_std must be a finite number > 0"),
    ("alpha", "16", "alpha must be a finite number > 0"),
    ("beta1", -0.1, r"beta1 must be in \[0, 1\)"),
    ("total_steps", 2.5, "total_steps must be an integer >= 1"),
    ("init_warmup", 1.5, "init_warmup must be an integer"),
    ("target_modules", "query(", "target_modules must be a valid regular expression"),
    ("target_modules", 5, "target_modules must be None, a regex"),
    ("modules_to_save", [""], "modules_to_save must be None or a list"),
    ("base_model_name_or_path", 3, "base_model_name_or_path must be None or a string"),
    ("extra", "notes", "extra must be a dict"),
]


def test_every_field_has_a_bad_value_case():
    """The failure matrix covers the whole config: a new field without a bad-value case fails here."""
    fields = {f.name for f in dataclasses.fields(LoRA2Config)}
    assert fields == {field for field, _, _ in BAD_VALUES}


@pytest.mark.parametrize("field,value,message", BAD_VALUES)
def test_bad_value_names_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=f"LoRA2Config.{field}=.*{message}"):
        LoRA2Config(**{field: value})


def test_total_steps_must_exceed_warmups():
    with pytest.raises(ValueError, match="total_steps must be larger than init_warmup \\+ final_warmup = 30"):
        LoRA2Config(init_warmup=10, final_warmup=20, total_steps=30)
    LoRA2Config(init_warmup=10, final_warmup=20, total_steps=31)


def test_json_round_trip():
    cfg = LoRA2Config(r=6, k=4, target_rank=3, target_modules=["query", "value"], modules_to_save=["classifier"])
    assert LoRA2Config.from_dict(json.loads(cfg.to_json())) == cfg


@settings(max_examples=60, deadline=None)
@given(r=st.integers(-2, 20), k=st.integers(-2, 20), target_rank=st.integers(-2, 20),
       dropout=st.floats(-1, 2) | st.just(float("nan")), alpha=st.floats(-5, 50) | st.just(float("nan")))
def test_property_valid_iff_in_range(r, k, target_rank, dropout, alpha):
    valid = r >= 1 and k >= 1 and 1 <= target_rank <= r and 0 <= dropout < 1 and alpha > 0  # NaN compares False
    if valid:
        LoRA2Config(r=r, k=k, target_rank=target_rank, dropout=dropout, alpha=alpha)
    else:
        with pytest.raises(ValueError):
            LoRA2Config(r=r, k=k, target_rank=target_rank, dropout=dropout, alpha=alpha)
