"""How an SVD layer call runs, and why: the FLOP cost model and `explain()`
(docs/SPEC.md section 3).

Three paths compute `y = x V diag(s) U^T + b`:
- "chain": `x V`, scale by `s`, `* U^T`: `2 B r (n + m)` FLOPs (for a conv, the two thin
  convs), the PyTorch reference chain;
- "fused": the same chain in one Triton kernel that keeps `x V` on chip
  (`svdkern.kernels.svd_linear`), when Triton can run (`backend.resolve`) and the rank fits;
- "materialized": build `W = (U * s) V^T` (`2 m n r`, independent of B), then one dense GEMM
  (`2 B m n`) or one dense conv (autograd gives the matching backward).

The backward of either form costs about twice its forward (chain: `dx`, `dU`, `dV`;
materialized: `dW`, `dx`, then `dU`, `dV` from `dW`), so the forward counts decide for
training and inference alike. `SVDKERN_BACKEND=reference` always runs the chain (the ground
truth); `SVDKERN_BACKEND=triton` runs the fused kernel whenever the rank fits, whatever the
cost. Convolutions have no Triton kernel: they choose between two thin convs and one dense
conv.

The crossover is the FLOP count alone, with no measured constant folded in. On CPU
(`python -m bench.report --only crossover`, one run) it picked the fastest path for every
linear case measured (cases at the crossover can flip between runs) and for 17 of 24 conv
cases (the others within 1.5x); no GPU crossover has been measured yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import backend
from .reference import ConvSpec, conv_chain_geometry, conv_chain_kernels

# Largest rank the fused Triton kernel keeps on chip (the B x r block of h = x V lives in
# registers, padded to a power of two >= 16). Above it the chain runs as PyTorch GEMMs.
MAX_FUSED_RANK = 128
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fits(rank: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernel takes a layer of this rank and dtype (the rank is held on
    chip, up to `MAX_FUSED_RANK`)."""
    return rank <= MAX_FUSED_RANK and dtype in FUSED_DTYPES


def linear_flops(rows: int, n: int, m: int, r: int) -> tuple[int, int]:
    """(chain, materialized) forward FLOPs of a linear layer over `rows` input rows."""
    return 2 * rows * r * (n + m), 2 * m * n * r + 2 * rows * m * n


