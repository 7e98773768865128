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

from ..compress.decompose import (COMPOSITES, check_layer, convertible_layers, layer_kind,
                                  matrix_shapes, replace_modules, tied_to)
from ..layers import SVD_CONVS, SVDLinear, conv_spec, require_finite, scheme_for
from ..reference import (SCHEMES, ConvSpec, check_energy, check_rank_multiple,
                        conv_matrix_to_weight, conv_weight_to_matrix, kept_rank)


class TRP:
    """Drive TRP on `model`'s weight matrices inside any training loop: those of
    `nn.Linear`, `nn.Conv1d/2d/3d`, and each matrix of `nn.LSTM`/`GRU`/`RNN` (every
    `weight_*`) and `nn.MultiheadAttention` (Q, K and V apart), the matrices `decompose`
    factors.

    Call `after_backward()` once the task loss has been back-propagated and `after_step()`
    after `optimizer.step()`. `schedule="official"` (the default) runs the official
    `cifar-TRP.py`: every weight is replaced by its rank-k truncated SVD (k by the energy
    rule) before the first step (when TRP is built) and then every `period` steps, and on
    the step right after each truncation `after_backward()` adds `nuclear * U_k V_k^T`, from
    the SVD that truncation took, to each weight's gradient. `schedule="per_step"` is the
    paper's loss instead: the nuclear subgradient from a fresh SVD on every step, the
    truncation after every `period`-th step (docs/SPEC.md section 2). The official code
    counts its period within each epoch; this counts optimizer steps across epochs. `ranks`
    holds the ranks of the last truncation, by layer name (`lstm.weight_hh_l0`, `attn.q`
    for a matrix of an RNN or attention layer `lstm`, `attn`); `to_svd()` builds the
    low-rank model there.

    `energy` is the fraction of `sum s_j^2` a truncation may drop (0.1 keeps 0.9, the
    official default); `scheme` picks the conv matrix layout ("channel" or "spatial");
    `skip` names or glob patterns of layers left alone, as in `svdkern.decompose`; weights
    that are frozen are left alone too; layers whose SVD form would compute something else
    are refused by name up front, as `decompose` refuses them (`convert.convertible_layers`);
    `rank_multiple` rounds the kept ranks up as in `svdkern.prune`. `scope="official"`
    truncates only what the official code does: the Conv2d layers with a kernel larger than
    1x1, except the first conv of the model (`scope="all"`, the default: every matrix).
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
        self.layers = dict(convertible_layers(model, skip, kinds=TRUNCATED,
                                              frozen_unchecked=True))
        if scope == "official":
            self.layers = _official_scope(model, self.layers)
            if not self.layers:
                raise ValueError("TRP: scope='official' truncates only Conv2d layers with "
                                 "kernels larger than 1x1, the first excepted, and this model "
                                 "has none; use scope='all' (every matrix)")
        if not self.layers:
            raise ValueError("TRP: the model has no nn.Linear, nn.Conv1d/2d/3d, attention or "
                             "RNN layer to truncate")
        self.model = model
        self.energy = energy
        self.nuclear = float(nuclear)
        self.period = period
        self.scheme = scheme
        self.rank_multiple = rank_multiple
        # each layer's matrices, and all of them by `ranks`' key
        self._by_layer = {name: _targets(name, layer) for name, layer in self.layers.items()}
        self.targets = {t.key: t for targets in self._by_layer.values() for t in targets}
        self.ranks: dict[str, int] = {}  # rank of each matrix's last truncation
        self.schedule = schedule
        self.steps = 0
        self._checked: set[str] = set()
        # official schedule: the subgradients of the last truncation, for the step after it
        self._pending: dict[str, Tensor] = {}
        self.trained()  # the trainable layers are checked now, by name
        for key, target in self.targets.items():  # frozen ones keep their full rank
            if key not in self.ranks and not isinstance(
                    target.weight, nn.parameter.UninitializedParameter):
                self.ranks[key] = target.full_rank(scheme)
        if schedule == "official":
            self.truncate()  # before the first step

    def trained(self) -> list[str]:
        """The layers TRP drives: those with a weight that is not frozen, each checked (as
        decompose would check it) the first time it trains, so a layer unfrozen later is
        checked then."""
        names = [name for name, layer in self.layers.items()
                 if any(t.weight.requires_grad for t in self._by_layer[name])]
        for name in names:
            if name not in self._checked:  # frozen layers are never read: left alone
                layer = self.layers[name]
                check_layer(name, layer, tied_to(self.model, layer))
                for target in self._by_layer[name]:
                    target.check(self.scheme)
                    self.ranks[target.key] = target.full_rank(self.scheme)
                self._checked.add(name)
        return names

    def _trained_targets(self) -> list["_Matrix"]:
        return [t for name in self.trained() for t in self._by_layer[name]
                if t.weight.requires_grad]

    @torch.no_grad()
    def low_rank_parts(self) -> dict[str, tuple[Tensor, Tensor, Tensor, int]]:
        """Per trained matrix (by `ranks`' key), the fp32 factors (U, s, Vh) of its (g, rows,
        cols) matrices and the rank k the energy rule keeps (the largest any group needs).
        One batched SVD per shape. A frozen weight (requires_grad False) is left out: TRP
        neither adds to its gradient nor truncates it."""
        by_shape: dict[tuple, list[_Matrix]] = defaultdict(list)
        for target in self._trained_targets():
            # an SVD of Inf returns NaN without an error: refuse it, naming the layer (the
            # energy rule below reads each layer's ranks on the host anyway)
            require_finite(f"TRP: layer {target.label!r}", "weight", target.value())
            by_shape[tuple(target.matrices().shape)].append(target)
        parts = {}
        for targets in by_shape.values():
            stack = torch.cat([t.matrices().detach().float() for t in targets])
            U, s, Vh = torch.linalg.svd(stack, full_matrices=False)
            g = stack.shape[0] // len(targets)
            for i, target in enumerate(targets):
                sl = slice(i * g, (i + 1) * g)
                parts[target.key] = (U[sl], s[sl], Vh[sl],
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
            subgradients = {key: U[..., :k] @ Vh[..., :k, :]
                            for key, (U, _, Vh, k) in self.low_rank_parts().items()}
        for key, sub in subgradients.items():
            self.targets[key].add_to_grad(sub, self.nuclear)

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
        """Replace every weight matrix by its rank-k truncated SVD (k by the energy rule),
        in place; under the official schedule keep `U_k V_k^T` of that SVD for the next
        step's `after_backward`."""
        for key, (U, s, Vh, k) in self.low_rank_parts().items():
            self.targets[key].write((U[..., :k] * s[..., None, :k]) @ Vh[..., :k, :])
            self.ranks[key] = k
            if self.schedule == "official" and self.nuclear:
                self._pending[key] = U[..., :k] @ Vh[..., :k, :]
        return dict(self.ranks)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def to_svd(self) -> nn.Module:
        """A copy of the model with every trained TRP layer in SVD form, each matrix at its
        last truncation rank (truncating the current weights there; frozen layers stay
        dense); `svdkern.export` makes it plain."""
        out = copy.deepcopy(self.model)
        replacements = {}
        for name in self.trained():
            layer = out.get_submodule(name)
            label = name or type(layer).__name__
            ranks = {t.block_key: self.ranks[t.key] for t in self._by_layer[name]}
            if isinstance(layer, nn.Linear):
                replacements[name] = SVDLinear.from_dense(layer, rank=ranks[None], name=label)
            elif type(layer) in SVD_CONVS:
                replacements[name] = SVD_CONVS[type(layer)].from_dense(
                    layer, scheme_for(layer, self.scheme), rank=ranks[None], name=label)
            else:
                replacements[name] = COMPOSITES[layer_kind(layer)].from_dense(
                    layer, rank=ranks, name=label)
        return replace_modules(out, replacements)


