from .base import ImageLayout, ModelAdapter, adapter_for, register_adapter, supported_families
from . import internvl, llava, llava_next, qwen2_vl  # noqa: F401  (register the families)

__all__ = ["ImageLayout", "ModelAdapter", "adapter_for", "register_adapter", "supported_families"]
