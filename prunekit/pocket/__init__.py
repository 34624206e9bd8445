"""The pocket benchmark (docs/pocket.md): generated scenes and grounded one-word questions (``scenes``), the
evaluation split (``data``), a small LLaVA-1.5 (``model``) and its two-stage Lightning training (``training``)."""
