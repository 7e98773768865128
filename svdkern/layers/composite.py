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
import threading
from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .base import require_finite
from .linear import SVDLinear

Ranks = int | None | Mapping[str, int | None]

# The matrices built for the calls running now, per thread: (module id) -> {name: tensor}.
# Per thread, so two threads running one module (an eval server) never see each other's.
_calls = threading.local()


class SVDComposite(nn.Module):
    """Mixin placed before the torch class: `class SVDLSTM(SVDComposite, nn.LSTM)`.

    Subclasses give `layout(module)`: each factored torch parameter name -> the keys of the
    `SVDLinear` children it is stacked from along dim 0 (attention's packed in-projection is
    three, Q, K and V; every other matrix is one), read from the torch module's sizes alone,
    and `_init_variance(name)`: the variance of the torch init of that parameter, which a
    from-scratch build reproduces with no SVD; `_reset_rest()` re-initializes the other
    parameters as torch does.
    """

    layer_name: str
    torch_type: type[nn.Module]  # the torch class this is the SVD form of

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        torch_types = [c for c in cls.__mro__ if c.__module__.startswith("torch.nn")
                       and c is not nn.Module]
        if torch_types:
            cls.torch_type = torch_types[0]

    @staticmethod
    def layout(module: nn.Module) -> dict[str, tuple[str, ...]]:
        raise NotImplementedError

    def _init_variance(self, name: str) -> float:
        raise NotImplementedError

    def _reset_rest(self) -> None:
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, rank: Ranks = None, name: str | None = None):
        """Exact SVD form of a trained torch module (each matrix truncated to `rank`: one
        rank for all, or a dict from factor key to rank). Shares the module's other
        parameters and children (its biases, attention's `out_proj`)."""
        name = cls.__name__ if name is None else name
        if not isinstance(module, cls.torch_type) or isinstance(module, SVDComposite):
            raise TypeError(f"{name}: expected nn.{cls.torch_type.__name__}, got "
                            f"{type(module).__name__}")
        layer = cls.__new__(cls)
        vars(layer).update(_own_state(module))
        layer._factorize(rank, name, exact=True)
        return layer

    def _factorize(self, rank: Ranks, name: str, exact: bool) -> None:
        """Replace every matrix `layout` names by `SVDLinear` children: the exact SVD of
        its current value, or (`exact` False, from scratch) a fresh init of the torch
        init's variance. Every rank is checked before anything changes."""
        self.layer_name = name
        layout = self.layout(self)
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

    def _factorized(self) -> bool:
        return "_stacked" in vars(self)

    def reset_parameters(self) -> None:
        """A fresh init at the current ranks, as a from-scratch build: the factors from the
        torch init's spectrum, the other parameters as torch initializes them."""
        for pname, keys in self._stacked.items():
            for key in keys:
                factor = self.factors[key]
                factor._reset_default(factor.in_features, self._init_variance(pname))
        self._reset_rest()

    def _build(self, pname: str) -> Tensor:
        """The dense matrix `pname` from its factors."""
        parts = [self.factors[k].weight for k in self._stacked[pname]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)

    def _call_views(self) -> dict[str, Tensor] | None:
        return getattr(_calls, "views", {}).get(id(self))

    def __getattr__(self, attr: str):
        if attr in vars(self).get("_stacked", ()):
            views = self._call_views()
            return views[attr] if views is not None else self._build(attr)
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
        if not hasattr(_calls, "views"):
            _calls.views = {}
        _calls.views[id(self)] = {p: self._build(p) for p in self._stacked}
        try:
            return super().forward(*args, **kwargs)
        except (RuntimeError, ValueError, AssertionError) as exc:
            named = _named(exc, self.layer_name)
            if named is exc:
                raise
            raise named from exc
        finally:
            del _calls.views[id(self)]

    def to_dense(self) -> nn.Module:
        """The torch module with the merged matrices (a new module; this one is unchanged;
        its other parameters and children are shared, as `from_dense` shares them)."""
        dense = self.torch_type.__new__(self.torch_type)
        state = _own_state(self)
        for attr in ("_stacked", "layer_name"):
            state.pop(attr, None)
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


def _own_state(module: nn.Module) -> dict:
    """`vars(module)` with every container copied (parameter, buffer, child and hook dicts,
    sets, lists), so the new module can change its own without touching `module`'s; the
    tensors and children themselves are shared."""
    return {k: (type(v)(v) if isinstance(v, (dict, set, list)) else v)
            for k, v in vars(module).items()}


def _named(exc: Exception, name: str) -> Exception:
    """`exc` again, its message prefixed with the module's name (itself if its type takes
    other constructor arguments)."""
    try:
        return type(exc)(f"{name}: {exc}")
    except Exception:  # noqa: BLE001 (an exception type of another signature)
        return exc


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
