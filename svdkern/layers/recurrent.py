"""`SVDLSTM`, `SVDGRU`, `SVDRNN`: torch's recurrent modules with every weight matrix
(`weight_ih_l{k}`, `weight_hh_l{k}`, `weight_hr_l{k}`, reverse directions too) held as an SVD
layer; the forward builds the dense matrices once per call and runs torch's fused kernel
(cuDNN on a GPU), as the official SVD_LSTM does."""
from __future__ import annotations

import weakref

import torch.nn as nn

from .composite import Ranks, SVDComposite


_DOC = ("`nn.{0}` with every weight matrix an `SVDLinear` in `factors` (keyed by torch's "
        "parameter name, e.g. `factors.weight_ih_l0`); the biases stay torch's parameters and "
        "reading `weight_ih_l0` builds the matrix. Built from scratch (the arguments of "
        "`nn.{0}`, plus `rank`: one for every matrix or a dict by parameter name) the factors "
        "are distributed as the SVD of torch's init, with no SVD taken.")


class _SVDRecurrent(SVDComposite):
    """The shared part of the three: the layout (every `weight_*` of the torch module, by its
    own name) and the list of weights torch's forward hands its kernel."""

    def __init__(self, *args, rank: Ranks = None, name: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the torch module, with torch's init
        self._factorize(rank, type(self).__name__ if name is None else name, exact=False)

    def _layout(self) -> dict[str, tuple[str, ...]]:
        return {n: (n,) for n in self._flat_weights_names if n.startswith("weight_")}

    def _init_variance(self, name: str) -> float:
        """torch's RNN init U(-1/sqrt(H), 1/sqrt(H)): variance 1 / (3 H)."""
        return 1 / (3 * self.hidden_size)

    def _init_flat_weights(self) -> None:
        """torch's RNNs keep the tensors their kernel takes in `_flat_weights`, rebuilt by
        this method (after `.to()`, on unpickling, and in torch's forward when they
        changed). Here the factored ones are the matrices built for the running call, and
        None between calls: so no graph nor dense copy is kept, and `flatten_parameters()`
        (which on cuDNN would rewrite those tensors in place, out of autograd's sight) stops
        at the None. Overriding it is the only way in: torch has no public hook for it."""
        views = vars(self).get("_call_views") or {}
        stacked = vars(self).get("_stacked", {})
        self._flat_weights = [views.get(n) if n in stacked else getattr(self, n, None)
                              for n in self._flat_weights_names]
        self._flat_weight_refs = [None if w is None else weakref.ref(w)
                                  for w in self._flat_weights]

    def _refresh_weights(self) -> None:
        self._init_flat_weights()

    def _rebuilt(self, dense: nn.Module) -> None:
        dense._init_flat_weights()  # torch's own, on the plain module: its real parameters


class SVDLSTM(_SVDRecurrent, nn.LSTM):
    __doc__ = _DOC.format("LSTM")


class SVDGRU(_SVDRecurrent, nn.GRU):
    __doc__ = _DOC.format("GRU")


class SVDRNN(_SVDRecurrent, nn.RNN):
    __doc__ = _DOC.format("RNN")
