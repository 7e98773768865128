"""`SVDComposite`: a torch module that multiplies by its weight matrices itself (attention,
RNNs), with each matrix held as an `SVDLinear` child.

Such modules run fused torch kernels (scaled-dot-product attention, cuDNN's RNN) that take
dense weights, so the SVD form keeps the torch class (its forward, its attributes, its
`isinstance`) and builds the dense matrices from the factors once per call. The factors
live in `factors`, one `SVDLinear` per matrix, so `svd_layers`, the regularizer, `prune`,
`summary` and checkpoints treat each matrix as any other SVD layer, each at its own rank.
Reading a matrix by its torch name (`in_proj_weight`, `weight_ih_l0`) builds it from the
factors, differentiably; assigning one is an error, as for `SVDLayer.weight`.
"""
from __future__ import annotations

import numbers
from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .base import require_finite
from .linear import SVDLinear

Ranks = int | None | Mapping[str, int | None]


class SVDComposite(nn.Module):
    """Mixin placed before the torch class: `class SVDLSTM(SVDComposite, nn.LSTM)`.

    Subclasses give `_layout()`: each factored torch parameter name -> the keys of the
    `SVDLinear` children it is stacked from along dim 0 (attention's packed in-projection is
    three, Q, K and V; every other matrix is one), and `_init_variance(name)`: the variance
    of the torch init of that parameter, which a from-scratch build reproduces with no SVD.
    """

    layer_name: str

    def _layout(self) -> dict[str, tuple[str, ...]]:
        raise NotImplementedError

    def _init_variance(self, name: str) -> float:
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Ranks = None, name: str | None = None):
        """Exact SVD form of a trained torch module (each matrix truncated to `rank`: one
        rank for all, or a dict from factor key to rank). Shares the module's other
        parameters and children (its biases, attention's `out_proj`)."""
        name = cls.__name__ if name is None else name
        dense_type = next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn"))
        if type(module) is not dense_type:
            raise TypeError(f"{name}: expected nn.{dense_type.__name__}, got "
                            f"{type(module).__name__}")
        layer = cls.__new__(cls)
        state = dict(vars(module))
        for attr in ("_parameters", "_buffers", "_modules"):
            state[attr] = dict(state[attr])  # the dense module keeps its own entries
        vars(layer).update(state)
        layer._factorize(rank, name, exact=True)
        return layer

    def _factorize(self, rank: Ranks, name: str, exact: bool) -> None:
        """Replace every matrix `_layout` names by `SVDLinear` children: the exact SVD of
        its current value, or (`exact` False, from scratch) a fresh init of the torch
        init's variance. Every rank is checked before anything changes."""
        self.layer_name = name
        layout = self._layout()
        keys = [k for ks in layout.values() for k in ks]
        ranks = _per_key(rank, keys, name)
        factors = {}
        for pname, ks in layout.items():
            weight = self._parameters[pname]
            require_finite(f"{name}.{pname}", "weight", weight.detach())
            for key, chunk in zip(ks, weight.chunk(len(ks), 0)):
                label = f"{name}.{key}"
                rows, cols = chunk.shape
                if exact:
                    factors[key] = SVDLinear.from_matrix(chunk, ranks[key], label)
                else:
                    factors[key] = SVDLinear(cols, rows, False, ranks[key], chunk.device,
                                             chunk.dtype, name=label,
                                             _variance=self._init_variance(pname))
        for pname in layout:
            del self._parameters[pname]
        vars(self)["_stacked"] = layout
        self.factors = nn.ModuleDict(factors)
        self._refresh_weights()

    def _build(self, pname: str) -> Tensor:
        """The dense matrix `pname` from its factors."""
        parts = [self.factors[k].weight for k in self._stacked[pname]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def __getattr__(self, attr: str):
        state = vars(self)
        views = state.get("_call_views")
        if views is not None and attr in views:
            return views[attr]
        if attr in state.get("_stacked", ()):
            return self._build(attr)
        return super().__getattr__(attr)

    def __setattr__(self, attr: str, value) -> None:
        if attr in vars(self).get("_stacked", ()):
            raise AttributeError(f"{self.layer_name}: {attr} is computed from the factors in "
                                 f"{self.layer_name}.factors and cannot be assigned; keep this "
                                 "module dense (decompose(..., skip=[name])) to set it")
        super().__setattr__(attr, value)

    def forward(self, *args, **kwargs):
        """The torch module's forward on matrices built once for this call (the torch
        forward reads them several times)."""
        vars(self)["_call_views"] = {p: self._build(p) for p in self._stacked}
        self._refresh_weights()
        try:
            return super().forward(*args, **kwargs)
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise type(exc)(f"{self.layer_name}: {exc}") from exc
        finally:
            del vars(self)["_call_views"]
            self._refresh_weights()

    def _refresh_weights(self) -> None:
        """Hook for subclasses whose torch forward reads its weights from a list of its
        own: refill it (the matrices of the running call, or none between calls)."""

    def to_dense(self) -> nn.Module:
        """The torch module with the merged matrices (a new module; this one is unchanged;
        its other parameters and children are shared, as `from_dense` shares them)."""
        dense_type = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn"))
        dense = dense_type.__new__(dense_type)
        state = {k: v for k, v in vars(self).items()
                 if k not in ("_stacked", "_call_views", "layer_name")}
        for attr in ("_parameters", "_buffers", "_modules"):
            state[attr] = dict(state[attr])
        del state["_modules"]["factors"]
        vars(dense).update(state)
        with torch.no_grad():
            for pname, keys in self._stacked.items():
                trains = any(p.requires_grad for k in keys
                             for p in (self.factors[k].U, self.factors[k].s, self.factors[k].V))
                dense._parameters[pname] = nn.Parameter(self._build(pname).clone(), trains)
        self._rebuilt(dense)
        return dense

    def _rebuilt(self, dense: nn.Module) -> None:
        """Hook for subclasses: finish the torch module `to_dense` filled in."""


def _per_key(rank: Ranks, keys: list[str], name: str) -> dict[str, int | None]:
    """`rank` (one for every matrix, or a dict by factor key) as a dict over `keys`."""
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(keys))
        if unknown:
            raise ValueError(f"{name}: rank names {unknown}, which are not among its matrices "
                             f"{keys}")
        return {k: rank.get(k) for k in keys}
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)):
        raise TypeError(f"{name}: rank must be an integer, a dict of them or None, got "
                        f"{type(rank).__name__} {rank!r}")
    return dict.fromkeys(keys, rank)
