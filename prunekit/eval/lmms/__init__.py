"""prunekit inside lmms-eval: ``lmms-eval --model prunekit --model_args pretrained=...,strategy=...,budget=...``.

lmms-eval finds the model through the entry point that pyproject declares in its group ``lmms_eval.models``:
``manifest`` below names ``prunekit.eval.lmms.model.PrunekitLMM``. Nothing here imports lmms-eval until lmms-eval
asks, so prunekit installs and imports without it (``pip install -e ".[lmms]"`` adds it; docs/lmms_eval.md).
"""
from __future__ import annotations

MODEL_ID = "prunekit"
CLASS_PATH = "prunekit.eval.lmms.model.PrunekitLMM"


def manifest():
    """lmms-eval's registration payload (its registry calls this when it loads its entry points)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
