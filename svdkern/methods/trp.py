"""TRP, Trained Rank Pruning (Xu et al.; docs/SPEC.md section 2): dense layers, a nuclear-norm
subgradient added to their gradients, and a periodic truncation of every weight to the rank
the energy rule keeps. The network is exported at the ranks of the last truncation.

SVDs are taken in fp32 whatever the model's dtype and batched: every weight matrix of the
same shape goes through one `torch.linalg.svd` call on the stacked matrices.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ..compress.decompose import (check_layer, convertible_layers, matrix_shapes, replace_modules,
                                  tied_to)
from ..layers import SVD_CONVS, SVDLinear, conv_spec, require_finite, scheme_for
from ..reference import (SCHEMES, ConvSpec, check_energy, check_rank_multiple,
                        conv_matrix_to_weight, conv_weight_to_matrix, kept_rank)


class TRP:
    """Drive TRP on `model`'s `nn.Linear` and `nn.Conv1d/2d/3d` layers inside any training loop.

    Call `after_backward()` once the task loss has been back-propagated and `after_step()`
    after `optimizer.step()`. `schedule="official"` (the default) runs the official
    `cifar-TRP.py`: every weight is replaced by its rank-k truncated SVD (k by the energy
    rule) before the first step (when TRP is built) and then every `period` steps, and on
    the step right after each truncation `after_backward()` adds `nuclear * U_k V_k^T`, from
    the SVD that truncation took, to each weight's gradient. `schedule="per_step"` is the
    paper's loss instead: the nuclear subgradient from a fresh SVD on every step, the
    truncation after every `period`-th step (docs/SPEC.md section 2). The official code
    counts its period within each epoch; this counts optimizer steps across epochs. `ranks`
    holds the ranks of the last truncation; `to_svd()` builds the low-rank model there.

    `energy` is the fraction of `sum s_j^2` a truncation may drop (0.1 keeps 0.9, the
    official default); `scheme` picks the conv matrix layout ("channel" or "spatial");
    `skip` names or glob patterns of layers left alone, as in `svdkern.decompose`; layers
    whose weight is frozen are left alone too; layers whose SVD form would compute
    something else are refused by name up front, as `decompose` refuses them
    (`convert.convertible_layers`); `rank_multiple` rounds the kept ranks up as in
    `svdkern.prune`. `scope="official"` truncates only what the official code does: the
    Conv2d layers with a kernel larger than 1x1, except the first conv of the model
    (`scope="all"`, the default: every linear and conv).
    """

    def __init__(self, model: nn.Module, energy: float = 0.1, nuclear: float = 3e-4,
                 period: int = 5, scheme: str = "channel", skip: Iterable[str] = (),
                 rank_multiple: int = 1, *, schedule: str = "official",
                 scope: str = "all") -> None:
        energy = check_energy("TRP", energy)
        if schedule not in SCHEDULES:
            raise ValueError(f"TRP: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if scope not in SCOPES:
            raise ValueError(f"TRP: unknown scope {scope!r}; expected one of {SCOPES}")
        if not (isinstance(nuclear, (int, float)) and math.isfinite(nuclear) and nuclear >= 0):
            raise ValueError(f"TRP: nuclear must be a finite number >= 0, got {nuclear!r}")
        if not (isinstance(period, int) and period >= 1):
            raise ValueError(f"TRP: period must be an integer >= 1, got {period!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"TRP: unknown scheme {scheme!r}; expected one of {SCHEMES}")
        check_rank_multiple("TRP", rank_multiple)
        # the layers to_svd() will convert: checked now, as decompose would, by name
        self.layers = dict(convertible_layers(model, skip, kinds=(nn.Linear, *SVD_CONVS),
                                              frozen_unchecked=True))
        if scope == "official":
            self.layers = _official_scope(model, self.layers)
        if not self.layers:
            raise ValueError("TRP: the model has no nn.Linear or nn.Conv1d/2d/3d layer to "
                             "truncate")
        self.model = model
        self.energy = energy
        self.nuclear = float(nuclear)
        self.period = period
        self.scheme = scheme
        self.rank_multiple = rank_multiple
        self.specs: dict[str, ConvSpec] = {}  # conv layers' geometry, once each trains
        self.ranks: dict[str, int] = {}  # rank of each trained layer's last truncation
        self.schedule = schedule
        self.steps = 0
        self._checked: set[str] = set()
        # official schedule: the subgradients of the last truncation, for the step after it
        self._pending: dict[str, Tensor] = {}
        self.trained()  # the trainable layers are checked now, by name
        for name, layer in self.layers.items():  # frozen ones keep their full rank
            if name not in self.ranks and not isinstance(
                    layer.weight, nn.parameter.UninitializedParameter):
                self.ranks[name] = min(matrix_shapes(layer, scheme)[0])
        if schedule == "official":
            self.truncate()  # before the first step

    def trained(self) -> list[str]:
        """The layers TRP drives: those whose weight is not frozen, each checked (as decompose
        would check it) the first time it trains, so a layer unfrozen later is checked then."""
        names = [name for name, layer in self.layers.items() if layer.weight.requires_grad]
        for name in names:
            if name not in self._checked:  # frozen layers are never read: left alone
                layer = self.layers[name]
                check_layer(name, layer, tied_to(self.model, layer))
                if isinstance(layer, tuple(SVD_CONVS)):
                    self.specs[name] = conv_spec(layer, scheme_for(layer, self.scheme),
                                                 name or type(layer).__name__)
                self.ranks[name] = min(matrix_shapes(layer, self.scheme)[0])
                self._checked.add(name)
        return names

    # ------------------------------------------------------------------ matrices
    def matrices(self, name: str, weight: Tensor | None = None) -> Tensor:
        """Layer `name`'s weight (or `weight`, shaped like it) as (g, rows, cols) matrices."""
        w = self.layers[name].weight if weight is None else weight
        return w.unsqueeze(0) if name not in self.specs else conv_weight_to_matrix(w, self.specs[name])

    def _to_weight(self, name: str, mats: Tensor) -> Tensor:
        return mats.squeeze(0) if name not in self.specs else conv_matrix_to_weight(mats, self.specs[name])

    @torch.no_grad()
    def low_rank_parts(self) -> dict[str, tuple[Tensor, Tensor, Tensor, int]]:
        """Per trained layer, the fp32 factors (U, s, Vh) of its (g, rows, cols) matrices and
        the rank k the energy rule keeps (the largest any group needs). One batched SVD per
        shape. A layer whose weight is frozen (requires_grad False) is left out: TRP neither
        adds to its gradient nor truncates it."""
        by_shape: dict[tuple, list[str]] = defaultdict(list)
        for name in self.trained():
            # an SVD of Inf returns NaN without an error: refuse it, naming the layer (the
            # energy rule below reads each layer's ranks on the host anyway)
            require_finite(f"TRP: layer {name or type(self.layers[name]).__name__!r}",
                           "weight", self.layers[name].weight)
            by_shape[tuple(self.matrices(name).shape)].append(name)
        parts = {}
        for names in by_shape.values():
            stack = torch.cat([self.matrices(n).detach().float() for n in names])
            U, s, Vh = torch.linalg.svd(stack, full_matrices=False)
            g = stack.shape[0] // len(names)
            for i, name in enumerate(names):
                sl = slice(i * g, (i + 1) * g)
                parts[name] = (U[sl], s[sl], Vh[sl],
                               kept_rank(s[sl], self.energy, self.rank_multiple))
        return parts

    # ------------------------------------------------------------------ the two TRP steps
    @torch.no_grad()
    def after_backward(self) -> None:
        """Add the nuclear-norm subgradient `nuclear * U_k V_k^T` to the weight gradients:
        on the step after each truncation from its SVD (official schedule), or every step
        from a fresh SVD (per_step)."""
        if self.nuclear == 0:
            return
        if self.schedule == "official":
            subgradients, self._pending = self._pending, {}
        else:
            subgradients = {name: self._to_weight(name, U[..., :k] @ Vh[..., :k, :])
                            for name, (U, _, Vh, k) in self.low_rank_parts().items()}
        for name, sub in subgradients.items():
            layer = self.layers[name]
            sub = sub.to(layer.weight.dtype)
            if layer.weight.grad is None:
                layer.weight.grad = self.nuclear * sub
            else:
                layer.weight.grad.add_(sub, alpha=self.nuclear)

    @torch.no_grad()
    def after_step(self) -> bool:
        """Count one optimizer step; every `period` steps truncate. Returns whether it did."""
        self.steps += 1
        if self.steps % self.period:
            return False
        self.truncate()
        return True

    @torch.no_grad()
    def truncate(self) -> dict[str, int]:
        """Replace every weight by its rank-k truncated SVD (k by the energy rule), in place;
        under the official schedule keep `U_k V_k^T` of that SVD for the next step's
        `after_backward`."""
        for name, (U, s, Vh, k) in self.low_rank_parts().items():
            layer = self.layers[name]
            low = (U[..., :k] * s[..., None, :k]) @ Vh[..., :k, :]
            layer.weight.copy_(self._to_weight(name, low).to(layer.weight.dtype))
            self.ranks[name] = k
            if self.schedule == "official" and self.nuclear:
                self._pending[name] = self._to_weight(name, U[..., :k] @ Vh[..., :k, :])
        return dict(self.ranks)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def to_svd(self) -> nn.Module:
        """A copy of the model with every trained TRP layer as an SVD layer at its last
        truncation rank (truncating the current weights there; frozen layers stay dense);
        `svdkern.export` makes it plain."""
        out = copy.deepcopy(self.model)
        replacements = {}
        for name in self.trained():
            layer = out.get_submodule(name)
            label = name or type(layer).__name__
            rank = self.ranks[name]
            replacements[name] = (
                SVDLinear.from_dense(layer, rank=rank, name=label)
                if isinstance(layer, nn.Linear) else SVD_CONVS[type(layer)].from_dense(
                    layer, scheme_for(layer, self.scheme), rank=rank, name=label))
        return replace_modules(out, replacements)


SCHEDULES = ("official", "per_step")
SCOPES = ("all", "official")


def _official_scope(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers the official `cifar-TRP.py` truncates (`get_look_up_table`): Conv2d with a
    kernel larger than 1x1, the first of those in the model excepted."""
    spatial = [name for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)]
    return {name: layer for name, layer in layers.items() if name in spatial[1:]}
