"""Functional ops of svdkern: the one entry point layers and regularizers call.

`svd_linear` and `svd_conv2d` pick, per call, how the layer runs (`explain()` says which and
why):
- "materialized": build `W = (U * s) V^T` then one dense GEMM / conv (autograd gives the
  matching backward: `dW`, then `dU`, `dV`, `ds` from `dW`), when the FLOP model
  (`svdkern.cost`) says it is cheaper; this is the full-rank, large-batch regime;
- "fused": the Triton kernel that keeps `x V` on chip (`svdkern.fused`), for the factorized
  chain when Triton can run (`backend.resolve`) and the rank fits on chip;
- "chain": the PyTorch reference chain (`svdkern.reference`) otherwise.
`SVDKERN_BACKEND=reference` always runs the reference chain (the ground truth);
`SVDKERN_BACKEND=triton` runs the fused kernel whenever the rank fits, whatever the cost.
Convolutions have no Triton kernel: they choose between the two thin convs and one dense
conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from . import backend, cost, fused, reference, regularizer_ops
from .reference import ConvSpec


@dataclass(frozen=True)
class Plan:
    """How one call of an SVD layer runs, and why."""

    path: str  # "fused", "chain" or "materialized"
    reason: str
    chain_flops: int
    materialized_flops: int

    def __str__(self) -> str:
        return (f"{self.path}: {self.reason} (forward FLOPs: chain {self.chain_flops:,}, "
                f"materialized {self.materialized_flops:,})")


def _linear_plan(x: Tensor, U: Tensor, V: Tensor) -> tuple[str, str, int, int]:
    """(path, reason, chain FLOPs, materialized FLOPs) of `svd_linear` for these shapes."""
    n, r = V.shape
    m = U.shape[0]
    chain, mat = cost.linear_flops(math.prod(x.shape[:-1]), n, m, r)
    requested = backend.requested()
    if requested == "reference":
        return "chain", "SVDKERN_BACKEND=reference", chain, mat
    engine = backend.resolve(x.device)
    fits = fused.fits(r, x.dtype)
    if requested == "triton" and engine == "triton" and fits:
        return "fused", "SVDKERN_BACKEND=triton", chain, mat
    path, settled = cost.cheaper(chain, mat, lambda: _per_row(
        lambda rows: cost.linear_flops(rows, n, m, r)))
    fewer = "costs fewer FLOPs" if settled else "costs fewer FLOPs at large batch (symbolic sizes)"
    if path == "materialized":
        return "materialized", f"dense GEMM on W = (U*s) V^T {fewer}", chain, mat
    if engine == "triton" and fits:
        return "fused", f"factorized chain {fewer}; Triton kernel", chain, mat
    why = ("a torch.func transform is active (the fused op has no functorch rules)"
           if backend.func_transform_active() else
           "Triton cannot run on this device" if engine != "triton" else
           f"rank {r} > {cost.MAX_FUSED_RANK} or dtype {x.dtype} is beyond the fused kernel")
    return "chain", f"factorized chain {fewer}; {why}", chain, mat


def _per_row(flops_at) -> tuple[int, int]:
    """(chain, materialized) FLOPs one more batch row (image, for convs) adds: the slope of
    `flops_at(rows)`, whose comparison is the large-batch limit."""
    (chain2, mat2), (chain1, mat1) = flops_at(2), flops_at(1)
    return chain2 - chain1, mat2 - mat1


def _conv_plan(x: Tensor, U: Tensor, spec: ConvSpec) -> tuple[str, str, int, int]:
    chain, mat = cost.conv_flops(tuple(x.shape), spec, U.shape[-1])
    if backend.requested() == "reference":
        return "chain", "SVDKERN_BACKEND=reference", chain, mat
    path, settled = cost.cheaper(chain, mat, lambda: _per_row(
        lambda images: cost.conv_flops((images, *x.shape[-3:]), spec, U.shape[-1])))
    how = "one dense conv on the built weight" if path == "materialized" else "two thin convs"
    at = "" if settled else " at large batch (symbolic sizes)"
    return path, f"fewer FLOPs as {how}{at}", chain, mat


def explain(x: Tensor, U: Tensor, s: Tensor, V: Tensor, spec: ConvSpec | None = None) -> Plan:
    """Which path `svd_linear` (or `svd_conv2d` when `spec` is given) runs for these
    arguments, and why."""
    del s  # the plan depends on shapes, dtype and device only
    return Plan(*(_linear_plan(x, U, V) if spec is None else _conv_plan(x, U, spec)))


def _materialized_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor,
                         bias: Tensor | None = None) -> Tensor:
    return F.linear(x, reference.materialize(U, s, V), bias)


# Each path `svd_linear` may take, by the name `explain` gives it (the benchmarks time the
# paths one by one to measure the crossovers).
LINEAR_PATHS = {"fused": fused.svd_linear, "materialized": _materialized_linear,
                "chain": reference.svd_linear}


def svd_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """`y = x V diag(s) U^T + b` for `x` (..., n), `U` (m, r), `s` (r,), `V` (n, r)."""
    return LINEAR_PATHS[_linear_plan(x, U, V)[0]](x, U, s, V, bias)


# Each path `svd_conv2d` may take, by the name `explain` gives it.
CONV_PATHS = {"materialized": reference.svd_conv2d_materialized, "chain": reference.svd_conv2d}


def svd_conv2d(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None,
               spec: ConvSpec) -> Tensor:
    """Conv2d held as per-group factors `U` (g, rows, r), `s` (g, r), `V` (g, cols, r)."""
    return CONV_PATHS[_conv_plan(x, U, spec)[0]](x, U, s, V, bias, spec)


def orthogonality_loss(mats: Sequence[Tensor]) -> Tensor:
    """`sum ||M^T M - I||_F^2 / r^2` over the given 2-D matrices (one grouped Triton
    launch forward and one backward on the triton backend)."""
    return _regularizer("orthogonality_loss", mats)


def l1_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum |s_j|` over the given singular-value vectors (one segmented Triton launch for
    loss and gradient on the triton backend)."""
    return _regularizer("l1_loss", svals)


def hoyer_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum ||s||_1 / ||s||_2` over the given singular-value vectors (one segmented Triton
    launch for loss and gradient on the triton backend)."""
    return _regularizer("hoyer_loss", svals)


def _regularizer(name: str, tensors: Sequence[Tensor]) -> Tensor:
    """Run regularizer `name` on the Triton kernels where the backend says so, else on the
    reference (which also reports an empty list)."""
    tensors = list(tensors)
    on_triton = len(tensors) > 0 and backend.resolve(tensors[0].device) == "triton"
    return getattr(regularizer_ops if on_triton else reference, name)(tensors)
