"""The fused Triton SVD linear layer as PyTorch custom ops, with autograd and autocast.

`svdkern::svd_linear_fwd` and `svdkern::svd_linear_bwd_rows` are `torch.library.custom_op`s
with fake (meta) implementations, so `torch.compile(fullgraph=True)` traces them as single
opaque nodes with no graph break; `register_autograd` gives the forward its backward: the
row-block kernel (dx, ds, db and the scaled intermediates) then two plain GEMMs over the
batch for dU and dV, left as torch ops so the compiler sees them and autograd skips them for
frozen factors. The Triton module is imported only when an op actually runs, so importing
svdkern never requires Triton.
"""
# No `from __future__ import annotations` here: custom_op reads these annotations at
# runtime to build the op schemas, and Optional[...] parses on every supported torch.
import math
from typing import Optional

import torch
from torch import Tensor

from . import differentiable, reference
from .cost import MAX_FUSED_RANK

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fits(rank: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernel takes a layer of this rank and dtype (the rank is held on
    chip, up to `MAX_FUSED_RANK`)."""
    return rank <= MAX_FUSED_RANK and dtype in FUSED_DTYPES


@torch.library.custom_op("svdkern::svd_linear_fwd", mutates_args=())
def svd_linear_fwd(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`x` (B, n) -> `x V diag(s) U^T + b` (B, m), by the fused kernel."""
    from .kernels.svd_linear import svd_linear_fwd as launch
    return launch(x, U, s, V, bias)


@svd_linear_fwd.register_fake
def _(x, U, s, V, bias):
    return x.new_empty((x.shape[0], U.shape[0]))


@torch.library.custom_op("svdkern::svd_linear_bwd_rows", mutates_args=())
def svd_linear_bwd_rows(dy: Tensor, x: Tensor, U: Tensor, s: Tensor, V: Tensor, need_dx: bool,
                        need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, h*s, g*s, ds, db) by the fused row-block backward kernel; `dx`, `db` are empty
    when not asked for."""
    from .kernels.svd_linear import svd_linear_bwd_rows as launch
    return launch(dy, x, U, s, V, need_dx, need_db)


@svd_linear_bwd_rows.register_fake
def _(dy, x, U, s, V, need_dx, need_db):
    B, r = x.shape[0], U.shape[1]
    return (x.new_empty(x.shape if need_dx else (0,)), x.new_empty((B, r)), x.new_empty((B, r)),
            s.new_empty(s.shape), x.new_empty((U.shape[0],) if need_db else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.has_bias = inputs[4] is not None


def _backward(ctx, dy: Tensor):
    """dx, ds, db from the fused kernel; dU = dy^T (h*s), dV = x^T (g*s) as GEMMs over B.
    Under `create_graph=True`, autograd of the reference chain (`svdkern.differentiable`)."""
    x, U, s, V, bias = ctx.saved_tensors
    if differentiable.building_graph():
        return differentiable.reference_grads(reference.svd_linear, (x, U, s, V, bias),
                                              ctx.needs_input_grad, dy)
    need_x, need_U, need_s, need_V, need_b = ctx.needs_input_grad
    dx, hs, gs, ds, db = svd_linear_bwd_rows(dy, x, U, s, V, need_x, need_b and ctx.has_bias)
    dU = dy.transpose(0, 1) @ hs if need_U else None
    dV = x.transpose(0, 1) @ gs if need_V else None
    return (dx if need_x else None), dU, (ds if need_s else None), dV, \
        (db if need_b and ctx.has_bias else None)


svd_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def svd_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Fused `y = x V diag(s) U^T + b` for `x` (..., n) of any strides.

    Under `torch.autocast` every operand is cast to the autocast dtype (like `nn.Linear`):
    the kernel then runs in that dtype with fp32 accumulation. A bias of another dtype is
    cast to `x`'s, as the reference chain does. On CPU (the interpreter, which has no bf16,
    docs/SPEC.md section 4) bf16 operands are read as fp32 and the result rounded back to bf16.
    """
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, U, s, V = (t.to(dt) for t in (x, U, s, V))
    _check_operands(x, U, s, V, bias)
    bias = None if bias is None else bias.to(x.dtype)
    out_dtype = x.dtype
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        x, U, s, V = (t.float() for t in (x, U, s, V))
        bias = None if bias is None else bias.float()
    lead, n = x.shape[:-1], x.shape[-1]
    # -1, not the row count, so jit.trace and export keep the batch size free (0 features
    # cannot infer it)
    y = svd_linear_fwd(x.reshape(-1, n) if n else x.reshape(math.prod(lead), 0), U, s, V, bias)
    return y.reshape(*lead, U.shape[0]).to(out_dtype)


def _check_operands(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Optional[Tensor]) -> None:
    """The kernel reads its sizes from `x` and `U` alone, so operands that disagree would be
    read out of bounds: refuse them, naming the mismatch."""
    dtypes = {t.dtype for t in (x, U, s, V)}
    if len(dtypes) != 1 or x.dtype not in FUSED_DTYPES:
        raise TypeError(f"fused svd_linear needs one dtype among {FUSED_DTYPES} for x, U, s and "
                        f"V, got {sorted(map(str, dtypes))}")
    if x.dim() == 0 or U.dim() != 2:
        raise ValueError(f"fused svd_linear: x must be (..., in_features) and U (out_features, "
                         f"rank), got x {tuple(x.shape)}, U {tuple(U.shape)}")
    (m, r), n = U.shape, x.shape[-1]
    wanted = {"V": (V, (n, r)), "s": (s, (r,)), "bias": (bias, (m,))}
    problems = [f"{name} is {tuple(t.shape)}, expected {shape}"
                for name, (t, shape) in wanted.items() if t is not None and t.shape != shape]
    devices = {str(t.device) for t in (x, U, s, V, bias) if t is not None}
    if len(devices) > 1:
        problems.append(f"operands are on several devices {sorted(devices)}")
    if problems:
        raise ValueError(f"fused svd_linear (x {tuple(x.shape)}, U {tuple(U.shape)}): "
                         + "; ".join(problems))
