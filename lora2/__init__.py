"""lora2: LoRA² (multi-scale low-rank approximation) fine-tuning for transformers models.

The library over the kernel package ``lora2_kernels``: PEFT-style surgery (``get_lora2_model``,
``LoRA2Model``), the rank allocator, the regulariser, the trainer and the ``lora2`` command line.
Every adapted module is a ``lora2_kernels.LoRA2Linear``.
"""

from lora2_kernels import LoRA2Linear

from .accounting import ParameterReport, parameter_report
from .config import DEFAULT_TARGET_MODULES, LoRA2Config
from .model import LoRA2Model, get_lora2_model

__version__ = "0.2.0"

Lora2Model = LoRA2Model  # the lora2 0.1 spelling

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoRA2Config",
    "LoRA2Linear",
    "LoRA2Model",
    "Lora2Model",
    "ParameterReport",
    "get_lora2_model",
    "parameter_report",
    "__version__",
]
