"""Triton path of the regularizers: pack a model's factors, launch the grouped kernels.

Packing choice: the factors are packed into one flat buffer at each call (`torch.cat` of
the flattened matrices; autograd of the cat returns each parameter its gradient), rather
than keeping the parameters as views into one persistent buffer. Views would save one copy
of the factors per step (bytes, small next to the Gram FLOPs), but pruning reassigns
`param.data` with new shapes, checkpoints load into `param.data`, and optimizers hold the
Parameter objects: every one of these would silently detach a view from a shared buffer.
Column-major factors (e.g. a transposed view) keep their layout in the buffer (no
transposing copy before the cat) and are addressed through their strides.

The int64 table the kernels read (offsets, shapes, strides) is cached per device, keyed by
the shapes and layouts, so a step reuses it and a change of ranks (pruning) builds a new one.
A cached table must be an ordinary tensor: it is built outside inference mode (an inference
tensor cannot be saved for a later backward), and the cache is bypassed while tracing or
under a fake-tensor mode (non-strict `torch.export`, `make_fx`, memory estimates), which
would otherwise cache a FakeTensor for eager calls, or hand them a real one.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from . import differentiable, reference

T = TypeVar("T")
MatrixKey = tuple[tuple[int, int, bool], ...]  # (rows, r, column-major) per matrix


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in fp32, or fp64 for fp64 factors (matching the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(name: str, tensors: Sequence[Tensor]) -> tuple[torch.device, torch.dtype]:
    """Device and the dtype the kernels read (the promoted input dtype; bf16 is read as
    fp32 on CPU, where the interpreter has no bf16), with a clear error for unusable ones."""
    if len(tensors) == 0:
        raise ValueError(f"{name}: got no tensors")
    device = tensors[0].device
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{name}: tensor {i} is on {t.device}, tensor 0 on {device}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: tensor {i} has dtype {t.dtype}, expected floating point")
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.bfloat16 and device.type == "cpu":
        dtype = torch.float32
    return device, dtype


def _reused_across_steps(build: Callable[..., T]) -> Callable[..., T]:
    """`build(key, device)` memoized for eager calls (see the module docstring for why
    tracing bypasses the cache and why it is filled outside inference mode)."""
    cached = functools.lru_cache(maxsize=32)(build)

    @functools.wraps(build)
    def get(*args):
        if torch.compiler.is_compiling() or type(torch.empty(0)) is not torch.Tensor:
            return build(*args)  # traced, or a mode that makes other tensors (fake)
        with torch.inference_mode(False):
            return cached(*args)
    get.cache_clear, get.cache_info = cached.cache_clear, cached.cache_info
    return get


# ----------------------------------------------------------------------- orthogonality
@_reused_across_steps
def matrix_table(key: MatrixKey, device: torch.device) -> tuple[Tensor, int]:
    """(int64 table on `device`, Gram buffer size) for matrices of the given layouts; rows
    follow `kernels.orthogonality.TABLE_COLS`. Cached: rebuilt only when shapes change."""
    rows_out, offset, gram_offset = [], 0, 0
    for rows, r, col_major in key:
        strides = (1, rows) if col_major else (r, 1)
        rows_out.append((offset, rows, r, *strides, gram_offset))
        offset += rows * r
        gram_offset += r * r
    return torch.tensor(rows_out, dtype=torch.int64, device=device), gram_offset


def pack_matrices(mats: Sequence[Tensor]) -> tuple[Tensor, MatrixKey]:
    """One flat buffer of all matrices (promoted to a common dtype) and their layout key."""
    _, dtype = _common("orthogonality_loss", mats)
    pieces, key = [], []
    for i, M in enumerate(mats):
        if M.dim() != 2 or M.shape[-1] == 0:
            raise ValueError(f"orthogonality_loss: matrix {i} has shape {tuple(M.shape)}, "
                             "expected 2-D (rows, r) with r >= 1")
        M = M.to(dtype)
        col_major = not M.is_contiguous() and M.t().is_contiguous()
        pieces.append((M.t() if col_major else M).reshape(-1))
        key.append((M.shape[0], M.shape[1], col_major))
    return torch.cat(pieces), tuple(key)


@torch.library.custom_op("svdkern::orthogonality_loss", mutates_args=())
def _orthogonality(flat: Tensor, table: Tensor, shapes: list[int], gram_numel: int,
                   aligned: bool) -> tuple[Tensor, Tensor]:
    """(sum ||M^T M - I||_F^2 / r^2, flat G - I of every matrix) in one launch.
    `shapes` is (rows, r) per matrix, flattened: the host sizes the grid from it;
    `aligned`: see `aligned_layout`."""
    from .kernels import orthogonality
    return orthogonality.gram_loss(flat, table, _pairs(shapes), gram_numel,
                                   _acc_dtype(flat.dtype), aligned)


@_orthogonality.register_fake
def _(flat, table, shapes, gram_numel, aligned):
    acc = _acc_dtype(flat.dtype)
    return flat.new_empty((), dtype=acc), flat.new_empty(gram_numel, dtype=acc)


@torch.library.custom_op("svdkern::orthogonality_grad", mutates_args=())
def _orthogonality_grad(flat: Tensor, table: Tensor, shapes: list[int], gram: Tensor,
                        grad_out: Tensor, aligned: bool) -> Tensor:
    """`4 M (G - I) / r^2 * grad_out` for every matrix, laid out like `flat`, in one launch."""
    from .kernels import orthogonality
    return orthogonality.grad(flat, table, _pairs(shapes), gram, grad_out, aligned)


@_orthogonality_grad.register_fake
def _(flat, table, shapes, gram, grad_out, aligned):
    return torch.empty_like(flat)


def _orthogonality_setup(ctx, inputs, output) -> None:
    flat, table, shapes, _, aligned = inputs
    ctx.save_for_backward(flat, table, output[1])
    ctx.shapes, ctx.aligned = shapes, aligned


def _orthogonality_backward(ctx, grad_loss: Tensor, _grad_gram: Tensor):
    flat, table, gram = ctx.saved_tensors
    if differentiable.building_graph():
        return differentiable.reference_grads(
            lambda f: reference.orthogonality_loss(unpack_matrices(f, table)), (flat,),
            (True,), grad_loss) + (None,) * 4
    grad = _orthogonality_grad(flat, table, ctx.shapes, gram, grad_loss, ctx.aligned)
    return grad, None, None, None, None


def unpack_matrices(flat: Tensor, table: Tensor) -> list[Tensor]:
    """The matrices packed in `flat`, as strided views, from their table rows."""
    return [flat.as_strided((rows, r), (row_stride, col_stride), flat.storage_offset() + offset)
            for offset, rows, r, row_stride, col_stride, _ in table.tolist()]


_orthogonality.register_autograd(_orthogonality_backward, setup_context=_orthogonality_setup)


def _pairs(shapes: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple(zip(shapes[0::2], shapes[1::2]))


def aligned_layout(key: MatrixKey) -> bool:
    """Every matrix row-major with a rank that is a multiple of 8, so every row and every
    matrix starts 16 bytes apart in the packed buffer: the kernels can then load 16 bytes
    at a time (the usual full-rank case; pruned ranks seldom are)."""
    return all(not col_major and r % 8 == 0 for _, r, col_major in key)


def orthogonality_loss(mats: Sequence[Tensor]) -> Tensor:
    """`sum ||M^T M - I||_F^2 / r^2` over 2-D matrices of any shapes: two Triton launches
    (loss forward, gradient backward) for the whole list."""
    flat, key = pack_matrices(mats)
    table, gram_numel = matrix_table(key, flat.device)
    shapes = [n for rows, r, _ in key for n in (rows, r)]
    return _orthogonality(flat, table, shapes, gram_numel, aligned_layout(key))[0]


# ---------------------------------------------------------------------------- sparsity
@_reused_across_steps
def segment_offsets(lengths: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 segment boundaries (len + 1 entries) on `device`; cached per lengths."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int64, device=device)


@torch.library.custom_op("svdkern::sparsity_loss", mutates_args=())
def _sparsity(flat: Tensor, offsets: Tensor, hoyer: bool) -> tuple[Tensor, Tensor]:
    """(summed L1 or Hoyer loss, its gradient w.r.t. `flat`) in one launch."""
    from .kernels import sparsity
    return sparsity.loss_and_grad(flat, offsets, offsets.numel() - 1, hoyer,
                                  _acc_dtype(flat.dtype))


@_sparsity.register_fake
def _(flat, offsets, hoyer):
    acc = _acc_dtype(flat.dtype)
    return flat.new_empty((), dtype=acc), flat.new_empty(flat.shape, dtype=acc)


def _sparsity_setup(ctx, inputs, output) -> None:
    flat, offsets, ctx.hoyer = inputs
    ctx.save_for_backward(flat, offsets, output[1])


def _sparsity_backward(ctx, grad_loss: Tensor, _grad_grad: Tensor):
    flat, offsets, grad = ctx.saved_tensors
    if differentiable.building_graph():
        loss = reference.hoyer_loss if ctx.hoyer else reference.l1_loss
        bounds = offsets.tolist()
        return differentiable.reference_grads(
            lambda f: loss([f[a:b] for a, b in zip(bounds, bounds[1:])]), (flat,), (True,),
            grad_loss) + (None, None)
    return (grad * grad_loss).to(flat.dtype), None, None


_sparsity.register_autograd(_sparsity_backward, setup_context=_sparsity_setup)


def _sparsity_loss(svals: Sequence[Tensor], hoyer: bool) -> Tensor:
    name = "hoyer_loss" if hoyer else "l1_loss"
    device, dtype = _common(name, svals)
    for i, s in enumerate(svals):
        if s.numel() == 0:
            raise ValueError(f"{name}: singular-value vector {i} is empty")
    flat = torch.cat([s.to(dtype).reshape(-1) for s in svals])
    offsets = segment_offsets(tuple(s.numel() for s in svals), device)
    return _sparsity(flat, offsets, hoyer)[0]


def l1_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum |s_j|` over all singular-value vectors: one segmented Triton launch."""
    return _sparsity_loss(svals, hoyer=False)


def hoyer_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum ||s||_1 / ||s||_2` over all singular-value vectors: one segmented Triton launch."""
    return _sparsity_loss(svals, hoyer=True)
