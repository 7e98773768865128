"""Segmented L1 / Hoyer / Hoyer-Square penalty over every singular-value vector of a model
in one launch.

All vectors are packed in one flat buffer; `offsets` (int64, segments + 1 entries) marks
where each one starts and ends. One program per segment (a persistent grid strides over
them) makes two passes over its segment in chunks of `BLOCK`, so any length works:
pass 1 accumulates `||s||_1` and `||s||_2^2` (fp32, or fp64 for fp64 input) and stores the
segment's loss; pass 2 stores the gradient of that loss (docs/SPEC.md section 1):
L1 `sign(s)`, Hoyer `H = ||s||_1 / ||s||_2`: `sign(s) / ||s||_2 - ||s||_1 s / ||s||_2^3`,
Hoyer-Square `H^2`: `2 H` times Hoyer's. Both Hoyers first find `max|s|` (one more pass)
and work on `s / max|s|`. The per-segment losses
are summed once afterwards (deterministic, no atomics); the backward only scales the stored
gradient by the incoming one.

PyTorch sees the custom op `svdkern::sparsity_loss` (fake impl, autograd: the stored
gradient scaled); `l1_loss`, `hoyer_loss` and `hoyer_square_loss` below are the entry points
`svdkern.ops` calls.
"""
# No `from __future__ import annotations` here: custom_op reads the annotations at runtime.
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from svdkern import differentiable, reference
from svdkern.backend import interpreter_enabled
from svdkern.launch import COMPILE_OPTIONS, acc_dtype, common_operands, reused_across_steps

_BLOCK = 256
# The penalty a launch computes (the kernel's KIND), by the reference function it matches.
KINDS = {"l1_loss": 0, "hoyer_loss": 1, "hoyer_square_loss": 2}


@triton.jit
def _ieee_sqrt(x):
    """Correctly rounded sqrt: on a GPU fp32 `tl.sqrt` is approximate (fp64 is exact)."""
    if x.dtype == tl.float32:
        y = tl.sqrt_rn(x)
    else:
        y = tl.sqrt(x)
    return y


@triton.jit
def _ieee_div(x, y):
    """Correctly rounded division (fp32 `/` on a GPU is not; fp64 is)."""
    if x.dtype == tl.float32:
        q = tl.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit
def _sparsity_kernel(flat, offsets, losses, grad, num_segments, KIND: tl.constexpr,
                     BLOCK: tl.constexpr):
    HOYER: tl.constexpr = KIND > 0
    pid = tl.program_id(0)
    acc_dtype = grad.dtype.element_ty
    lanes = tl.arange(0, BLOCK)
    for seg in range(pid, num_segments, tl.num_programs(0)):
        lo = tl.load(offsets + seg)
        hi = tl.load(offsets + seg + 1)
        # Hoyer is scale-invariant: it is taken of s / max|s| (no underflow of s^2 for tiny
        # s, no overflow for huge s; a division, not a product with 1/max|s|, which
        # overflows for a subnormal max); an all-zero s has loss and gradient 0 (as the
        # reference: no direction to sparsify)
        scale = tl.full((), 1.0, acc_dtype)
        if HOYER:
            peak = tl.zeros((BLOCK,), dtype=acc_dtype)
            for start in range(lo, hi, BLOCK):
                idx = start + lanes
                x = tl.load(flat + idx, mask=idx < hi, other=0.0).to(acc_dtype)
                peak = tl.maximum(peak, tl.abs(x))
            top = tl.max(peak, axis=0)
            scale = tl.where(top > 0, top, 1.0).to(acc_dtype)
        l1 = tl.zeros((BLOCK,), dtype=acc_dtype)
        l2 = tl.zeros((BLOCK,), dtype=acc_dtype)
        for start in range(lo, hi, BLOCK):
            idx = start + lanes
            x = tl.load(flat + idx, mask=idx < hi, other=0.0).to(acc_dtype)
            if HOYER:
                x = _ieee_div(x, scale)
            l1 += tl.abs(x)
            l2 += x * x
        norm1 = tl.sum(l1, axis=0)
        sumsq = tl.sum(l2, axis=0)
        norm2 = _ieee_sqrt(sumsq)
        norm2 = tl.where(norm2 > 0, norm2, 1.0).to(acc_dtype)  # >= 1 unless s is all zero
        ratio = _ieee_div(norm1, norm2)  # Hoyer's H (0 for an all-zero s)
        if KIND == 2:
            tl.store(losses + seg, ratio * ratio)
        elif HOYER:
            tl.store(losses + seg, ratio)
        else:
            tl.store(losses + seg, norm1)
        for start in range(lo, hi, BLOCK):
            idx = start + lanes
            x = tl.load(flat + idx, mask=idx < hi, other=0.0).to(acc_dtype)
            sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(acc_dtype)
            if HOYER:
                # of t = s / max|s|: (sign - (||t||_1/||t||_2) (t/||t||_2)) / ||t||_2 / max|s|;
                # for a length-1 s both ratios are exactly 1, so its gradient is 0
                g = sign - ratio * _ieee_div(_ieee_div(x, scale), norm2)
                g = _ieee_div(_ieee_div(g, norm2), scale)
                if KIND == 2:  # d(H^2) = 2 H dH
                    g = 2 * ratio * g
            else:
                g = sign
            tl.store(grad + idx, g, mask=idx < hi)


