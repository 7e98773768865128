"""The fused SVD linear op `y = x V diag(s) U^T + b` (docs/SPEC.md section 3): its Triton
kernels, their launchers, and the PyTorch custom ops (fake impls, autograd, autocast).

Forward: a program owns `BLOCK_B` rows of `x`; it computes `h = x V` for the whole rank
(padded to `R_PAD`, a power of two >= 16, masked), keeps it in registers, scales it by `s`
and loops over output column tiles computing `(h * s) U^T + b`. The `B x r` intermediate
never touches global memory. When the rows are too few to fill the GPU, the output columns
are split into groups over a second grid axis (each group recomputes its rows' `h`, cheap
at small B). Autotuning is keyed on the batch rounded up to a power of two.

Backward: one row-block kernel reads `x` and `dy` once, computes `h = x V` and `g = dy U`
on chip, writes per-program fp32 partials of `ds = sum_rows(h * g)` and `db = sum_rows(dy)`
(summed once afterwards: deterministic, no atomics), writes `dx = (g * s) V^T`, and stores
`h * s` and `g * s` (B x r). The two reductions over B, `dU = dy^T (h * s)` and
`dV = x^T (g * s)`, are plain GEMMs with a long reduction dimension, which cuBLAS already
does well (deterministically); the caller runs them as torch matmuls on those buffers, where
torch.compile sees them and autograd skips them for frozen factors.

Numerics: fp32 accumulation for fp32/fp16/bf16 inputs. fp32 inputs use TF32 `tl.dot` exactly
where PyTorch allows TF32 matmuls (`svdkern.backend.dot_precision`, matching `nn.Linear`),
IEEE otherwise and always under the interpreter. Offsets along B and the feature dimensions
are int64. Block shapes are autotuned on a GPU; the interpreter uses one fixed config.

PyTorch sees two `torch.library.custom_op`s, `svdkern::svd_linear_fwd` and
`svdkern::svd_linear_bwd_rows`, with fake (meta) implementations, so
`torch.compile(fullgraph=True)` traces them as single opaque nodes with no graph break;
`register_autograd` gives the forward its backward: the row-block kernel, then the two
GEMMs over the batch as torch ops (the compiler sees them, autograd skips them for frozen
factors). `svdkern.ops` imports this module only when the fused path runs, so importing
svdkern never requires Triton.
"""
# No `from __future__ import annotations` here: custom_op reads the annotations at runtime
# to build the op schemas, and Optional[...] parses on every supported torch.
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from svdkern import differentiable, reference
from svdkern.backend import dot_precision, interpreter_enabled
from svdkern.dispatch import FUSED_DTYPES, MAX_FUSED_RANK
from svdkern.launch import COMPILE_OPTIONS, tuning_choices

_INTERPRET = interpreter_enabled()
# fp32 values one thread may hold live (`register_footprint`) before ptxas spills. Compiling
# every config for sm_90 as a launch specializes it (`python -m bench.kernel_resources`,
# bench/results/sm90-kernel-resources-2026-12-02.md; bf16 and fp32, R_PAD 16/64/128, ranks
# R_PAD, R_PAD - 8 and R_PAD - 1): all 4 (config, dtype, R_PAD) cases above it spill, 136 to
# 608 bytes per thread at their worst rank; of the 92 at or below it, 2 backward ones at
# fp32 R_PAD 128 and an odd rank, 8 and 152.
_REGISTER_BUDGET = 160


# Block shapes the GPU tunes among (the register prefilter below drops those that would spill
# for the call's rank and dtype); the interpreter runs one fixed config per kernel. The tests
# run every one of them through the interpreter against the reference.
FWD_CONFIGS = [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w,
                             num_stages=st)
               for bb, bk, bn, w, st in [(64, 64, 64, 4, 3), (64, 64, 128, 8, 3),
                                         (128, 32, 64, 8, 3), (128, 64, 128, 8, 3),
                                         (32, 64, 64, 4, 4), (64, 32, 64, 4, 4),
                                         (128, 64, 64, 4, 3), (16, 32, 64, 4, 3),
                                         (32, 32, 64, 8, 3), (64, 32, 64, 8, 3)]]
# BLOCK_B is not tuned in the backward: it fixes the number of per-program partials.
BWD_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=st)
               for bk, bn, w, st in [(32, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3),
                                     (32, 64, 8, 3), (64, 32, 8, 4), (32, 32, 8, 3)]]