class _Matrix:
    """One weight matrix TRP truncates: a linear's or conv's `weight` (as its (g, rows, cols)
    matrices by the scheme), or one block of an attention or RNN parameter (the rows of
    `block_key`, as `SVDComposite.layout` stacks them)."""

    def __init__(self, layer: str, module: nn.Module, param: str, block_key: str | None,
                 block: int, blocks: int) -> None:
        self.module, self.param = module, param
        self.block_key, self.block, self.blocks = block_key, block, blocks
        self.key = layer if block_key is None else ".".join(p for p in (layer, block_key) if p)
        self.label = self.key or type(module).__name__
        self.spec: ConvSpec | None = None

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.param]

    def check(self, scheme: str) -> None:
        """Read the conv geometry (the layer was checked as decompose checks it)."""
        if isinstance(self.module, tuple(SVD_CONVS)):
            self.spec = conv_spec(self.module, scheme_for(self.module, scheme), self.label)

    def full_rank(self, scheme: str) -> int:
        if self.block_key is None:
            return min(matrix_shapes(self.module, scheme)[0])
        return min(self.weight.shape[0] // self.blocks, self.weight.shape[1])

    def _rows(self, tensor: Tensor) -> Tensor:
        return tensor if self.blocks == 1 else tensor.chunk(self.blocks, 0)[self.block]

    def value(self) -> Tensor:
        return self._rows(self.weight.detach())

    def matrices(self) -> Tensor:
        """The weight as (g, rows, cols) matrices."""
        w = self.value()
        return w.unsqueeze(0) if self.spec is None else conv_weight_to_matrix(w, self.spec)

    def _to_weight(self, mats: Tensor) -> Tensor:
        w = mats.squeeze(0) if self.spec is None else conv_matrix_to_weight(mats, self.spec)
        return w.to(self.weight.dtype)

    def write(self, mats: Tensor) -> None:
        self._rows(self.weight.data).copy_(self._to_weight(mats))

    def add_to_grad(self, mats: Tensor, alpha: float) -> None:
        weight = self.weight
        if not weight.requires_grad:  # frozen since the truncation this comes from
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        self._rows(weight.grad).add_(self._to_weight(mats), alpha=alpha)


def _targets(name: str, layer: nn.Module) -> list[_Matrix]:
    """The matrices of one layer TRP truncates."""
    kind = layer_kind(layer)
    if kind not in COMPOSITES:
        return [_Matrix(name, layer, "weight", None, 0, 1)]
    return [_Matrix(name, layer, pname, key, i, len(keys))
            for pname, keys in COMPOSITES[kind].layout(layer).items()
            for i, key in enumerate(keys)]


# the torch layers TRP truncates: every kind decompose converts but transformers' Conv1D
TRUNCATED = (nn.Linear, *SVD_CONVS, *COMPOSITES)


SCHEDULES = ("official", "per_step")
SCOPES = ("all", "official")


def _official_scope(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers the official `cifar-TRP.py` truncates (`get_look_up_table`): Conv2d with a
    kernel larger than 1x1, the first of those in the model excepted."""
    spatial = [name for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)]
    return {name: layer for name, layer in layers.items() if name in spatial[1:]}