def loss_and_grad(flat: torch.Tensor, offsets: torch.Tensor, num_segments: int, kind: int,
                  acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, gradient of it w.r.t. `flat`), both in `acc_dtype`."""
    losses = torch.empty(num_segments, dtype=acc_dtype, device=flat.device)
    grad = torch.empty(flat.shape, dtype=acc_dtype, device=flat.device)
    cap = (4 if interpreter_enabled() or flat.device.type != "cuda"
           else 8 * torch.cuda.get_device_properties(flat.device).multi_processor_count)
    grid = (min(cap, num_segments),)
    _sparsity_kernel[grid](flat, offsets, losses, grad, num_segments, KIND=kind, BLOCK=_BLOCK,
                           **COMPILE_OPTIONS)
    return losses.sum(), grad


# ------------------------------------------------------------------ PyTorch custom op
@reused_across_steps
def segment_offsets(lengths: tuple[int, ...], device: torch.device) -> Tensor:
    """int64 segment boundaries (len + 1 entries) on `device`; cached per lengths."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int64, device=device)


@torch.library.custom_op("svdkern::sparsity_loss", mutates_args=())
def _sparsity(flat: Tensor, offsets: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    """(summed loss of `kind` (`KINDS`), its gradient w.r.t. `flat`) in one launch."""
    return loss_and_grad(flat, offsets, offsets.numel() - 1, kind, acc_dtype(flat.dtype))


@_sparsity.register_fake
def _(flat, offsets, kind):
    acc = acc_dtype(flat.dtype)
    return flat.new_empty((), dtype=acc), flat.new_empty(flat.shape, dtype=acc)


def _sparsity_setup(ctx, inputs, output) -> None:
    flat, offsets, ctx.kind = inputs
    ctx.save_for_backward(flat, offsets, output[1])


def _sparsity_backward(ctx, grad_loss: Tensor, _grad_grad: Tensor):
    flat, offsets, grad = ctx.saved_tensors
    if differentiable.building_graph():
        loss = getattr(reference, next(n for n, k in KINDS.items() if k == ctx.kind))
        bounds = offsets.tolist()
        return differentiable.reference_grads(
            lambda f: loss([f[a:b] for a, b in zip(bounds, bounds[1:])]), (flat,), (True,),
            grad_loss) + (None, None)
    return (grad * grad_loss).to(flat.dtype), None, None


_sparsity.register_autograd(_sparsity_backward, setup_context=_sparsity_setup)


def _sparsity_loss(svals: Sequence[Tensor], name: str) -> Tensor:
    device, dtype = common_operands(name, svals)
    for i, s in enumerate(svals):
        if s.numel() == 0:
            raise ValueError(f"{name}: singular-value vector {i} is empty")
    flat = torch.cat([s.to(dtype).reshape(-1) for s in svals])
    offsets = segment_offsets(tuple(s.numel() for s in svals), device)
    return _sparsity(flat, offsets, KINDS[name])[0]


def l1_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum |s_j|` over all singular-value vectors: one segmented Triton launch."""
    return _sparsity_loss(svals, "l1_loss")


def hoyer_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum ||s||_1 / ||s||_2` over all singular-value vectors: one segmented Triton launch."""
    return _sparsity_loss(svals, "hoyer_loss")


def hoyer_square_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum (||s||_1 / ||s||_2)^2` over all singular-value vectors: one segmented Triton
    launch."""
    return _sparsity_loss(svals, "hoyer_square_loss")
