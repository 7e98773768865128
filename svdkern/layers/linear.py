"""`SVDLinear`: `nn.Linear` held as `U diag(s) V^T`."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .. import dispatch, ops, reference
from .base import SVDLayer


class SVDLinear(SVDLayer):
    """Linear layer `y = x V diag(s) U^T + b` with `U` (out, r), `s` (r,), `V` (in, r).

    Built from scratch it takes the SVD of `nn.Linear`'s default initialization, so `U`, `V`
    start orthonormal and `s` follows that initialization's spectrum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rank: int | None = None, device=None, dtype=None, *,
                 name: str = "SVDLinear", _dense: nn.Linear | None = None) -> None:
        super().__init__()
        self.layer_name = name
        self.in_features = in_features
        self.out_features = out_features
        dense = _dense if _dense is not None else nn.Linear(
            in_features, out_features, bias, device=device, dtype=dtype)
        self._init_factors(dense.weight.detach().unsqueeze(0), dense.bias, rank,  # g = 1
                           dense.weight.requires_grad)

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | None = None,
                   name: str = "SVDLinear") -> "SVDLinear":
        """Exact SVD form of a trained `nn.Linear` (truncated if `rank` is given)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(layer).__name__}")
        return cls(layer.in_features, layer.out_features, layer.bias is not None, rank,
                   name=name, _dense=layer)

    def _from_grouped(self, t: Tensor) -> Tensor:
        return t.squeeze(0)

    def _to_grouped(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0)

    def reset_parameters(self) -> None:
        """Factors of a freshly initialized `nn.Linear` at the current rank, as built from
        scratch (meta-device construction, then `to_empty()` and this)."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.U.device, dtype=self.U.dtype)
        self._reset_from(dense.weight.detach().unsqueeze(0), dense.bias)

    def _dense_weight(self) -> Tensor:
        return reference.materialize(self.U, self.s, self.V)  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, None, -1, self.in_features)
        return ops.svd_linear(x, self.U, self.s, self.V, self.bias)

    def flops(self, in_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        """(factorized, dense) FLOPs per input row."""
        chain, _ = dispatch.linear_flops(1, self.in_features, self.out_features, self.rank)
        return chain, 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")
