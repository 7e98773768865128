"""FLOP and byte counts of the benchmarked work (docs/SPEC.md section 3), for TFLOP/s, GB/s and the
roofline floor. Counts are forward + backward unless a name says otherwise.

Linear layer `x (B, n) -> y (B, m)` at rank r:
- factorized chain: forward `2 B r (n + m)`; backward (dx, dU, dV: two GEMMs per factor
  side) twice that, so `6 B r (n + m)`;
- materialized: build `W` (`2 m n r`), dense forward and backward (`6 B m n`), and the
  factor gradients from `dW` (`dW V` and `dW^T U`: `4 m n r`), so `6 B m n + 6 m n r`;
- dense layer: `6 B m n`.
Minimum bytes: forward reads x, writes y; backward reads x and dy, writes dx; parameters are
read twice and their gradients written once.
"""
from __future__ import annotations

from svdkern.dispatch import linear_flops

FORWARD_AND_BACKWARD = 3  # the backward of each path costs twice its forward


def linear_chain_flops(B: int, n: int, m: int, r: int) -> int:
    return FORWARD_AND_BACKWARD * linear_flops(B, n, m, r)[0]


def linear_materialized_flops(B: int, n: int, m: int, r: int) -> int:
    return FORWARD_AND_BACKWARD * linear_flops(B, n, m, r)[1]


def linear_dense_flops(B: int, n: int, m: int) -> int:
    return 6 * B * m * n


def linear_bytes(B: int, n: int, m: int, params: int, itemsize: int) -> int:
    return itemsize * (3 * B * n + 2 * B * m + 3 * params)


def svd_linear_work(B: int, n: int, m: int, r: int) -> int:
    """FLOPs of the cheaper of the two paths a dispatch may take."""
    return min(linear_chain_flops(B, n, m, r), linear_materialized_flops(B, n, m, r))


def orthogonality_flops(rows: int, r: int) -> int:
    """Gram `M^T M` (symmetric: its upper half, rows r^2, as the kernel computes it) and
    gradient `4 M (G - I)` (2 rows r^2)."""
    return 3 * rows * r * r


def orthogonality_bytes(rows: int, r: int, itemsize: int) -> int:
    """M read for the Gram and for the gradient, gradient written."""
    return 3 * rows * r * itemsize


def floor_ms(flops: int, nbytes: int, ceilings: dict, rate: str = "matmul_tflops") -> float:
    """Roofline floor: the larger of compute time at the measured matrix rate `rate` (the
    cases' dtype, or "fp32_ieee_tflops" for fp32 work without TF32) and memory time at the
    measured copy bandwidth."""
    return max(flops / (ceilings[rate] * 1e9), nbytes / (ceilings["copy_gbps"] * 1e6))
