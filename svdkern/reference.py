"""Pure-PyTorch reference maths of SVD training (docs/SPEC.md sections 1 and 3).

This module is the ground truth: every Triton kernel is tested against it, and it is the
path that runs anywhere (CPU, no Triton). Each formula lives here once; layers, export,
pruning and the kernels' tests all call these functions rather than re-deriving them.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SCHEMES = ("channel", "spatial")


# ----------------------------------------------------------------------------- linear
def svd_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """`y = x V diag(s) U^T + b` as the factorized chain: `x V`, the scale, then one
    `F.linear` whose GEMM adds the bias in its epilogue (and whose backward reduces `db` in
    one pass), as `nn.Linear` does; under autocast the output dtype is `F.linear`'s."""
    h = (x @ V) * s
    return F.linear(h, U, None if bias is None else bias.to(h.dtype))


def materialize(U: Tensor, s: Tensor, V: Tensor) -> Tensor:
    """The dense matrix `U diag(s) V^T` (batched over leading dims, e.g. conv groups)."""
    return (U * s.unsqueeze(-2)) @ V.transpose(-1, -2)


# ----------------------------------------------------------------------------- conv
class ConvSpec(NamedTuple):
    """Geometry of a conv (1-, 2- or 3-D: `kernel_size`, `stride`, `padding`, `dilation`
    are tuples of one entry per spatial dim) held in SVD form; `padding` is explicit.

    "channel" (every dim): one group's matrix is n/g x (c/g * prod(kernel)). "spatial"
    (2-D only, where the kernel splits into a kh x 1 and a 1 x kw conv): (n/g * kw) x
    (c/g * kh)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    scheme: str

    @property
    def dims(self) -> int:
        """Spatial dims of the conv (1, 2 or 3)."""
        return len(self.kernel_size)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of one group's weight matrix under this scheme."""
        n_g = self.out_channels // self.groups
        c_g = self.in_channels // self.groups
        if self.scheme == "channel":
            return n_g, c_g * math.prod(self.kernel_size)
        kh, kw = self.kernel_size
        return n_g * kw, c_g * kh


