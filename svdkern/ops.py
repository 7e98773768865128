"""Functional ops of svdkern: the entry points layers and regularizers call.

Each picks its implementation per call: `svd_linear` and `svd_conv` by the path
`svdkern.dispatch` plans (`explain()` says which and why), the regularizers by the backend
(`svdkern.backend.resolve`). The Triton modules are imported only when a kernel runs, so
these ops work without Triton installed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, dispatch, reference
from .reference import ConvSpec


def _fused_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    from .kernels.svd_linear import svd_linear
    return svd_linear(x, U, s, V, bias)


def _materialized_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor,
                         bias: Tensor | None = None) -> Tensor:
    return F.linear(x, reference.materialize(U, s, V), bias)


# Each path `svd_linear` may take, by the name `explain` gives it (the benchmarks time the
# paths one by one to measure the crossovers).
LINEAR_PATHS = {"fused": _fused_linear, "materialized": _materialized_linear,
                "chain": reference.svd_linear}


def svd_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """`y = x V diag(s) U^T + b` for `x` (..., n), `U` (m, r), `s` (r,), `V` (n, r)."""
    return LINEAR_PATHS[dispatch.linear_plan(x, U, V).path](x, U, s, V, bias)


# Each path `svd_conv` may take, by the name `explain` gives it.
CONV_PATHS = {"materialized": reference.svd_conv_materialized, "chain": reference.svd_conv}


def svd_conv(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None,
             spec: ConvSpec) -> Tensor:
    """A 1-, 2- or 3-D conv (`spec.dims`) held as per-group factors `U` (g, rows, r), `s`
    (g, r), `V` (g, cols, r)."""
    return CONV_PATHS[dispatch.conv_plan(x, U, spec).path](x, U, s, V, bias, spec)


def orthogonality_loss(mats: Sequence[Tensor], precision: str | None = None) -> Tensor:
    """`sum ||M^T M - I||_F^2 / r^2` over the given 2-D matrices (one grouped Triton
    launch forward and one backward on the triton backend).

    `precision` of the Gram's dots for fp32 factors: "ieee" (exact fp32), "tf32" or "bf16"
    (inputs rounded, fp32 accumulation), or None: TF32 on a GPU (tensor cores), IEEE
    elsewhere. Every backend computes the same rounding (on CPU, TF32 and bf16 are
    emulated); fp64 factors stay exact, bf16/fp16 ones multiply in their own dtype."""
    reference.check_precision("orthogonality_loss", precision)
    mats = list(mats)
    if len(mats) > 0 and backend.resolve(mats[0].device) == "triton":
        from .kernels import orthogonality
        return orthogonality.orthogonality_loss(mats, precision)
    if not mats:
        return reference.orthogonality_loss(mats)  # reports the empty list
    dtype = functools.reduce(torch.promote_types, (M.dtype for M in mats))
    return reference.orthogonality_loss(
        mats, reference.orthogonality_precision(precision, dtype, mats[0].device))


def l1_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum |s_j|` over the given singular-value vectors (one segmented Triton launch for
    loss and gradient on the triton backend)."""
    return _regularizer("l1_loss", svals)


def hoyer_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum ||s||_1 / ||s||_2` over the given singular-value vectors (one segmented Triton
    launch for loss and gradient on the triton backend)."""
    return _regularizer("hoyer_loss", svals)


def hoyer_square_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum (||s||_1 / ||s||_2)^2` over the given singular-value vectors (DeepHoyer's
    Hoyer-Square, without the official constant `- 1`; one segmented Triton launch for loss
    and gradient on the triton backend)."""
    return _regularizer("hoyer_square_loss", svals)


def _regularizer(name: str, tensors: Sequence[Tensor]) -> Tensor:
    """Run sparsity regularizer `name` on its Triton kernel where the backend says so, else
    on the reference (which also reports an empty list)."""
    tensors = list(tensors)
    if len(tensors) > 0 and backend.resolve(tensors[0].device) == "triton":
        from .kernels import sparsity
        return getattr(sparsity, name)(tensors)
    return getattr(reference, name)(tensors)
