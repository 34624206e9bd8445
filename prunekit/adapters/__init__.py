from .base import ImageLayout, ModelAdapter, VisualInjections, adapter_for, register_adapter, supported_families
from . import internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_5, qwen3_vl  # noqa: F401  (register the families)

__all__ = ["ImageLayout", "ModelAdapter", "VisualInjections", "adapter_for", "register_adapter", "supported_families"]
