"""The fused Triton SVD linear layer as PyTorch custom ops, with autograd and autocast.

`svdkern::svd_linear_fwd` and `svdkern::svd_linear_bwd` are `torch.library.custom_op`s
with fake (meta) implementations, so `torch.compile(fullgraph=True)` traces them as single
opaque nodes with no graph break, and `register_autograd` ties the backward kernel to the
forward. The Triton module is imported only when an op actually runs, so importing svdkern
never requires Triton.
"""
from __future__ import annotations

import torch
from torch import Tensor

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("svdkern::svd_linear_fwd", mutates_args=())
def svd_linear_fwd(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
    """`x` (B, n) -> `x V diag(s) U^T + b` (B, m), by the fused kernel."""
    from .kernels.svd_linear import svd_linear_fwd as launch
    return launch(x, U, s, V, bias)


@svd_linear_fwd.register_fake
def _(x, U, s, V, bias):
    return x.new_empty((x.shape[0], U.shape[0]))


@torch.library.custom_op("svdkern::svd_linear_bwd", mutates_args=())
def svd_linear_bwd(dy: Tensor, x: Tensor, U: Tensor, s: Tensor, V: Tensor,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dU, ds, dV, db) of the fused forward; `db` is empty when not `need_db`."""
    from .kernels.svd_linear import svd_linear_bwd as launch
    return launch(dy, x, U, s, V, need_db)


@svd_linear_bwd.register_fake
def _(dy, x, U, s, V, need_db):
    db = x.new_empty((U.shape[0],) if need_db else (0,))
    return x.new_empty(x.shape), x.new_empty(U.shape), s.new_empty(s.shape), x.new_empty(V.shape), db


def _setup_context(ctx, inputs, output) -> None:
    x, U, s, V, bias = inputs
    ctx.save_for_backward(x, U, s, V)
    ctx.has_bias = bias is not None


def _backward(ctx, dy: Tensor):
    x, U, s, V = ctx.saved_tensors
    dx, dU, ds, dV, db = svd_linear_bwd(dy, x, U, s, V, ctx.has_bias)
    return dx, dU, ds, dV, db if ctx.has_bias else None


svd_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def svd_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """Fused `y = x V diag(s) U^T + b` for `x` (..., n) of any strides.

    Under `torch.autocast` every operand is cast to the autocast dtype (like `nn.Linear`):
    the kernel then runs in that dtype with fp32 accumulation.
    """
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, U, s, V = (t.to(dt) for t in (x, U, s, V))
        bias = None if bias is None else bias.to(dt)
    dtypes = {t.dtype for t in (x, U, s, V, bias) if t is not None}
    if len(dtypes) != 1 or x.dtype not in FUSED_DTYPES:
        raise TypeError(f"fused svd_linear needs one dtype among {FUSED_DTYPES} for x, U, s, V "
                        f"and bias, got {sorted(map(str, dtypes))}")
    lead = x.shape[:-1]
    y = svd_linear_fwd(x.reshape(-1, x.shape[-1]), U, s, V, bias)
    return y.reshape(*lead, U.shape[0])
