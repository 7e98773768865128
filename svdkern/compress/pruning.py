"""`prune`: drop singular values by the energy or the value rule and physically shrink U, s, V."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import parametrize

from ..layers import SVDLayer, svd_layers
from ..reference import check_prune_rule, check_rank_multiple, kept_rank


@dataclass(frozen=True)
class PruneRecord:
    """What pruning did to one layer."""

    name: str
    shape: tuple[int, int]
    rank_before: int
    rank_after: int
    energy_kept: float


def prune(model: nn.Module, energy: float | None = None,
          optimizer: torch.optim.Optimizer | None = None, rank_multiple: int = 1, *,
          threshold: float | None = None) -> list[PruneRecord]:
    """Prune every SVD layer of `model` in place by the energy rule (docs/SPEC.md section 1):
    drop the smallest `s_j^2` while the dropped energy is `<= energy * sum s_j^2`, keeping at
    least rank 1; or, with `threshold` instead of `energy` (exactly one), by the value rule:
    keep the `|s_j| >= threshold`, at least rank 1 (the official `--sensitivity`). Grouped
    convs keep, in every group, the largest rank any group needs.
    `rank_multiple` rounds each kept rank up to a multiple of it (at most the full rank),
    keeping a few more singular values: with 8, the factors' rows start 16 bytes apart in
    bf16, which the GPU kernels need for 16-byte loads (1: the paper's rule).

    The Parameter objects are kept (their data shrinks), so an optimizer built before still
    holds them; pass it as `optimizer` and its per-parameter state (Adam moments, momentum)
    is sliced to the surviving ranks too. Without it, stale state of the old shape breaks
    the next step: rebuild the optimizer then. Everything is checked before anything changes.
    """
    return apply_plan(plan(model, energy, rank_multiple, threshold=threshold), optimizer)


def plan(model: nn.Module, energy: float | None = None, rank_multiple: int = 1, *,
         threshold: float | None = None) -> list[tuple[str, SVDLayer, Tensor]]:
    """Validate `model`, the rule (`energy` or `threshold`) and `rank_multiple` and decide,
    per SVD layer, the kept rank indices (g, k); nothing is changed. `prune` is
    `apply_plan(plan(...))`; distributed pruning decides on one rank and applies everywhere."""
    energy, threshold = check_prune_rule("prune", energy, threshold)
    check_rank_multiple("prune", rank_multiple)
    layers = svd_layers(model)
    if not layers:
        raise ValueError("prune: the model has no SVD layers (call svdkern.decompose first)")
    plans = []
    for name, layer in layers:
        if parametrize.is_parametrized(layer):
            raise ValueError(f"prune: layer {name or '<root>'} has parametrized factors "
                             "(torch.nn.utils.parametrize), which pruning cannot shrink; "
                             "remove the parametrization first")
        layer.check_finite()
        plans.append((name, layer, keep_index(layer._to_grouped(layer.s), energy, rank_multiple,
                                              threshold)))
    return plans


def apply_plan(plans: list[tuple[str, SVDLayer, Tensor]],
               optimizer: torch.optim.Optimizer | None = None) -> list[PruneRecord]:
    """Shrink each planned layer (and `optimizer`'s state) to its kept ranks."""
    if optimizer is not None:
        for name, layer, _ in plans:
            _check_sliceable_state(name, layer, optimizer)
    records = []
    for name, layer, index in plans:
        records.append(_record(name, layer, index))
        _apply(layer, index, optimizer)
    return records


def keep_index(s: Tensor, energy: float | None, rank_multiple: int = 1,
               threshold: float | None = None) -> Tensor:
    """Per-group indices (g, k) of the ranks kept, in their original order: the largest
    `|s_j|` up to the rule's count, rounded up to a multiple of `rank_multiple`."""
    top = torch.topk(s.detach().abs(), kept_rank(s, energy, rank_multiple, threshold),
                     dim=-1).indices
    return torch.sort(top, dim=-1).values


def _record(name: str, layer: SVDLayer, index: Tensor) -> PruneRecord:
    s = layer._to_grouped(layer.s).detach().double()
    kept = torch.gather(s, -1, index.to(s.device)).pow(2).sum()
    total = s.pow(2).sum()
    return PruneRecord(name, layer.matrix_shape, layer.rank, index.shape[-1],
                       float(kept / total) if total > 0 else 1.0)


def _check_sliceable_state(name: str, layer: SVDLayer, optimizer: torch.optim.Optimizer) -> None:
    """Pruning slices optimizer state shaped like its parameter (Adam's moments, momentum)
    and keeps scalars (step counts); any other tensor (Adafactor's row and column factors)
    has no rank axis it can slice, and left alone it would break the next step."""
    for pname in ("U", "s", "V"):
        param = getattr(layer, pname)
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"prune: {type(optimizer).__name__} state {key!r} of layer {name or '<root>'}"
                    f" {pname} has shape {tuple(value.shape)}, neither the parameter's "
                    f"{tuple(param.shape)} nor a scalar, so it cannot be cut to the kept ranks; "
                    "prune without optimizer= and build the optimizer again")


def _apply(layer: SVDLayer, index: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    for param in (layer.U, layer.s, layer.V):
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == param.shape:
                state[key] = layer.select_ranks(value, index)
    layer.set_factors(*(layer._to_grouped(layer.select_ranks(p.data, index))
                        for p in (layer.U, layer.s, layer.V)))
