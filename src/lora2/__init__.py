"""lora2: LoRA² (multi-scale low-rank approximation) fine-tuning for transformers models."""

from .accounting import ParameterReport, parameter_report
from .config import DEFAULT_TARGET_MODULES, LoRA2Config
from .layer import Lora2Linear
from .model import Lora2Model, get_lora2_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoRA2Config",
    "Lora2Linear",
    "Lora2Model",
    "ParameterReport",
    "get_lora2_model",
    "parameter_report",
    "__version__",
]
