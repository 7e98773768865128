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

    def _factorize(self, rank: Ranks, name: str, exact: bool) -> None:
        super()._factorize(rank, name, exact)
        self._flat_weights = self._flat_weight_refs = []  # drop torch's list of the dense ones

    @staticmethod
    def layout(module: nn.RNNBase) -> dict[str, tuple[str, ...]]:
        return {n: (n,) for n in module._flat_weights_names if n.startswith("weight_")}

    def _init_variance(self, name: str) -> float:
        """torch's RNN init U(-1/sqrt(H), 1/sqrt(H)): variance 1 / (3 H)."""
        return 1 / (3 * self.hidden_size)

    def reset_parameters(self) -> None:
        """torch's init (its `__init__` calls this); once factorized, the factors from that
        init's spectrum and the biases as torch draws them."""
        if self._factorized():
            super().reset_parameters()
        else:
            self.torch_type.reset_parameters(self)

    def _reset_rest(self) -> None:
        bound = 1 / self.hidden_size ** 0.5 if self.hidden_size > 0 else 0
        for p in self._parameters.values():
            nn.init.uniform_(p, -bound, bound)

    # torch's RNNs hand their kernel the list `_flat_weights` (with `_flat_weight_refs` to
    # see when it changed), kept on the module and rebuilt by `_init_flat_weights` (after
    # `.to()`, on unpickling, in the forward). Once factorized the list is computed on each
    # read instead: the matrices built for this thread's running call, and None between
    # calls, so no graph nor dense copy is kept, two threads never see each other's, and
    # `flatten_parameters()` (which on cuDNN would rewrite the tensors in place, out of
    # autograd's sight) stops at the None. Properties over these two private attributes are
    # the only way in: torch has no public hook for them.
    @property
    def _flat_weights(self) -> list:
        stacked = vars(self).get("_stacked")
        if stacked is None:  # torch's __init__, before the factors exist
            return vars(self)["_flat_weights"]
        views = self._call_views() or {}
        return [views.get(n) if n in stacked else getattr(self, n, None)
                for n in self._flat_weights_names]

    @_flat_weights.setter
    def _flat_weights(self, value: list) -> None:
        # read only until the factors exist; after, torch's writes hold no dense copy
        vars(self)["_flat_weights"] = [] if "_stacked" in vars(self) else value

    @property
    def _flat_weight_refs(self) -> list:
        return [None if w is None else weakref.ref(w) for w in self._flat_weights]

    @_flat_weight_refs.setter
    def _flat_weight_refs(self, value: list) -> None:
        vars(self)["_flat_weight_refs"] = []  # never read (computed above); torch's
        # __getstate__ deletes the entry

    def _rebuilt(self, dense: nn.Module) -> None:
        dense._init_flat_weights()  # torch's own, on the plain module: its real parameters


class SVDLSTM(_SVDRecurrent, nn.LSTM):
    __doc__ = _DOC.format("LSTM")


class SVDGRU(_SVDRecurrent, nn.GRU):
    __doc__ = _DOC.format("GRU")


class SVDRNN(_SVDRecurrent, nn.RNN):
    __doc__ = _DOC.format("RNN")
