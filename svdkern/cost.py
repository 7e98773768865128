"""FLOP cost model that picks how an SVD layer runs (docs/SPEC.md section 3).

Two ways compute `y = x V diag(s) U^T + b`:
- chain: `x V`, scale by `s`, `* U^T`: `2 B r (n + m)` FLOPs (for a conv, the two thin convs);
- materialized: build `W = (U * s) V^T` (`2 m n r`, independent of B), then one dense GEMM
  (`2 B m n`) or one dense conv.

The backward of either path costs about twice its forward (chain: `dx`, `dU`, `dV`;
materialized: `dW`, `dx`, then `dU`, `dV` from `dW`), so the forward counts decide for
training and inference alike.

The crossover is the FLOP count alone, with no measured constant folded in. On CPU
(`python -m bench.report --only crossover`, one run) it picked the fastest path for every
linear case measured (cases at the crossover can flip between runs) and for 17 of 24 conv
cases (the others within 1.5x); no GPU crossover has been measured yet.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import ConvSpec, conv_chain_geometry

# Largest rank the fused Triton kernel keeps on chip (the B x r block of h = x V lives in
# registers, padded to a power of two >= 16). Above it the chain runs as PyTorch GEMMs.
MAX_FUSED_RANK = 128


def linear_flops(rows: int, n: int, m: int, r: int) -> tuple[int, int]:
    """(chain, materialized) forward FLOPs of a linear layer over `rows` input rows."""
    return 2 * rows * r * (n + m), 2 * m * n * r + 2 * rows * m * n


def _conv_out(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_flops(n_img: int, in_hw: tuple[int, int], out_ch: int, in_per_group: int,
                kernel: tuple[int, int], geo: dict) -> tuple[int, tuple[int, int]]:
    """FLOPs and output (h, w) of one conv."""
    out_hw = tuple(_conv_out(in_hw[i], kernel[i], geo["stride"][i], geo["padding"][i],
                             geo["dilation"][i]) for i in range(2))
    return 2 * n_img * out_hw[0] * out_hw[1] * out_ch * in_per_group * kernel[0] * kernel[1], out_hw


def conv_flops(x_shape: tuple[int, ...], spec: ConvSpec, r: int) -> tuple[int, int]:
    """(chain, materialized) forward FLOPs of a factorized conv on input `x_shape`
    (N, C, H, W) or unbatched (C, H, W)."""
    chain, dense = conv_chain_and_dense_flops(x_shape, spec, r)
    rows, cols = spec.matrix_shape
    return chain, 2 * spec.groups * rows * cols * r + dense


def conv_chain_and_dense_flops(x_shape: tuple[int, ...], spec: ConvSpec,
                               r: int) -> tuple[int, int]:
    """(two thin convs, one dense conv of the same weight) forward FLOPs on `x_shape`."""
    n_img = x_shape[0] if len(x_shape) == 4 else 1
    h, w = x_shape[-2:]
    g = spec.groups
    c_g = spec.in_channels // g
    kh, kw = spec.kernel_size
    geo1, geo2 = conv_chain_geometry(spec)
    k1, k2 = ((kh, kw), (1, 1)) if spec.scheme == "channel" else ((kh, 1), (1, kw))
    first, mid_hw = _conv_flops(n_img, (h, w), g * r, c_g, k1, geo1)
    second, _ = _conv_flops(n_img, mid_hw, spec.out_channels, r, k2, geo2)
    full = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
    dense, _ = _conv_flops(n_img, (h, w), spec.out_channels, c_g, (kh, kw), full)
    return first + second, dense


def factorization_pays(rows: int, cols: int, r: int) -> bool:
    """docs/SPEC.md rule: a rows x cols matrix takes fewer parameters (and a linear layer's
    chain fewer FLOPs per row) as rank-r factors exactly while `r (rows + cols) < rows cols`."""
    return r * (rows + cols) < rows * cols


def cheaper(chain: int, materialized: int,
            per_row: Callable[[], tuple[int, int]]) -> tuple[str, bool]:
    """("materialized" when it costs strictly fewer FLOPs, else "chain", which needs no
    m x n buffer; whether the sizes settled it). With symbolic sizes (torch.export, dynamic
    torch.compile) comparing would guard on the batch (export refuses it, compile
    recompiles at the crossover): unless the sizes' ranges settle it, the large-batch limit
    decides, the (chain, materialized) FLOPs each batch row adds (`per_row()`), and the chain
    where even that is symbolic."""
    if not torch.compiler.is_compiling() and isinstance(chain, int) and isinstance(materialized, int):
        return ("materialized" if materialized < chain else "chain"), True
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # loads sympy
    for path, settled in (("materialized", materialized < chain), ("chain", chain <= materialized)):
        if statically_known_true(settled):
            return path, True
    chain_row, materialized_row = per_row()
    return ("materialized" if statically_known_true(materialized_row < chain_row)
            else "chain"), False
