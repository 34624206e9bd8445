"""A strategy's decisions: asked (or replayed), validated, and put in sequence order."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PruningError
from ..pruner import Keep, PruneContext, Site, Stage
from .sequence import take


class DecisionsMixin:
    def _decide(self, ctx: PruneContext) -> Keep | None:
        """The strategy's decision (or the recorded one under replay); None = this site changes nothing."""
        if self.replaying:
            if ctx.site not in self._recorded:
                raise PruningError(f"replay has no recorded decision for {ctx.site}")
            keep = self._recorded[ctx.site]
        else:
            keep = self.strategy.prune(ctx)
            if keep is not None and not isinstance(keep, Keep):
                raise TypeError(f"{self.strategy.name}.prune must return a Keep or None, got {type(keep).__name__}")
            if keep is not None and keep.mask_only and ctx.stage is not Stage.LLM_LAYER:
                raise PruningError(f"{self.strategy.name} returned a mask_only decision at {ctx.site}; masking "
                                   "instead of removing is served at llm_layer sites only")
            if keep is not None and keep.order is not None and (ctx.stage is Stage.VISION_LAYER or keep.mask_only):
                raise PruningError(f"{self.strategy.name} returned an order at {ctx.site}; reordering is served "
                                   "after the vision encoder (vision_output, projector_output, llm_layer), not with "
                                   "mask_only")
        if keep is not None:
            keep = _normalise(keep, ctx, self.strategy.name)
        self._recorded[ctx.site] = keep
        return keep

    def _decide_all(self, ctx: PruneContext) -> Keep:
        """As ``_decide``, with None read as keeping every token (stages where a gather is cheap)."""
        keep = self._decide(ctx)
        return keep if keep is not None else Keep([torch.arange(int(n), device=ctx.tokens.device) for n in ctx.lengths])

    def _site(self, stage: Stage, layer: int | None = None) -> Site | None:
        return self._site_of.get((Stage(stage), layer))


def _normalise(keep: Keep, ctx: PruneContext, name: str) -> Keep:
    """Validate a decision and order each unit's outputs by representative (= sequence order)."""
    if len(keep.indices) != ctx.num_units:
        raise PruningError(f"{name} returned decisions for {len(keep.indices)} units at {ctx.site}; expected {ctx.num_units}")
    device = ctx.tokens.device
    indices, features, members = [], [] if keep.features is not None else None, [] if keep.members is not None else None
    orders = [] if keep.order is not None else None
    for u, idx in enumerate(keep.indices):
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        order = torch.argsort(idx)
        idx = idx[order]
        n = int(ctx.lengths[u])
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= n):
            raise PruningError(f"{name} kept index out of range at {ctx.site}: unit {u} has {n} tokens")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PruningError(f"{name} kept a token twice at {ctx.site} (unit {u}); representatives must be unique")
        indices.append(idx.to(device))
        if features is not None:
            f = keep.features[u]
            if f.shape[0] != idx.numel():
                raise PruningError(f"{name}: unit {u} has {idx.numel()} kept indices but {f.shape[0]} features")
            features.append(f[order.to(f.device)])
        if members is not None:
            m = keep.members[u]
            if len(m) != idx.numel():
                raise PruningError(f"{name}: unit {u} has {idx.numel()} kept indices but {len(m)} member lists")
            members.append([torch.as_tensor(m[j], dtype=torch.long).reshape(-1).cpu() for j in order.tolist()])
        if orders is not None:
            key = torch.as_tensor(keep.order[u]).reshape(-1)
            if key.numel() != idx.numel():
                raise PruningError(f"{name}: unit {u} has {idx.numel()} kept indices but {key.numel()} order keys")
            orders.append(key[order.to(key.device)].cpu())
    return Keep(indices, features, members, keep.mask_only, orders)


def _sequence_order(key: Tensor) -> Tensor:
    """Permutation putting outputs (sorted by representative) in sequence order: by key, ties by representative."""
    return torch.sort(key, stable=True).indices


def _in_sequence_order(keep: Keep, u: int) -> tuple[Tensor, list[Tensor] | None]:
    """Unit u's (indices, members) in sequence order, as the trace lists them."""
    indices, members = keep.indices[u], keep.members[u] if keep.members else None
    if keep.order is None:
        return indices, members
    seq = _sequence_order(keep.order[u])
    return indices[seq.to(indices.device)], None if members is None else [members[j] for j in seq.tolist()]


def _assemble(tokens: Tensor, keep: Keep) -> Tensor:
    """(U, K_max, D): each unit's kept (or merged) tokens in sequence order, zero right-padded."""
    if keep.order is not None:
        seq = [_sequence_order(o).to(i.device) for o, i in zip(keep.order, keep.indices)]
        keep = Keep([i[s] for i, s in zip(keep.indices, seq)],
                    None if keep.features is None else [f[s.to(f.device)] for f, s in zip(keep.features, seq)])
    sizes = {len(i) for i in keep.indices}
    if len(sizes) == 1:
        if keep.features is not None:
            return torch.stack([f.to(tokens.dtype) for f in keep.features])
        return take(tokens, torch.stack(keep.indices))
    out = tokens.new_zeros(tokens.shape[0], max(sizes), tokens.shape[2])
    for u, idx in enumerate(keep.indices):
        out[u, : len(idx)] = keep.features[u].to(tokens.dtype) if keep.features is not None else tokens[u, idx]
    return out
