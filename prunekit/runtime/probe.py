"""Score signals from inside attention, without eager attention or N x N maps.

A strategy declares per site what it needs (``Signals``: attention rows, keys, values). The runtime
then watches one attention module per site with an ``AttentionProbe``: the layer whose output the site
prunes (``vision_layer[l]``: layer l; ``vision_output`` / ``projector_output``: the vision feature
layer; ``llm_layer[k]``: layer k-1). For each it computes only the requested rows — the first query
(CLS in a ViT), the last query, the mean query, the mean row over all queries, or every text query
(raters) — from that layer's own q and k, softmaxed over all keys under the mask the layer uses, and
keeps keys and values on request. With ``Signals(pre=True)`` an ``llm_layer[k]`` site reads block k
itself instead, evaluated on its input before it runs (its input norm, q/k projections and RoPE:
PyramidDrop's score); nothing is wrapped for those.

The model keeps its attention implementation: the probe registers a wrapping implementation
(``prunekit_<impl>``) that records and then calls the original one (for ``eager``, the module's own
``eager_attention_forward``), with the original mask function registered under the same name
(an unknown name would get no mask; the mask function's own name keeps sdpa on its fast path).
``SiteSignals`` (runtime/site_signals.py) is the strategy's view: the captured tensors restricted to each
unit's visual tokens.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import compat
from ..errors import SignalError
from ..signals import AttentionRows
from .sequence import pack

CHUNK_ROWS = 256  # query rows per step of the "all" mean: at most B x H x CHUNK_ROWS x kv scores at once
_PROBES: "weakref.WeakKeyDictionary[nn.Module, AttentionProbe]" = weakref.WeakKeyDictionary()


def _row_index(which: str, live: Tensor, text: Tensor | None) -> tuple[Tensor, Tensor]:
    """(B, R) query rows for ``which`` and their validity."""
    q_len = live.shape[1]
    if which == "text":
        if text is None:
            raise SignalError("text-query rows exist only inside the language model")
        return pack(text, align="left")
    if which == "first":
        rows = live.int().argmax(1, keepdim=True)
    else:  # last, and the row whose mask the mean query takes
        rows = q_len - 1 - live.flip(1).int().argmax(1, keepdim=True)
    return rows, torch.ones_like(rows, dtype=torch.bool)


def _mean_weights(live: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, n) weights that average each row's live entries."""
    return (live.float() / live.sum(1, keepdim=True).clamp(min=1)).to(dtype)  # counts stay exact in fp32


