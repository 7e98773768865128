"""`SVDConv1D`: transformers' `Conv1D` (the GPT-2 family's linear, weight stored in x out,
`y = x W + b`) held as `U diag(s) V^T` of `W^T`, so it runs, prunes and exports as an
`SVDLinear` does while answering `weight`, `nf` and `nx` as `Conv1D` does."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .linear import SVDLinear

INIT_STD = 0.02  # Conv1D's own init: weight ~ N(0, 0.02^2), bias zeros


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is exactly transformers' `Conv1D` (checked by class, without
    importing transformers: a model holding one has imported it)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


class SVDConv1D(SVDLinear):
    """transformers' `Conv1D(nf, nx)` in SVD form: `U` (nf, r), `s` (r,), `V` (nx, r);
    `weight` is (nx, nf) as `Conv1D` stores it. From scratch the factors are distributed as
    the SVD of `Conv1D`'s N(0, 0.02^2) init (no SVD taken) and the bias is zero."""

    def __init__(self, nf: int, nx: int, rank: int | None = None, device=None, dtype=None, *,
                 name: str = "SVDConv1D", _dense: nn.Module | None = None) -> None:
        nn.Module.__init__(self)
        self.layer_name = name
        self.in_features, self.out_features = nx, nf
        if _dense is not None:
            self._init_factors(_dense.weight.detach().t().unsqueeze(0), _dense.bias, rank,
                               _dense.weight.requires_grad)
        else:
            self._init_default(1, nf, nx, nx, rank, nf, device, dtype,
                               variance=INIT_STD ** 2, bias_bound=0.0)

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: int | None = None,
                   name: str = "SVDConv1D") -> "SVDConv1D":
        """Exact SVD form of a trained transformers `Conv1D` (truncated if `rank` is given)."""
        if not is_conv1d(layer):
            raise TypeError(f"{name}: expected transformers' Conv1D, got {type(layer).__name__}")
        return cls(layer.nf, layer.nx, rank, name=name, _dense=layer)

    nf = property(lambda self: self.out_features)
    nx = property(lambda self: self.in_features)

    def reset_parameters(self) -> None:
        """Factors of a freshly initialized `Conv1D` at the current rank (see the class)."""
        self._reset_default(self.in_features, variance=INIT_STD ** 2, bias_bound=0.0)

    def _dense_weight(self) -> Tensor:
        return super()._dense_weight().t()  # (nx, nf), as Conv1D stores it

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, rank={self.rank}"