def conv_weight_to_matrix(weight: Tensor, spec: ConvSpec) -> Tensor:
    """Conv weight (n, c/g, *kernel) -> per-group matrices (g, rows, cols) for `spec.scheme`."""
    g = spec.groups
    n, c_g = weight.shape[:2]
    if spec.scheme == "channel":
        return weight.reshape(g, n // g, -1)
    # spatial: rows (n, j), columns (c, i)
    _, _, kh, kw = weight.shape
    w = weight.reshape(g, n // g, c_g, kh, kw)
    return w.permute(0, 1, 4, 2, 3).reshape(g, (n // g) * kw, c_g * kh)


def conv_matrix_to_weight(mat: Tensor, spec: ConvSpec) -> Tensor:
    """Inverse of `conv_weight_to_matrix`: (g, rows, cols) -> (n, c/g, *kernel)."""
    g = spec.groups
    n_g = spec.out_channels // g
    c_g = spec.in_channels // g
    if spec.scheme == "channel":
        return mat.reshape(g * n_g, c_g, *spec.kernel_size)
    kh, kw = spec.kernel_size
    w = mat.reshape(g, n_g, kw, c_g, kh).permute(0, 1, 3, 4, 2)
    return w.reshape(g * n_g, c_g, kh, kw)


def conv_weight(U: Tensor, s: Tensor, V: Tensor, spec: ConvSpec) -> Tensor:
    """Dense conv weight of a factorized conv (`U`: (g, rows, r), `s`: (g, r), `V`: (g, cols, r))."""
    return conv_matrix_to_weight(materialize(U, s, V), spec)


def conv_chain_kernels(spec: ConvSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kernel sizes of the two thin convs: channel (*kernel) then (1, ...); spatial
    (kh, 1) then (1, kw)."""
    if spec.scheme == "channel":
        return tuple(spec.kernel_size), (1,) * spec.dims
    kh, kw = spec.kernel_size
    return (kh, 1), (1, kw)


def conv_chain_weights(U: Tensor, s: Tensor, V: Tensor, spec: ConvSpec) -> tuple[Tensor, Tensor]:
    """Weights of the two thin convs that compute the layer (`conv_chain_kernels`); `s` is
    folded into the second: first (g*r, c/g, *k1), second (n, r, *k2)."""
    g, _, r = U.shape
    n_g = spec.out_channels // g
    c_g = spec.in_channels // g
    Us = U * s.unsqueeze(-2)
    k1, k2 = conv_chain_kernels(spec)
    first = V.transpose(1, 2).reshape(g * r, c_g, *k1)
    if spec.scheme == "channel":
        second = Us.reshape(g * n_g, r, *k2)
    else:
        kw = k2[1]
        # contiguous: CPU Inductor (torch 2.13) computed grouped convs with the permuted view
        # wrong at ranks >= 2 (tests/test_compile.py checks it)
        second = (Us.reshape(g, n_g, kw, r).permute(0, 1, 3, 2).reshape(g * n_g, r, 1, kw)
                  .contiguous())
    return first, second


def conv_chain_geometry(spec: ConvSpec) -> tuple[dict, dict]:
    """Keyword arguments (stride, padding, dilation) of the two thin convs of the chain."""
    if spec.scheme == "channel":
        ones, zeros = (1,) * spec.dims, (0,) * spec.dims
        return (dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation),
                dict(stride=ones, padding=zeros, dilation=ones))
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    return (dict(stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1)),
            dict(stride=(1, sw), padding=(0, pw), dilation=(1, dw)))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, padding_mode: str,
         stride, padding, dilation) -> Tensor:
    """`F.conv1d/2d/3d` (by `len(padding)`) with nn.Conv's handling of non-zero padding modes."""
    if padding_mode != "zeros" and any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)], mode=padding_mode)
        padding = (0,) * len(padding)
    return _CONV[len(padding)](x, weight, bias, stride, padding, dilation, groups)


def svd_conv(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None,
             spec: ConvSpec) -> Tensor:
    """Factorized conv as the chain of two thin convs (docs/SPEC.md section 1, layer forms)."""
    first, second = conv_chain_weights(U, s, V, spec)
    geo1, geo2 = conv_chain_geometry(spec)
    h = conv(x, first, None, spec.groups, spec.padding_mode, **geo1)
    return conv(h, second, bias, spec.groups, spec.padding_mode, **geo2)


def svd_conv_materialized(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Tensor | None,
                          spec: ConvSpec) -> Tensor:
    """Factorized conv computed by building the dense weight then one conv."""
    return conv(x, conv_weight(U, s, V, spec), bias, spec.groups, spec.padding_mode,
                spec.stride, spec.padding, spec.dilation)


# ----------------------------------------------------------------------------- regularizers
PRECISIONS = ("ieee", "tf32", "bf16")


def check_precision(who: str, precision) -> None:
    """A ValueError naming `who` unless `precision` is None (the device's default) or one
    of `PRECISIONS`."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"{who}: precision must be None or one of {PRECISIONS}, "
                         f"got {precision!r}")


def orthogonality_precision(precision: str | None, dtype: torch.dtype, device: torch.device) -> str:
    """The precision the orthogonality dots of fp32 factors run in: as asked, or by default
    TF32 on a GPU (tensor cores, fp32 accumulation) and IEEE elsewhere. Factors of other
    dtypes always give "ieee": fp64 stays exact, and bf16/fp16 factors already multiply in
    their own dtype (with fp32 accumulation)."""
    if dtype != torch.float32:
        return "ieee"
    if precision is None:
        return "tf32" if device.type == "cuda" else "ieee"
    return precision


def dot_operand(M: Tensor, precision: str) -> Tensor:
    """`M` as a dot of `precision` reads it: IEEE as is; TF32 rounded to 10 mantissa bits
    (to nearest, ties away from zero, as cvt.rna.tf32 does: the kernels round so, then the
    tensor cores' dropping of the low bits changes nothing); bf16 to 7 (ties to even).
    Rounded on the fp32 bits with integer ops, as the kernels do (a cast round trip would
    be folded away by torch.compile), NaNs kept; straight-through for autograd (the
    gradient is the rounded dot's); applies to values as fp32 holds them (an fp64 copy of
    fp32 data rounds the same)."""
    if precision == "ieee":
        return M
    v = M.detach().float()
    bits = v.view(torch.int32)
    if precision == "tf32":
        rounded = ((bits + 0x1000) & -8192).view(torch.float32)
    elif precision == "bf16":
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).view(torch.float32)
    else:
        raise ValueError(f"dot_operand: precision must be one of {PRECISIONS}, got {precision!r}")
    straight_through = M + (rounded.to(M.dtype) - M.detach())
    return torch.where(torch.isfinite(M), straight_through, M)  # inf and NaN as they are


def orthogonality_loss(mats: Sequence[Tensor], precision: str = "ieee") -> Tensor:
    """`sum_M ||M^T M - I||_F^2 / r^2` over 2-D matrices M (m x r), with the Gram's inputs
    read at `precision` (`dot_operand`; one of `PRECISIONS`, resolved) and accumulated in
    M's dtype (fp32 at least)."""
    if precision not in PRECISIONS:
        raise ValueError(f"orthogonality_loss: precision must be one of {PRECISIONS} here (None "
                         f"is resolved by svdkern.ops.orthogonality_loss), got {precision!r}")
    total = None
    for M in mats:
        M = M.float() if M.dtype in (torch.float16, torch.bfloat16) else M
        M = dot_operand(M, precision)
        r = M.shape[-1]
        gram = M.transpose(-1, -2) @ M
        eye = torch.eye(r, dtype=M.dtype, device=M.device)
        term = (gram - eye).pow(2).sum() / (r * r)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonality_loss: got no matrices")
    return total


def l1_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum_l sum_j |s_j|` over singular-value vectors."""
    if len(svals) == 0:
        raise ValueError("l1_loss: got no singular-value vectors")
    return sum(_fp32(s).abs().sum() for s in svals)


def hoyer_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum_l ||s_l||_1 / ||s_l||_2`: scale-invariant, shrinks the small singular values."""
    if len(svals) == 0:
        raise ValueError("hoyer_loss: got no singular-value vectors")
    return sum(_hoyer(_fp32(s)) for s in svals)


def hoyer_square_loss(svals: Sequence[Tensor]) -> Tensor:
    """`sum_l (||s_l||_1 / ||s_l||_2)^2` (DeepHoyer's Hoyer-Square, the official
    `Regularization.py` without its constant `- 1`): as Hoyer, with a gradient that grows
    with the spread of `s`."""
    if len(svals) == 0:
        raise ValueError("hoyer_square_loss: got no singular-value vectors")
    return sum(_hoyer(_fp32(s)).square() for s in svals)


def _hoyer(s: Tensor) -> Tensor:
    """`||s||_1 / ||s||_2` taken of `s / max|s|`, the same value (it is scale-invariant)
    without the underflow of `s^2` for tiny `s` (inf) or its overflow for huge `s`; 0, with
    gradient 0, for an all-zero `s` (no direction to sparsify: the official code skips it)."""
    peak = s.detach().abs().max()
    nonzero = peak > 0
    # an all-zero s takes a stand-in of ones, masked out: no 0/0 in any derivative order
    t = torch.where(nonzero, s / torch.where(nonzero, peak, 1), torch.ones_like(s))
    return torch.where(nonzero, t.abs().sum() / torch.linalg.vector_norm(t), 0)


def _fp32(t: Tensor) -> Tensor:
    """Regularizers accumulate in at least fp32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ----------------------------------------------------------------------------- pruning
def energy_keep_count(s: Tensor, energy: float) -> int:
    """Ranks kept by the energy rule: drop the smallest `s_j^2` while the dropped energy
    stays `<= energy * sum s_j^2`; keep at least one."""
    e2 = s.detach().double().pow(2).flatten()
    dropped = torch.cumsum(torch.sort(e2).values, 0)
    removable = int((dropped <= energy * e2.sum()).sum())
    return max(1, e2.numel() - removable)


def _as_real(value) -> float:
    """`value` as a float (Python, NumPy or one-element tensor), NaN for anything else: a
    string or a boolean of any kind included, which float() would accept."""
    if isinstance(value, (str, bytes, bool)) or "bool" in str(getattr(value, "dtype", "")):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def check_energy(who: str, energy) -> float:
    """`energy` as a float, or a ValueError naming `who` unless it is a real number in
    [0, 1) (Python, NumPy or one-element tensor; not a string or a boolean of any kind)."""
    value = _as_real(energy)
    if not 0 <= value < 1:
        raise ValueError(f"{who}: energy must be a number in [0, 1), got {energy!r}")
    return value


def check_rank_multiple(who: str, rank_multiple) -> None:
    """A ValueError naming `who` unless `rank_multiple` is an integer >= 1."""
    if not (isinstance(rank_multiple, int) and rank_multiple >= 1):
        raise ValueError(f"{who}: rank_multiple must be an integer >= 1, got {rank_multiple!r}")


def threshold_keep_count(s: Tensor, threshold: float) -> int:
    """Ranks kept by the value rule (official `--sensitivity`, TRP's `ValueThreshold`): the
    `|s_j| >= threshold`; keep at least one."""
    return max(1, int((s.detach().abs() >= threshold).sum()))


def check_prune_rule(who: str, energy, threshold) -> tuple[float | None, float | None]:
    """(energy, threshold) with exactly one given, each checked: a ValueError naming `who`
    otherwise. `threshold` is a finite number >= 0 (not a boolean or a string)."""
    if (energy is None) == (threshold is None):
        raise ValueError(f"{who}: give exactly one of energy and threshold, got energy={energy!r}, "
                         f"threshold={threshold!r}")
    if energy is not None:
        return check_energy(who, energy), None
    value = _as_real(threshold)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{who}: threshold must be a finite number >= 0, got {threshold!r}")
    return None, value


DEFAULT_TRAINING_ENERGY = 0.01  # SVDTraining's energy when neither rule is given


def check_prune_schedule(who: str, prune_epoch, prune_step) -> None:
    """A ValueError naming `who` unless at most one of `prune_epoch` and `prune_step` is
    given, each an integer >= 0 (not a boolean)."""
    if prune_epoch is not None and prune_step is not None:
        raise ValueError(f"{who}: give at most one of prune_epoch and prune_step")
    for label, value in (("prune_epoch", prune_epoch), ("prune_step", prune_step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"{who}: {label} must be an integer >= 0, got {value!r}")


def kept_rank(s: Tensor, energy: float | None, rank_multiple: int = 1,
              threshold: float | None = None) -> int:
    """Rank a layer keeps: the largest count of its groups `s` (g, r) by the energy rule
    (`energy_keep_count`) or, with `threshold`, the value rule (`threshold_keep_count`),
    rounded up to a multiple of `rank_multiple` (at most r), so every group keeps the same
    rank."""
    count = ((lambda group: threshold_keep_count(group, threshold)) if threshold is not None
             else (lambda group: energy_keep_count(group, energy)))
    k = max(count(group) for group in s)
    return min(s.shape[-1], -(-k // rank_multiple) * rank_multiple)


def marchenko_pastur_quantiles(p: int, c: float, points: int = 4097) -> Tensor:
    """The `p` eigenvalues of `W W^T / (q sigma^2)` at the mid quantiles (i + 1/2) / p,
    descending, for a p x q matrix (p <= q, c = p / q) of iid entries of variance sigma^2:
    the Marchenko-Pastur law on [(1 - sqrt c)^2, (1 + sqrt c)^2], float64. Its CDF is
    integrated on a cosine grid (the density has square-root edges, and 1/sqrt at 0 when
    c = 1), then inverted by interpolation."""
    lo, hi = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    lam = lo + (hi - lo) * (1 - torch.cos(math.pi * t)) / 2
    # density * d(lambda)/dt, with sqrt((hi - lam)(lam - lo)) = (hi - lo) sin(pi t) / 2
    dens = (hi - lo) ** 2 * torch.sin(math.pi * t) ** 2 / (8 * c * lam.clamp_min(1e-300))
    dens[0] = 2 / c if lo == 0 else 0.0  # the limit at t = 0 (finite for c = 1)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum((dens[1:] + dens[:-1]) / 2 * (t[1] - t[0]), 0)])
    cdf = cdf / cdf[-1]
    levels = (torch.arange(p, 0, -1, dtype=torch.float64) - 0.5) / p
    index = torch.searchsorted(cdf, levels).clamp(1, points - 1)
    c0, c1 = cdf[index - 1], cdf[index]
    w = (levels - c0) / (c1 - c0).clamp_min(1e-300)
    return lam[index - 1] + w * (lam[index] - lam[index - 1])


def default_init_factors(groups: int, rows: int, cols: int, fan_in: int, rank: int,
                         device=None, dtype=None, variance: float | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Factors (g, rows, r), (g, r), (g, cols, r) distributed as the SVD of a weight init of
    iid entries of `variance` (default: PyTorch's `kaiming_uniform_(a=sqrt(5))`, U(-b, b),
    b = 1/sqrt(fan_in), variance 1/(3 fan_in)) with no SVD taken: orthonormal `U`, `V` from
    QR of Gaussians (Haar-distributed, as the singular vectors of an iid matrix are) and `s`
    at the Marchenko-Pastur quantiles of that matrix's spectrum (the largest `rank`)."""
    factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
    p, q = min(rows, cols), max(rows, cols)
    if p == 0 or fan_in == 0:
        return (torch.zeros(groups, rows, rank, **factory), torch.zeros(groups, rank, **factory),
                torch.zeros(groups, cols, rank, **factory))
    sigma2 = 1.0 / (3.0 * fan_in) if variance is None else variance
    s = (sigma2 * q * marchenko_pastur_quantiles(p, p / q)[:rank]).sqrt()
    return (_haar_columns(groups, rows, rank, factory), s.to(**factory).expand(groups, rank).contiguous(),
            _haar_columns(groups, cols, rank, factory))


def _haar_columns(groups: int, rows: int, rank: int, factory: dict) -> Tensor:
    """(g, rows, rank) orthonormal columns, Haar-distributed: QR of Gaussians with the signs
    of R's diagonal folded back into Q (LAPACK's convention fixes them otherwise), in fp32
    at least (QR has no fp16/bf16 kernels), then cast."""
    work = torch.promote_types(factory["dtype"], torch.float32)
    Q, R = torch.linalg.qr(torch.randn(groups, rows, rank, device=factory["device"], dtype=work))
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    return (Q * torch.where(signs == 0, 1.0, signs).unsqueeze(-2)).to(factory["dtype"])


def svd_factors(mat: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD `mat ~ U diag(s) V^T` (batched), computed in float64 whatever the
    input dtype (no bf16/fp16 SVD exists), returned in `mat`'s dtype; `V` is (..., cols, r)."""
    U, s, Vh = torch.linalg.svd(mat.detach().to(torch.float64), full_matrices=False)
    r = s.shape[-1] if rank is None else rank
    cast = dict(dtype=mat.dtype)
    return U[..., :r].to(**cast), s[..., :r].to(**cast), Vh[..., :r, :].transpose(-1, -2).to(**cast)
