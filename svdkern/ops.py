"""Functional ops of svdkern: the one entry point layers and regularizers call.

Today every op runs the pure-PyTorch reference (`svdkern.reference`); the Triton kernels
plug in behind these same functions, so callers never change.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from . import backend, reference
from .reference import ConvSpec


def svd_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """`y = x V diag(s) U^T + b` for `x` (..., n), `U` (m, r), `s` (r,), `V` (n, r)."""
    return reference.svd_linear(x, U, s, V, bias)


def svd_conv2d(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None,
               spec: ConvSpec) -> Tensor:
    """Conv2d held as per-group factors `U` (g, rows, r), `s` (g, r), `V` (g, cols, r)."""
    return reference.svd_conv2d(x, U, s, V, bias, spec)


def orthogonality_loss(mats: Sequence[Tensor]) -> Tensor:
    """`sum ||M^T M - I||_F^2 / r^2` over the given 2-D matrices (one grouped Triton
    launch forward and one backward on the triton backend)."""
    mats = list(mats)
    if mats and backend.resolve(mats[0].device) == "triton":
        from . import regularizer_ops
        return regularizer_ops.orthogonality_loss(mats)
    return reference.orthogonality_loss(mats)


def l1_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum |s_j|` over the given singular-value vectors (one segmented Triton launch for
    loss and gradient on the triton backend)."""
    svals = list(svals)
    if svals and backend.resolve(svals[0].device) == "triton":
        from . import regularizer_ops
        return regularizer_ops.l1_loss(svals)
    return reference.l1_loss(svals)


def hoyer_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum ||s||_1 / ||s||_2` over the given singular-value vectors (one segmented Triton
    launch for loss and gradient on the triton backend)."""
    svals = list(svals)
    if svals and backend.resolve(svals[0].device) == "triton":
        from . import regularizer_ops
        return regularizer_ops.hoyer_loss(svals)
    return reference.hoyer_loss(svals)
