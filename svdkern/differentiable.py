"""Backward formulas that can themselves be differentiated, for double backward.

The Triton kernels compute gradients as opaque custom ops with no derivative of their own,
so a backward run with `create_graph=True` (gradient penalties, Hessian-vector products)
would differentiate nothing (a saved gradient is a constant) or fail on the op. There, and
only there (grad mode is on inside a backward exactly when it builds a graph), the op's
backward takes the gradient of its PyTorch reference instead.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def building_graph() -> bool:
    """Whether the running backward records a graph (`create_graph=True`)."""
    return torch.is_grad_enabled()


def reference_grads(reference: Callable[..., Tensor], inputs: Sequence[Tensor | None],
                    needs: Sequence[bool], grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """Differentiable gradients of `reference(*inputs)` (the op's saved inputs, still in the
    autograd graph) for the inputs in `needs`, None for the others."""
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    out = reference(*inputs)
    grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype), create_graph=True,
                                     allow_unused=True, materialize_grads=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs))