def _conv_out(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_flops(n_img: int, in_size: tuple[int, ...], out_ch: int, in_per_group: int,
                kernel: tuple[int, ...], geo: dict) -> tuple[int, tuple[int, ...]]:
    """FLOPs and output spatial size of one conv (any number of spatial dims)."""
    out = tuple(_conv_out(in_size[i], kernel[i], geo["stride"][i], geo["padding"][i],
                          geo["dilation"][i]) for i in range(len(kernel)))
    return 2 * n_img * math.prod(out) * out_ch * in_per_group * math.prod(kernel), out


def conv_flops(x_shape: tuple[int, ...], spec: ConvSpec, r: int) -> tuple[int, int]:
    """(chain, materialized) forward FLOPs of a factorized conv on input `x_shape`
    (N, C, *spatial) or unbatched (C, *spatial)."""
    chain, dense = conv_chain_and_dense_flops(x_shape, spec, r)
    rows, cols = spec.matrix_shape
    return chain, 2 * spec.groups * rows * cols * r + dense


def conv_chain_and_dense_flops(x_shape: tuple[int, ...], spec: ConvSpec,
                               r: int) -> tuple[int, int]:
    """(two thin convs, one dense conv of the same weight) forward FLOPs on `x_shape`."""
    d = spec.dims
    n_img = x_shape[0] if len(x_shape) == d + 2 else 1
    size = tuple(x_shape[-d:])
    g = spec.groups
    c_g = spec.in_channels // g
    geo1, geo2 = conv_chain_geometry(spec)
    k1, k2 = conv_chain_kernels(spec)
    first, mid = _conv_flops(n_img, size, g * r, c_g, k1, geo1)
    second, _ = _conv_flops(n_img, mid, spec.out_channels, r, k2, geo2)
    full = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
    dense, _ = _conv_flops(n_img, size, spec.out_channels, c_g, spec.kernel_size, full)
    return first + second, dense


def factorization_pays(rows: int, cols: int, r: int) -> bool:
    """docs/SPEC.md rule: a rows x cols matrix takes fewer parameters (and a linear layer's
    chain fewer FLOPs per row) as rank-r factors exactly while `r (rows + cols) < rows cols`."""
    return r * (rows + cols) < rows * cols


# What settled a path choice (`cheaper`), and the words `explain()` gives for it.
BY_SIZES, BY_LARGE_BATCH, BY_DEFAULT = "sizes", "large-batch limit", "default"
_FEWER = {BY_SIZES: "costs fewer FLOPs",
          BY_LARGE_BATCH: "costs fewer FLOPs at large batch (symbolic sizes)",
          BY_DEFAULT: "the default: the FLOP counts are symbolic even per batch row, so "
                      "nothing settles the comparison and the factorized form (no dense "
                      "weight buffer) runs"}


def cheaper(chain: int, materialized: int,
            per_row: Callable[[], tuple[int, int]]) -> tuple[str, str]:
    """(path, what settled it): "materialized" when it costs strictly fewer FLOPs, else
    "chain", which needs no m x n buffer. With symbolic sizes (torch.export, dynamic
    torch.compile) comparing would guard on the batch (export refuses it, compile
    recompiles at the crossover): unless the sizes' ranges settle it (`BY_SIZES`), the
    large-batch limit decides, the (chain, materialized) FLOPs each batch row adds
    (`per_row()`, `BY_LARGE_BATCH`), and the chain where even that is symbolic
    (`BY_DEFAULT`)."""
    if not torch.compiler.is_compiling() and isinstance(chain, int) and isinstance(materialized, int):
        return ("materialized" if materialized < chain else "chain"), BY_SIZES
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # loads sympy
    for path, settled in (("materialized", materialized < chain), ("chain", chain <= materialized)):
        if statically_known_true(settled):
            return path, BY_SIZES
    chain_row, materialized_row = per_row()
    if statically_known_true(materialized_row < chain_row):
        return "materialized", BY_LARGE_BATCH
    if statically_known_true(chain_row <= materialized_row):
        return "chain", BY_LARGE_BATCH
    return "chain", BY_DEFAULT


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


def linear_plan(x: Tensor, U: Tensor, V: Tensor) -> Plan:
    """The `Plan` of `svd_linear` for these shapes, dtype and device."""
    n, r = V.shape
    m = U.shape[0]
    chain, mat = linear_flops(math.prod(x.shape[:-1]), n, m, r)
    requested = backend.requested()
    if requested == "reference":
        return Plan("chain", "SVDKERN_BACKEND=reference", chain, mat)
    engine = backend.resolve(x.device)
    fused_ok = fits(r, x.dtype)
    if requested == "triton" and engine == "triton" and fused_ok:
        return Plan("fused", "SVDKERN_BACKEND=triton", chain, mat)
    path, basis = cheaper(chain, mat, lambda: _per_row(
        lambda rows: linear_flops(rows, n, m, r)))
    fewer = _FEWER[basis]
    if path == "materialized":
        return Plan("materialized", f"dense GEMM on W = (U*s) V^T {fewer}", chain, mat)
    if engine == "triton" and fused_ok:
        return Plan("fused", f"factorized chain {fewer}; Triton kernel", chain, mat)
    why = ("a torch.func transform is active (the fused op has no functorch rules)"
           if backend.func_transform_active() else
           "Triton cannot run on this device" if engine != "triton" else
           f"dtype {x.dtype} is beyond the fused kernel" if x.dtype not in FUSED_DTYPES else
           _beyond_on_chip_rank(n, m, r))
    return Plan("chain", f"factorized chain {fewer}; {why}", chain, mat)


def rank_tiling_bytes(n: int, m: int, r: int) -> tuple[int, int]:
    """Per input row, in elements: (what a kernel holding `MAX_FUSED_RANK` ranks on chip at
    a time, with no more FLOPs, would move beyond the chain: per further rank tile, `x` read
    again and the partial `y` read and written again; what the chain moves that the fused
    kernel does not: `h = x V` written and read once). Both do the same FLOPs. As `r <=
    min(n, m)`, the first is at least `n + 2 m >= 3 r`, more than the chain's `2 r`, whenever
    the rank needs tiles (docs/SPEC.md section 3)."""
    tiles = -(-r // MAX_FUSED_RANK)
    return (tiles - 1) * (n + 2 * m), 2 * r


def _beyond_on_chip_rank(n: int, m: int, r: int) -> str:
    """Why a rank past the on-chip limit runs the chain, in bytes."""
    tiled, chain = rank_tiling_bytes(n, m, r)
    return (f"rank {r} > {MAX_FUSED_RANK} (the ranks the fused kernel holds on chip): tiling "
            f"the rank would move x and the partial y {-(-r // MAX_FUSED_RANK)} times, {tiled} "
            f"more elements per row, against the {chain} per row the chain spends on "
            "h = x V, so the chain's two GEMMs move fewer bytes")


def _per_row(flops_at) -> tuple[int, int]:
    """(chain, materialized) FLOPs one more batch row (image, for convs) adds: the slope of
    `flops_at(rows)`, whose comparison is the large-batch limit."""
    (chain2, mat2), (chain1, mat1) = flops_at(2), flops_at(1)
    return chain2 - chain1, mat2 - mat1


def conv_plan(x: Tensor, U: Tensor, spec: ConvSpec) -> Plan:
    """The `Plan` of `svd_conv` for these shapes (no Triton path: chain or materialized)."""
    chain, mat = conv_flops(tuple(x.shape), spec, U.shape[-1])
    if backend.requested() == "reference":
        return Plan("chain", "SVDKERN_BACKEND=reference", chain, mat)
    path, basis = cheaper(chain, mat, lambda: _per_row(
        lambda images: conv_flops((images, *x.shape[-1 - spec.dims:]), spec, U.shape[-1])))
    how = "one dense conv on the built weight" if path == "materialized" else "two thin convs"
    return Plan(path, f"{how}: {_FEWER[basis]}", chain, mat)


def explain(x: Tensor, U: Tensor, s: Tensor, V: Tensor, spec: ConvSpec | None = None) -> Plan:
    """Which path `svd_linear` (or `svd_conv` when `spec` is given) runs for these
    arguments, and why."""
    del s  # the plan depends on shapes, dtype and device only
    return linear_plan(x, U, V) if spec is None else conv_plan(x, U, spec)
