from .base import ModelAdapter, adapter_for, register_adapter, supported_families
from . import llava  # noqa: F401  (registers the family)

__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "supported_families"]
