"""Score signals from inside attention, without eager attention or N x N maps.

``AttentionProbe`` watches chosen attention modules of one model instance. For each, it computes only
the attention rows a strategy asks for (the CLS / first query, the last query, or the mean query) from
that layer's own q and k, softmaxed over all keys under the same causal / padding mask the layer uses,
and keeps the layer's values on request. The model keeps its attention implementation: the probe
registers a wrapping implementation (``prunekit_<impl>``) that records the rows and then calls the
original one (for ``eager``, the module's own ``eager_attention_forward``), with the original mask
function registered under the same name (environment.md §3.3: an unknown name would get no mask).
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

QUERIES = ("first", "last", "mean")
_PROBES: "weakref.WeakKeyDictionary[nn.Module, AttentionProbe]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class AttentionRows:
    """Attention probabilities of one query over all keys: ``first`` (CLS in a ViT), ``last`` (the last
    prompt token) or ``mean`` (the mean query vector); head-averaged (B, kv) or per head (B, H, kv)."""

    query: str = "last"
    heads: str = "mean"

    def __post_init__(self):
        if self.query not in QUERIES:
            raise ValueError(f"unknown query {self.query!r}; choose one of {QUERIES}")
        if self.heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {self.heads!r}")


def attention_rows(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                   which: AttentionRows) -> Tensor:
    """Rows of softmax(q k^T * scaling + mask) for the chosen query, in fp32. query (B,H,q,d), key (B,Hkv,kv,d)."""
    heads, q_len, kv_len = query.shape[1], query.shape[2], key.shape[2]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # GQA: as transformers' repeat_kv
    row = 0 if which.query == "first" else q_len - 1  # the mean query takes the last row's mask
    q = query.mean(2, keepdim=True) if which.query == "mean" else query[:, :, row : row + 1]
    scores = (q.float() @ key.float().transpose(-1, -2)) * scaling  # (B, H, 1, kv)
    if mask is not None:
        m = mask[:, :, row : row + 1, :kv_len] if mask.shape[2] > 1 else mask[..., :kv_len]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    elif causal and which.query != "mean":
        allowed = torch.arange(kv_len, device=scores.device) <= row + kv_len - q_len
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1).squeeze(2)  # (B, H, kv); fully masked rows (padding queries) give NaN
    probs = torch.nan_to_num(probs, nan=0.0)
    return probs.mean(1) if which.heads == "mean" else probs


class AttentionProbe:
    """Records requested attention rows (and values) of watched attention modules on each forward."""

    def __init__(self):
        self.requests: dict[nn.Module, list[AttentionRows]] = {}
        self.keep_values: set[nn.Module] = set()
        self.rows: dict[tuple[nn.Module, AttentionRows], Tensor] = {}
        self.values: dict[nn.Module, Tensor] = {}
        self._restore: list[tuple[object, str]] = []

    def watch(self, module: nn.Module, *rows: AttentionRows, values: bool = False) -> None:
        self.requests.setdefault(module, [])
        self.requests[module] += [r for r in rows if r not in self.requests[module]]
        if values:
            self.keep_values.add(module)

    def install(self) -> "AttentionProbe":
        """Route the watched modules' configs through the wrapping implementation."""
        for module in self.requests:
            _PROBES[module] = self
            config = module.config
            impl = config._attn_implementation
            if not impl.startswith("prunekit_"):
                self._restore.append((config, impl))
                config._attn_implementation_internal = _wrapping(impl)
        return self

    def remove(self) -> None:
        for config, impl in self._restore:
            config._attn_implementation_internal = impl
        for module in self.requests:
            if _PROBES.get(module) is self:
                del _PROBES[module]
        self._restore = []

    def clear(self) -> None:
        self.rows.clear()
        self.values.clear()

    # --- capture ------------------------------------------------------------------------------------
    def _capture(self, module, query, key, value, mask, scaling) -> None:
        causal = bool(getattr(module, "is_causal", False))
        for which in self.requests.get(module, ()):
            self.rows[(module, which)] = attention_rows(query, key, mask, scaling, causal, which)
        if module in self.keep_values:
            self.values[module] = value


def _wrapping(impl: str) -> str:
    """Register (once) an implementation that records probes and then calls ``impl``."""
    name = f"prunekit_{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        def forward(module, query, key, value, attention_mask, **kwargs):
            probe = _PROBES.get(module)
            if probe is not None:
                scaling = kwargs.get("scaling")
                probe._capture(module, query, key, value, attention_mask,
                               query.shape[-1] ** -0.5 if scaling is None else scaling)
            if impl == "eager":  # each modeling file has its own eager function
                inner = sys.modules[type(module).__module__].eager_attention_forward
            else:
                inner = ALL_ATTENTION_FUNCTIONS[impl]
            return inner(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name
