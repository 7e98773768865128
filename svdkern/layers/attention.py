"""`SVDMultiheadAttention`: `nn.MultiheadAttention` with its in-projection held as three SVD
layers, Q, K and V, each at its own rank (docs/SPEC.md section 1 says why three)."""
from __future__ import annotations

import torch.nn as nn

from .composite import Ranks, SVDComposite


class SVDMultiheadAttention(SVDComposite, nn.MultiheadAttention):
    """`nn.MultiheadAttention` whose Q, K and V projections are `factors.q`, `factors.k`,
    `factors.v` (`SVDLinear`, no bias: the in-projection bias stays `in_proj_bias`);
    `out_proj` stays an ordinary child (`decompose` makes it an `SVDLinear` too).

    `in_proj_weight` (or `q_proj_weight`, `k_proj_weight`, `v_proj_weight` when `kdim` or
    `vdim` differ from `embed_dim`) is built from the factors, so torch's forward, its
    inference fast path and `nn.TransformerEncoderLayer`'s (which read `in_proj_weight`)
    run unchanged. Built from scratch, the factors are distributed as the SVD of torch's
    Xavier init with no SVD taken; `rank` is one rank for Q, K and V or a dict
    {"q": ..., "k": ..., "v": ...}.
    """

    def __init__(self, embed_dim: int, num_heads: int, *args, rank: Ranks = None,
                 name: str = "SVDMultiheadAttention", **kwargs) -> None:
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, *args, **kwargs)
        self._factorize(rank, name, exact=False)

    @staticmethod
    def layout(module: nn.MultiheadAttention) -> dict[str, tuple[str, ...]]:
        if module._qkv_same_embed_dim:
            return {"in_proj_weight": ("q", "k", "v")}
        return {"q_proj_weight": ("q",), "k_proj_weight": ("k",), "v_proj_weight": ("v",)}

    def _init_variance(self, name: str) -> float:
        """Xavier-uniform's variance 2 / (fan_in + fan_out) of the (packed) parameter."""
        rows = 3 * self.embed_dim if name == "in_proj_weight" else self.embed_dim
        cols = {"k_proj_weight": self.kdim, "v_proj_weight": self.vdim}.get(name, self.embed_dim)
        return 2 / (rows + cols)

    def _reset_parameters(self) -> None:
        """torch's init (its `__init__` calls this); once factorized, `reset_parameters`."""
        if self._factorized():
            self.reset_parameters()
        else:
            super()._reset_parameters()

    def _reset_rest(self) -> None:
        """torch's init of the rest: zero in-projection and output biases, Xavier-normal
        `bias_k` / `bias_v`."""
        for bias in (self.in_proj_bias, self.out_proj.bias):
            if bias is not None:
                nn.init.zeros_(bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                nn.init.xavier_normal_(extra)
