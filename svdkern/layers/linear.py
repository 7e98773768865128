"""`SVDLinear`: `nn.Linear` held as `U diag(s) V^T`."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .. import dispatch, ops, reference
from .base import SVDLayer


class SVDLinear(SVDLayer):
    """Linear layer `y = x V diag(s) U^T + b` with `U` (out, r), `s` (r,), `V` (in, r).

    Built from scratch its factors are distributed as the SVD of `nn.Linear`'s default
    initialization, with no SVD taken: `U`, `V` orthonormal (QR of Gaussians), `s` at the
    Marchenko-Pastur quantiles of that initialization's spectrum, the bias as nn.Linear's.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rank: int | None = None, device=None, dtype=None, *,
                 name: str = "SVDLinear", _dense: nn.Linear | None = None,
                 _variance: float | None = None) -> None:
        super().__init__()
        self.layer_name = name
        self.in_features = in_features
        self.out_features = out_features
        if _dense is not None:
            self._init_factors(_dense.weight.detach().unsqueeze(0), _dense.bias, rank,  # g = 1
                               _dense.weight.requires_grad)
        else:  # `_variance`: the weights' variance of another module's init (attention, RNNs)
            self._init_default(1, out_features, in_features, in_features, rank,
                               out_features if bias else None, device, dtype, _variance)

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | None = None,
                   name: str = "SVDLinear") -> "SVDLinear":
        """Exact SVD form of a trained `nn.Linear` (truncated if `rank` is given)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(layer).__name__}")
        return cls(layer.in_features, layer.out_features, layer.bias is not None, rank,
                   name=name, _dense=layer)

    @classmethod
    def from_matrix(cls, weight: Tensor, rank: int | None = None,
                    name: str = "SVDLinear") -> "SVDLinear":
        """Exact SVD form (no bias) of a weight matrix (out, in) of another module (an
        attention in-projection, an RNN's `weight_ih_l0`); frozen if `weight` is."""
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        dense.weight = nn.Parameter(weight.detach(), weight.requires_grad)
        return cls.from_dense(dense, rank, name)

    def _from_grouped(self, t: Tensor) -> Tensor:
        return t.squeeze(0)

    def _to_grouped(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0)

    def reset_parameters(self) -> None:
        """Factors of a freshly initialized `nn.Linear` at the current rank, as built from
        scratch (meta-device construction, then `to_empty()` and this)."""
        self._reset_default(self.in_features)

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