def attention_rows(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                   which: AttentionRows, live: Tensor | None = None, text: Tensor | None = None,
                   synthetic: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scaling + mask) for the chosen queries, in fp32.

    query (B, H, q, d), key (B, Hkv, kv, d); ``live`` (B, q) marks real (non-padding) queries, ``text``
    (B, q) the text queries; ``synthetic`` (B, H, 1, d) the query of ``mean_hidden``. Returns (B, [H,] kv),
    or (B, [H,] R, kv) for ``text`` (rows past a sample's text count are zero).
    """
    batch, heads, q_len, dim = query.shape
    if heads != key.shape[1]:  # GQA: as transformers' repeat_kv
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
    key = key.float()
    if live is None and mask is None and not causal and which.query in ("first", "last"):
        # no padding, no mask (a ViT without ragged cuts): the row is a slice; the same numbers, fewer ops
        row = 0 if which.query == "first" else q_len - 1
        q = query[:, :, row : row + 1].float().contiguous()  # laid out as the gathered row would be
        probs = torch.nan_to_num(((q @ key.transpose(-1, -2)) * scaling).softmax(-1), nan=0.0)
        return (probs.mean(1) if which.heads == "mean" else probs).squeeze(-2)
    live = torch.ones(batch, q_len, dtype=torch.bool, device=query.device) if live is None else live.to(query.device)
    if which.query == "all":
        return _mean_over_queries(query, key, mask, scaling, causal, live, which.heads)
    rows, valid = _row_index(which.query, live, None if text is None else text.to(query.device))
    n_rows = rows.shape[1]
    if which.query == "mean":
        q = torch.einsum("bhqd,bq->bhd", query.float(), _mean_weights(live, torch.float32))[:, :, None]
    elif which.query == "mean_hidden":
        q = synthetic.float()
    else:
        q = query.gather(2, rows[:, None, :, None].expand(batch, heads, n_rows, dim)).float()
    probs = _probabilities(q, key, mask, scaling, causal, rows, q_len)
    probs = probs * valid[:, None, :, None]
    probs = probs.mean(1) if which.heads == "mean" else probs
    return probs if which.query == "text" else probs.squeeze(-2)


def _probabilities(q: Tensor, key: Tensor, mask: Tensor | None, scaling: float, causal: bool, rows: Tensor,
                   q_len: int) -> Tensor:
    """(B, H, R, kv) fp32 softmax of q (B, H, R, d) against key (B, H, kv, d) for query rows ``rows`` (B, R)
    of the layer's q_len queries, under the layer's mask (or causality when it has none)."""
    batch, n_rows, kv_len = q.shape[0], q.shape[2], key.shape[2]
    scores = (q @ key.transpose(-1, -2)) * scaling
    if mask is not None:
        m = mask[..., :kv_len].expand(batch, -1, -1, -1)
        if m.shape[2] > 1:
            m = m.gather(2, rows[:, None, :, None].expand(batch, m.shape[1], n_rows, kv_len))
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    elif causal:
        allowed = torch.arange(kv_len, device=scores.device) <= (rows + kv_len - q_len)[:, None, :, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1), nan=0.0)  # fully masked rows give NaN: make them 0


def _mean_over_queries(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                       live: Tensor, heads: str) -> Tensor:
    """(B, [H,] kv): the mean over each sample's live queries of their probability rows, CHUNK_ROWS rows at a time."""
    batch, n_heads, q_len, _ = query.shape
    weights = _mean_weights(live, torch.float32)
    total = key.new_zeros(batch, n_heads, key.shape[2])
    for start in range(0, q_len, CHUNK_ROWS):
        rows = torch.arange(start, min(start + CHUNK_ROWS, q_len), device=query.device).expand(batch, -1)
        probs = _probabilities(query[:, :, start : start + CHUNK_ROWS].float(), key, mask, scaling, causal, rows, q_len)
        total += torch.einsum("bhrk,br->bhk", probs, weights[:, start : start + CHUNK_ROWS])
    return total.mean(1) if heads == "mean" else total


QueryMasks = Callable[[nn.Module], "tuple[Tensor | None, Tensor | None] | None"]


@dataclass(frozen=True)
class BlockInput:
    """The source of ``pre`` signals: attention ``module`` evaluated on its block's input before the block runs."""

    module: nn.Module


class AttentionProbe:
    """Records requested attention rows, keys and values of watched attention modules on each forward.

    ``queries(module)`` (optional) returns the (live, text) query masks of the module's current call,
    or None to skip recording (e.g. decode steps). Sources are attention modules (recorded inside their
    own call, through the wrapping implementation) or ``BlockInput``s (computed on demand by
    ``capture_input`` before the block runs; nothing is wrapped for them).
    """

    def __init__(self, queries: QueryMasks | None = None):
        self.queries = queries
        self.requests: dict[nn.Module | BlockInput, list[AttentionRows]] = {}
        self.keep_keys: set = set()
        self.keep_values: set = set()
        self.rows: dict[tuple[nn.Module | BlockInput, AttentionRows], Tensor] = {}
        self.keys: dict = {}
        self.values: dict = {}
        self.masks: dict = {}
        self.input_norms: dict[nn.Module, nn.Module] = {}
        self.block_norms: dict[BlockInput, nn.Module] = {}
        self.synthetic_values: dict[nn.Module, Tensor] = {}
        self._inputs: dict[nn.Module, Tensor] = {}
        self.chunked: dict[nn.Module, list] = {}  # module -> its calls' (q, k, v, scaling) since the last flush
        self._restore: list[tuple[object, str]] = []
        self._hooks: list = []

    def watch(self, module: nn.Module, *rows: AttentionRows, keys: bool = False, values: bool = False,
              input_norm: nn.Module | None = None, chunked: bool = False) -> None:
        """Record ``rows`` (and keys / values) of ``module``. ``mean_hidden`` rows need ``input_norm``, the
        layer's pre-attention norm, whose input is the residual stream (its mean builds the global token).
        ``chunked``: the module attends in several calls over consecutive pieces of one flat sequence (a packed
        ViT: one call per image or window); its q, k, v are kept until ``flush`` lays them out per unit."""
        if chunked:
            self.chunked[module] = []
        if any(r.query == "mean_hidden" for r in rows):
            if input_norm is None or compat.AttentionModule(module).missing(rope=False):
                raise SignalError("mean_hidden rows are available only in a vision tower with q/v projections "
                                  "(no RoPE); use 'mean' (the mean query) elsewhere")
            self.input_norms[module] = input_norm
        self._request(module, rows, keys, values)

    def watch_input(self, module: nn.Module, norm: nn.Module, *rows: AttentionRows, keys: bool = False,
                    values: bool = False) -> BlockInput:
        """Rows (keys, values) of attention ``module`` as its block would compute them on the hidden states
        entering it: ``norm`` (the block's input norm), then the module's own projections and RoPE. They are
        computed by ``capture_input`` before the block runs; returns the source key."""
        if any(r.query == "mean_hidden" for r in rows):
            raise SignalError("mean_hidden rows are available only in a vision tower; use 'mean' with pre=True")
        missing = compat.AttentionModule(module).missing(rope=True)
        if missing:
            raise SignalError(f"pre signals need an attention module with {missing}; {type(module).__name__} has none")
        source = BlockInput(module)
        self.block_norms[source] = norm
        self._request(source, rows, keys, values)
        return source

    def _request(self, source, rows, keys: bool, values: bool) -> None:
        self.requests.setdefault(source, [])
        self.requests[source] += [r for r in rows if r not in self.requests[source]]
        if keys:
            self.keep_keys.add(source)
        if values:
            self.keep_values.add(source)

    def _watched(self) -> list[nn.Module]:
        return [m for m in self.requests if not isinstance(m, BlockInput)]

    def install(self) -> "AttentionProbe":
        """Route the watched modules' configs through the wrapping implementation."""
        for module, norm in self.input_norms.items():
            self._hooks.append(norm.register_forward_pre_hook(
                lambda _, args, module=module: self._inputs.__setitem__(module, args[0])))
        for module in self._watched():
            _PROBES[module] = self
            config = module.config
            impl = compat.attn_implementation(config)
            if not impl.startswith("prunekit_"):
                self._restore.append((config, impl))
                compat.set_attn_implementation(config, _wrapping(impl))
        return self

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for config, impl in self._restore:
            compat.set_attn_implementation(config, impl)
        for module in self._watched():
            if _PROBES.get(module) is self:
                del _PROBES[module]
        self._restore = []

    def clear(self) -> None:
        for store in (self.rows, self.keys, self.values, self.masks, self.synthetic_values, self._inputs):
            store.clear()
        self.drop_chunks()

    def drop_chunks(self) -> None:
        for calls in self.chunked.values():
            calls.clear()

    # --- capture ------------------------------------------------------------------------------------
    def _capture(self, module, query, key, value, mask, scaling, causal: bool) -> None:
        """Inside a watched module's attention call (q, k after RoPE); ``causal``: whether the backend applies
        causality itself when the call has no mask."""
        if module in self.chunked:
            self.chunked[module].append((query, key, value, scaling))
            return
        masks = self.queries(module) if self.queries is not None else (None, None)
        if masks is None:
            return
        synthetic = self._global_token(module, masks[0], query.shape[-1]) if module in self.input_norms else None
        self._record(module, module, query, key, value, mask, scaling, masks, causal, synthetic)

    def capture_input(self, source: BlockInput, hidden: Tensor, rope: tuple[Tensor, Tensor],
                      mask: Tensor | None) -> None:
        """Before a block runs: its attention's q, k (v) on ``hidden`` (B, L, D), under the (cos, sin) and the
        mask that the block is about to receive."""
        module = source.module
        masks = self.queries(module) if self.queries is not None else (None, None)
        if masks is None:
            return
        x = self.block_norms[source](hidden)
        attention = compat.AttentionModule(module)
        rotated = attention.rotate(attention.heads("q", x), attention.heads("k", x), *rope)
        if rotated is None:
            raise SignalError(f"pre signals need the modeling file of {type(module).__name__} to define "
                              "apply_rotary_pos_emb (1-D RoPE); this family is not supported yet")
        query, key = rotated
        value = attention.heads("v", x) if source in self.keep_values else None
        self._record(source, module, query, key, value, mask, attention.scaling, masks, attention.causal)

    def flush(self, module: nn.Module, layout: Callable[[list[Tensor]], Tensor], live: Tensor | None) -> None:
        """Lay out a chunked module's calls per unit with ``layout`` (its calls' (1, H, n, d) pieces of one
        tensor -> (units, H, n_max, d); ``live`` (units, n_max) marks real rows, None: no padding) and record its
        rows, keys and values. Only what the module's requests read is laid out."""
        calls, self.chunked[module] = self.chunked[module], []
        if not calls:
            return
        rows = bool(self.requests.get(module))
        needed = (rows, rows or module in self.keep_keys, module in self.keep_values)
        query, key, value = (layout([c[i] for c in calls]) if need else None for i, need in enumerate(needed))
        live = None if live is None else live.to(calls[0][0].device)
        mask = None if live is None else live[:, None, None, :]
        self._record(module, module, query, key, value, mask, calls[0][3], (live, None), False)

    def _record(self, source, module, query, key, value, mask, scaling, masks, causal: bool, synthetic=None) -> None:
        live, text = masks
        for which in self.requests.get(source, ()):
            self.rows[(source, which)] = attention_rows(query, key, mask, scaling, causal, which, live, text, synthetic)
        if source in self.keep_keys:
            self.keys[source] = key
        if source in self.keep_values:
            self.values[source] = value
        self.masks[source] = masks

    def _global_token(self, module, live: Tensor | None, head_dim: int) -> Tensor:
        """Query (B, H, 1, d) of the mean residual state, normed and projected as the layer does; its value
        goes to ``synthetic_values``."""
        x = self._inputs[module]
        live = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if live is None else live.to(x.device)
        token = self.input_norms[module](torch.einsum("bnd,bn->bd", x, _mean_weights(live, x.dtype))[:, None])
        attention = compat.AttentionModule(module)
        self.synthetic_values[module] = attention.heads("v", token, head_dim)[:, :, 0]
        return attention.heads("q", token, head_dim)


def _backend_causal(impl: str, module: nn.Module, is_causal: bool | None) -> bool:
    """Whether ``impl`` applies causality to a call that has no mask. sdpa's rule (and flash's): the call's
    ``is_causal``, else the module's attribute, else causal. eager applies only the mask it is given."""
    if impl == "eager":
        return False
    return bool(is_causal) if is_causal is not None else compat.AttentionModule(module).causal


def _wrapping(impl: str) -> str:
    """Register (once) an implementation that records probes and then calls ``impl``."""
    name = f"prunekit_{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        def forward(module, query, key, value, attention_mask, **kwargs):
            probe = _PROBES.get(module)
            if probe is not None:
                call = compat.AttentionCall.read(kwargs)
                probe._capture(module, query, key, value, attention_mask,
                               query.shape[-1] ** -0.5 if call.scaling is None else call.scaling,
                               _backend_causal(impl, module, call.is_causal))
            if impl == "eager":  # each modeling file has its own eager function
                inner = compat.AttentionModule(module).eager_function()
            else:
                inner = ALL_ATTENTION_FUNCTIONS[impl]
            return inner(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name
