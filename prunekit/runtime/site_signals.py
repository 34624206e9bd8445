"""``SiteSignals``: a strategy's view of what the probe recorded for its site, restricted to each unit's visual
tokens (``ctx.attention``, ``ctx.keys``, ``ctx.values``, ...)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import SignalError
from ..signals import AttentionRows
from .probe import AttentionProbe, BlockInput, _mean_weights, _row_index
from .sequence import pack


class SiteSignals:
    """A strategy's view of what the probe recorded for its site, restricted to each unit's visual tokens.

    ``source`` is the watched attention module (or the ``BlockInput`` of ``pre`` signals). ``columns`` (U, N)
    are the key positions of each unit's current visual tokens in that layer's sequence (``valid`` marks
    real ones; padded entries read as zero), or (U, N, g) when a token is a group of g encoder rows (Qwen's
    2x2 merge groups before the PatchMerger: attention summed, keys and values averaged over the group). ``batch_rows`` maps units to the layer's batch rows; ``prefix``
    counts the encoder tokens before the patches (CLS) at vision sites. Rows are probabilities over *all*
    keys of the layer (CLS, text, ...), so they do not sum to 1 over the visual tokens.
    """

    def __init__(self, probe: AttentionProbe, source: nn.Module | BlockInput, site: str, batch_rows: list[int],
                 columns: Tensor | None, valid: Tensor | None, prefix: int = 0, run: slice | None = None):
        self.probe, self.source, self.site, self.prefix = probe, source, site, prefix
        self.batch_rows = torch.as_tensor(batch_rows, dtype=torch.long)
        self.columns, self.valid = columns, valid
        # fast paths (every unit of the layer's batch; tokens a contiguous run of columns, all live): slices.
        # ``run``: the caller knows the tokens are columns run.start.. of every unit, all live (vision sites
        # without padding); ``columns`` and ``valid`` may then be None (per-layer index tensors cost time).
        self._all_rows = self.batch_rows.tolist() == list(range(len(batch_rows)))
        if run is None:
            n = columns.shape[1] if columns.dim() == 2 else -1
            first = columns[:, :1] if n > 0 else None
            if (first is not None and bool((first == first[:1]).all()) and bool(valid.all())
                    and bool((columns == first + torch.arange(n)).all())):
                run = slice(int(columns[0, 0]), int(columns[0, 0]) + n)
        self._run = run
        # merge groups (U, G, g) that tile every unit's rows 0.. in order, all live (Qwen2-VL before a cut):
        # a token's rows are a reshape of the recorded tensor, if it holds exactly G x g rows
        self._groups = None
        if run is None and columns.dim() == 3 and bool(valid.all()):
            n, g = columns.shape[1:]
            if bool((columns == torch.arange(n * g).view(n, g)).all()):
                self._groups = (n, g)

    def _recorded(self, store: dict, key, what: str) -> Tensor:
        if key not in store:
            raise SignalError(
                f"{what} was not recorded at {self.site}: declare it in the strategy's signals(site) "
                "(e.g. Signals(rows=(AttentionRows('first'),), values=True))"
            )
        x = store[key]
        if self._all_rows and x.shape[0] == len(self.batch_rows):
            return x
        return x[self.batch_rows.to(x.device)]

    def attention(self, query: str = "last", heads: str = "mean") -> Tensor:
        """(U, N) head-mean or (U, H, N) per-head probabilities; ``text``: (U, [H,] R, N). A token made of
        several encoder rows (a merge group) receives the sum of their probabilities. Like ``keys`` and
        ``values``, the result may be a view of what the probe recorded: read it, do not write into it."""
        which = AttentionRows(query, heads)
        rows = self._recorded(self.probe.rows, (self.source, which), f"attention rows {which}")
        if self._run is not None:
            return rows[..., self._run]
        if self._grouped(rows, -1):
            return rows.unflatten(-1, self._groups).sum(-1)
        cols = self.columns.to(rows.device)
        n, group = cols.shape[1], (cols.shape[2] if cols.dim() == 3 else 1)
        cols = cols.reshape(cols.shape[0], n * group)
        shape = (cols.shape[0],) + (1,) * (rows.dim() - 2) + (cols.shape[1],)
        index = cols.view(shape).expand(*rows.shape[:-1], cols.shape[1])
        picked = rows.gather(-1, index).unflatten(-1, (n, group)).sum(-1)
        return picked * self.valid.to(rows.device).view(shape[:-1] + (n,))

    def text_queries(self) -> Tensor:
        """(U, R) validity of the rows returned by ``attention('text')``."""
        live, text = self.probe.masks[self.source]
        if text is None:
            raise SignalError(f"there are no text queries at {self.site}")
        _, valid = pack(text, align="left")
        return valid[self.batch_rows.to(valid.device)]

    def keys(self) -> Tensor:
        """(U, Hkv, N, d) keys of the visual tokens (after RoPE in a language model)."""
        return self._gather_tokens(self._recorded(self.probe.keys, self.source, "keys"))

    def text_keys(self) -> Tensor:
        """(U, Hkv, R, d) keys of the text queries (the rows of ``attention('text')``; zero past a unit's count)."""
        keys = self._recorded(self.probe.keys, self.source, "keys")
        _, text = self.probe.masks[self.source]
        if text is None:
            raise SignalError(f"there are no text tokens at {self.site}")
        rows, valid = pack(text, align="left")
        rows, valid = rows[self.batch_rows.to(rows.device)].to(keys.device), valid[self.batch_rows.to(valid.device)]
        index = rows[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        return keys.gather(2, index) * valid.to(keys.device)[:, None, :, None]

    def values(self) -> Tensor:
        """(U, Hkv, N, d) values of the visual tokens."""
        return self._gather_tokens(self._recorded(self.probe.values, self.source, "values"))

    def prefix_values(self) -> Tensor:
        """(U, Hkv, P, d) values of the encoder's prefix tokens (CLS), which precede the patches."""
        values = self._recorded(self.probe.values, self.source, "values")
        return values[:, :, : self.prefix]

    def query_values(self, query: str = "first") -> Tensor:
        """(U, Hkv, d) the value vector of the query token (``first``/``last``), the live mean (``mean``) or
        the global token's own value (``mean_hidden``)."""
        if query == "mean_hidden":
            return self._recorded(self.probe.synthetic_values, self.source, "the mean_hidden token's value")
        values = self._recorded(self.probe.values, self.source, "values")
        live, _ = self.probe.masks[self.source]
        if live is None and query in ("first", "last"):  # no padding: the first / last row
            return values[:, :, 0 if query == "first" else -1]
        if live is None:
            live = torch.ones(values.shape[0], values.shape[2], dtype=torch.bool)
        else:
            live = live[self.batch_rows.to(live.device)]
        live = live.to(values.device)
        if query == "mean":
            return torch.einsum("uhnd,un->uhd", values, _mean_weights(live, values.dtype))
        rows, _ = _row_index(query, live, None)
        return values.gather(2, rows[:, None, :, None].expand(-1, values.shape[1], 1, values.shape[3])).squeeze(2)

    def _grouped(self, x: Tensor, dim: int) -> bool:
        """Whether x's ``dim`` holds exactly the units' merge groups in order (gathering them would copy x)."""
        return self._groups is not None and x.shape[dim] == self._groups[0] * self._groups[1] and x.is_contiguous()

    def _gather_tokens(self, x: Tensor) -> Tensor:
        """Per-token rows of x (U, H, kv, d); a merge group's rows are averaged."""
        if self._run is not None:
            return x[:, :, self._run]
        if self._grouped(x, 2):
            return x.unflatten(2, self._groups).mean(3)
        cols = self.columns.to(x.device)
        n, group = cols.shape[1], (cols.shape[2] if cols.dim() == 3 else 1)
        index = cols.reshape(cols.shape[0], n * group)[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
        picked = x.gather(2, index).unflatten(2, (n, group)).mean(3)
        return picked * self.valid.to(x.device)[:, None, :, None]