_FIXED_FWD = triton.Config({"BLOCK_B": 32, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4)
_FIXED_BWD = triton.Config({"BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4)


def register_footprint(cfg: triton.Config, block_b: int, r_pad: int, itemsize: int,
                       rank_accumulators: int) -> float:
    """fp32 values per thread live at once: the fp32 `(BLOCK_B, R_PAD)` accumulators (`h`;
    `h` and `g` in the backward), their `s`-scaled copy in the input dtype, and one tile."""
    tile = max(cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"] if rank_accumulators == 2 else 0)
    per_row = r_pad * (rank_accumulators + itemsize / 4) + tile
    return block_b * per_row / (32 * cfg.num_warps)


def _keep_in_registers(block_b_of, rank_accumulators: int):
    """Autotuner pre-filter: drop the configs whose footprint exceeds the register budget for
    this call's rank and dtype (tuning them costs compile time and they spill). Should every
    config exceed it, the smallest footprint is kept: the autotuner needs one. With tuning
    off, the first kept config alone."""
    def prune(configs, named_args, **kwargs):
        r_pad, itemsize = kwargs["R_PAD"], named_args["x_ptr"].element_size()
        footprint = {id(c): register_footprint(c, block_b_of(c, kwargs), r_pad, itemsize,
                                                rank_accumulators) for c in configs}
        kept = [c for c in configs if footprint[id(c)] <= _REGISTER_BUDGET]
        return tuning_choices(kept or [min(configs, key=lambda c: footprint[id(c)])])
    return prune


def _bwd_block_b(r_pad: int) -> int:
    """Rows per backward program: two fp32 (BLOCK_B, R_PAD) accumulators must fit registers."""
    if _INTERPRET:
        return 32
    return 64 if r_pad <= 64 else 32


@triton.jit
def _aligned_rank(R, stride_um, stride_vn, ALIGNED_FACTORS: tl.constexpr):
    """The rank and the row strides of `U` and `V`, shown to the compiler as multiples of 8
    where the host found them so (`_rows_start_16_bytes_apart`): Triton's launch detects
    multiples of 16 only, and a rank that is a multiple of 8 then still loads its factor
    rows (and masks them) 16 bytes at a time. `x // 8 * 8` is `x` here; unlike
    `tl.multiple_of`, which a kernel argument ignores, the compiler's analysis reads it."""
    if ALIGNED_FACTORS:
        R = R // 8 * 8
        stride_um = stride_um // 8 * 8
        stride_vn = stride_vn // 8 * 8
    return R, stride_um, stride_vn


@triton.jit
def _rows_times_v(x_ptr, v_ptr, rows, row_ok, ranks, rank_ok, N_IN, stride_xb, stride_xk,
                  stride_vn, stride_vr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_K: tl.constexpr, R_PAD: tl.constexpr):
    """`h = x[rows] V` as a (BLOCK_B, R_PAD) fp32 block; padded ranks come out zero."""
    h = tl.zeros((BLOCK_B, R_PAD), dtype=tl.float32)
    for k0 in range(0, N_IN, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < N_IN
        xt = tl.load(x_ptr + rows[:, None] * stride_xb + ks[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + ks[:, None] * stride_vn + ranks[None, :] * stride_vr,
                     mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        h = tl.dot(xt, vt, acc=h, input_precision=PRECISION)
    return h


@triton.autotune(configs=[_FIXED_FWD] if _INTERPRET else FWD_CONFIGS,
                 key=["B_BUCKET", "N_IN", "N_OUT", "R_PAD", "ALIGNED_FACTORS", "HAS_BIAS",
                      "PRECISION"],
                 prune_configs_by={"early_config_prune": _keep_in_registers(
                     lambda c, kw: c.kwargs["BLOCK_B"], 1)})
@triton.jit(do_not_specialize=["R"])  # R_PAD and ALIGNED_FACTORS carry what a rank changes
def _fwd_kernel(x_ptr, u_ptr, s_ptr, v_ptr, b_ptr, y_ptr,
                B, N_IN, N_OUT, R, B_BUCKET,
                stride_xb, stride_xk, stride_um, stride_ur, stride_vn, stride_vr,
                stride_yb, stride_ym,
                HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                ALIGNED_FACTORS: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (row blocks, column groups): each program computes `h` for its rows and writes
    one contiguous group of output tiles (several groups only when rows are few)."""
    R, stride_um, stride_vn = _aligned_rank(R, stride_um, stride_vn, ALIGNED_FACTORS)
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < B
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R

    h = _rows_times_v(x_ptr, v_ptr, rows, row_ok, ranks, rank_ok, N_IN, stride_xb, stride_xk,
                      stride_vn, stride_vr, PRECISION, BLOCK_B, BLOCK_K, R_PAD)

    s = tl.load(s_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    hs = (h * s[None, :]).to(x_ptr.dtype.element_ty)
    tiles_per_group = tl.cdiv(tl.cdiv(N_OUT, BLOCK_N), tl.num_programs(1))
    col_lo = tl.program_id(1) * tiles_per_group * BLOCK_N
    col_hi = tl.minimum(col_lo + tiles_per_group * BLOCK_N, N_OUT)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < col_hi
        ut = tl.load(u_ptr + ranks[:, None] * stride_ur + cols[None, :] * stride_um,
                     mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        y = tl.dot(hs, ut, input_precision=PRECISION)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_yb + cols[None, :] * stride_ym,
                 y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=[_FIXED_BWD] if _INTERPRET else BWD_CONFIGS,
                 key=["N_IN", "N_OUT", "R_PAD", "ALIGNED_FACTORS", "COMPUTE_DX", "COMPUTE_DB",
                      "PRECISION"],
                 prune_configs_by={"early_config_prune": _keep_in_registers(
                     lambda c, kw: kw["BLOCK_B"], 2)})
@triton.jit(do_not_specialize=["R"])
def _bwd_rows_kernel(x_ptr, dy_ptr, u_ptr, s_ptr, v_ptr,
                     dx_ptr, hs_ptr, gs_ptr, ds_part_ptr, db_part_ptr,
                     B, N_IN, N_OUT, R,
                     stride_xb, stride_xk, stride_dyb, stride_dym, stride_um, stride_ur,
                     stride_vn, stride_vr,
                     COMPUTE_DX: tl.constexpr, COMPUTE_DB: tl.constexpr, R_PAD: tl.constexpr,
                     PRECISION: tl.constexpr, ALIGNED_FACTORS: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    R, stride_um, stride_vn = _aligned_rank(R, stride_um, stride_vn, ALIGNED_FACTORS)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R

    h = _rows_times_v(x_ptr, v_ptr, rows, row_ok, ranks, rank_ok, N_IN, stride_xb, stride_xk,
                      stride_vn, stride_vr, PRECISION, BLOCK_B, BLOCK_K, R_PAD)

    g = tl.zeros((BLOCK_B, R_PAD), dtype=tl.float32)
    for n0 in range(0, N_OUT, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < N_OUT
        dyt = tl.load(dy_ptr + rows[:, None] * stride_dyb + cols[None, :] * stride_dym,
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        ut = tl.load(u_ptr + cols[:, None] * stride_um + ranks[None, :] * stride_ur,
                     mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        g = tl.dot(dyt, ut, acc=g, input_precision=PRECISION)
        if COMPUTE_DB:
            tl.store(db_part_ptr + pid * N_OUT + cols, tl.sum(dyt.to(tl.float32), axis=0),
                     mask=col_ok)

    tl.store(ds_part_ptr + pid * R_PAD + ranks, tl.sum(h * g, axis=0))
    s = tl.load(s_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    hs = (h * s[None, :]).to(x_ptr.dtype.element_ty)
    gs = (g * s[None, :]).to(x_ptr.dtype.element_ty)
    rb_ok = row_ok[:, None] & rank_ok[None, :]
    tl.store(hs_ptr + rows[:, None] * R + ranks[None, :], hs, mask=rb_ok)
    tl.store(gs_ptr + rows[:, None] * R + ranks[None, :], gs, mask=rb_ok)

    if COMPUTE_DX:
        for k0 in range(0, N_IN, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            k_ok = ks < N_IN
            vt = tl.load(v_ptr + ranks[:, None] * stride_vr + ks[None, :] * stride_vn,
                         mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
            dx = tl.dot(gs, vt, input_precision=PRECISION)
            tl.store(dx_ptr + rows[:, None] * N_IN + ks[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & k_ok[None, :])


def _target_programs(device: torch.device) -> int:
    """Programs the forward grid aims for: two per SM on a GPU, so that few rows still
    spread over the machine (output columns are then split between programs, each
    recomputing its rows' `h`). Under the interpreter 4, so small tests exercise the split."""
    if _INTERPRET:
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _rows_start_16_bytes_apart(*factors: torch.Tensor) -> bool:
    """Whether every factor is row-major with a rank and a row stride that are multiples of
    8 elements (16 bytes in bf16/fp16, 32 in fp32): `rank_multiple=8` pruning keeps them so."""
    return all(t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.shape[1] % 8 == 0
               for t in factors)


def _rank_pad(r: int) -> int:
    if r > MAX_FUSED_RANK:
        raise ValueError(f"fused svd_linear holds rank <= {MAX_FUSED_RANK} on chip, got r={r}")
    return max(16, triton.next_power_of_2(r))


def launch_forward(x: torch.Tensor, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`x` (B, n) with any strides -> `y` (B, m), contiguous, in `x`'s dtype."""
    s = s.contiguous()  # the kernels index s and bias as dense vectors
    bias = None if bias is None else bias.contiguous()
    B, n = x.shape
    m, r = U.shape
    y = torch.empty((B, m), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    target = _target_programs(x.device)

    def grid(meta):
        row_blocks = triton.cdiv(B, meta["BLOCK_B"])
        tiles = triton.cdiv(m, meta["BLOCK_N"])
        groups = max(1, min(tiles, triton.cdiv(target, row_blocks)))
        return row_blocks, triton.cdiv(tiles, triton.cdiv(tiles, groups))  # no empty group

    _fwd_kernel[grid](x, U, s, V, bias if bias is not None else s, y, B, n, m, r,
                      triton.next_power_of_2(B),
                      x.stride(0), x.stride(1), U.stride(0), U.stride(1), V.stride(0), V.stride(1),
                      y.stride(0), y.stride(1),
                      HAS_BIAS=bias is not None, R_PAD=_rank_pad(r),
                      PRECISION=dot_precision(x.dtype, x.device),
                      ALIGNED_FACTORS=_rows_start_16_bytes_apart(U, V), **COMPILE_OPTIONS)
    return y


def launch_backward_rows(dy: torch.Tensor, x: torch.Tensor, U: torch.Tensor, s: torch.Tensor,
                         V: torch.Tensor, need_dx: bool, need_db: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """(dx, h*s, g*s, ds, db) for `dy` (B, m), `x` (B, n), by one pass over x and dy.

    `dx` (B, n) and `db` (m,) are empty tensors when not asked for. `dU = dy^T (h*s)` and
    `dV = x^T (g*s)` are left to the caller's GEMMs.
    """
    s = s.contiguous()
    B, n = x.shape
    m, r = U.shape
    r_pad = _rank_pad(r)
    block_b = _bwd_block_b(r_pad)
    programs = max(1, triton.cdiv(B, block_b))
    dev, dt = x.device, x.dtype
    dx = torch.empty((B, n) if need_dx else (0,), dtype=dt, device=dev)
    hs = torch.empty((B, r), dtype=dt, device=dev)
    gs = torch.empty((B, r), dtype=dt, device=dev)
    # Every program overwrites its whole row of partials; only an empty batch needs zeros.
    alloc = torch.zeros if B == 0 else torch.empty
    ds_part = alloc((programs, r_pad), dtype=torch.float32, device=dev)
    db_part = alloc((programs, m) if need_db else (1, 1), dtype=torch.float32, device=dev)
    if B > 0:
        _bwd_rows_kernel[(programs,)](
            x, dy, U, s, V, dx, hs, gs, ds_part, db_part, B, n, m, r,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), U.stride(0), U.stride(1),
            V.stride(0), V.stride(1),
            COMPUTE_DX=need_dx, COMPUTE_DB=need_db, R_PAD=r_pad, PRECISION=dot_precision(dt, dev),
            ALIGNED_FACTORS=_rows_start_16_bytes_apart(U, V), BLOCK_B=block_b,
            **COMPILE_OPTIONS)
    ds = ds_part.sum(0)[:r].to(s.dtype)
    db = db_part.sum(0).to(dt) if need_db else torch.empty(0, dtype=dt, device=dev)
    return dx, hs, gs, ds, db


# ------------------------------------------------------------------ PyTorch custom ops
@torch.library.custom_op("svdkern::svd_linear_fwd", mutates_args=())
def svd_linear_fwd(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`x` (B, n) -> `x V diag(s) U^T + b` (B, m), by the fused kernel."""
    return launch_forward(x, U, s, V, bias)


@svd_linear_fwd.register_fake
def _(x, U, s, V, bias):
    return x.new_empty((x.shape[0], U.shape[0]))


@torch.library.custom_op("svdkern::svd_linear_bwd_rows", mutates_args=())
def svd_linear_bwd_rows(dy: Tensor, x: Tensor, U: Tensor, s: Tensor, V: Tensor, need_dx: bool,
                        need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, h*s, g*s, ds, db) by the fused row-block backward kernel; `dx`, `db` are empty
    when not asked for."""
    return launch_backward_rows(dy, x, U, s, V, need_dx, need_db)


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
