"""Grouped orthogonality penalty over every `U` and `V` of a model in two launches.

For each matrix `M` (rows x r) of a group: loss `sum ||M^T M - I||_F^2 / r^2` and gradient
`4 M (M^T M - I) / r^2` (docs/SPEC.md section 1). The matrices have different shapes, so, as in
Triton's grouped-GEMM tutorial, one persistent grid walks the tiles of all problems; each
program steps through the problem table in order, so finding a tile's problem costs nothing.
The interpreter cannot load pointers from memory, so the matrices live in ONE flat buffer
addressed through an int64 table (one row per matrix, `TABLE_COLS` columns):

    offset in flat, rows, r, row stride, column stride, offset of its r x r Gram

When every matrix is row-major with a rank that is a multiple of 8 (the usual full-rank
case), the kernels are compiled in an ALIGNED form that knows rows start 16 bytes apart and
the column stride is 1, so the factor tiles load 16 bytes at a time (the sm_90 PTX of the
general form has no 16-byte loads: its strides are run-time table entries).

Launch 1 (`gram_loss`): Gram tiles of the upper triangle only (the Gram is symmetric), each
storing `G - I` in both triangles of a flat Gram buffer (kept for the backward) and adding
its squared Frobenius norm (twice for off-diagonal tiles) to a per-program fp32 partial;
the partials are summed once afterwards: deterministic, no atomics.
Launch 2 (`grad`): `4 M (G - I) / r^2 * grad_out`, tiled over (row block, column block) of
every `M`. Grams larger than a tile are tiled; ranks under 16 are padded into masked tiles
(`tl.dot` needs 16 per side). Accumulation is fp32 (fp64 for fp64 factors).

Packing: the factors are packed into one flat buffer at each call (`torch.cat` of the
flattened matrices; autograd of the cat returns each parameter its gradient), rather than
keeping the parameters as views into one persistent buffer. Views would save one copy of
the factors per step (bytes, small next to the Gram FLOPs), but pruning reassigns
`param.data` with new shapes, checkpoints load into `param.data`, and optimizers hold the
Parameter objects: every one of these would silently detach a view from a shared buffer.
Column-major factors (e.g. a transposed view) keep their layout in the buffer (no
transposing copy before the cat) and are addressed through their strides. The table is
cached per device, keyed by the shapes and layouts (`svdkern.launch.reused_across_steps`).

PyTorch sees the custom ops `svdkern::orthogonality_loss` and `svdkern::orthogonality_grad`
(fake impls; the second is the first's backward), so the penalty compiles as two opaque
nodes; `orthogonality_loss` below is the entry point `svdkern.ops` calls.
"""
# No `from __future__ import annotations` here: custom_op reads the annotations at runtime.
import functools
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from svdkern import differentiable, reference
from svdkern.backend import interpreter_enabled
from svdkern.launch import (COMPILE_OPTIONS, acc_dtype, common_operands, reused_across_steps,
                            tuning_choices)

MatrixKey = tuple[tuple[int, int, bool], ...]  # (rows, r, column-major) per matrix

TABLE_COLS = tl.constexpr(6)  # offset, rows, r, row stride, column stride, Gram offset

_INTERPRET = interpreter_enabled()
_INTERP_PROGRAMS = 4  # persistent-grid cap under the interpreter: small tests loop tiles


@triton.jit
def _matrix_entry(table, g, ALIGNED: tl.constexpr):
    """Row `g` of the table: offset, rows, r, row stride, column stride, Gram offset.
    ALIGNED (every matrix row-major, every rank and offset a multiple of 8): the compiler is
    told so, and with the unit column stride a constant it can load 16 bytes at a time."""
    row = table + g * TABLE_COLS
    off, rows, r = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    s_row, s_col, g_off = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
    if ALIGNED:
        off, r, s_row = tl.multiple_of(off, 8), tl.multiple_of(r, 8), tl.multiple_of(s_row, 8)
        g_off, s_col = tl.multiple_of(g_off, 8), 1
    return off, rows, r, s_row, s_col, g_off


@triton.jit
def _operand(t, ROUND: tl.constexpr):
    """A dot operand as the requested precision reads it, as `reference.dot_operand` rounds
    it. "tf32": fp32 rounded to 10 mantissa bits (to nearest, ties away) on every backend:
    Triton hands fp32 registers to wgmma .tf32 with no cvt.rna (its sm_90 PTX), and the
    tensor cores then drop the low 13 bits, which would truncate. "bf16": cast (the dot runs
    on bf16 tensor cores); "bf16 emulated": the interpreter, whose bf16 dot is broken,
    rounds fp32 values to 7 bits (ties to even) instead."""
    if ROUND == "bf16":
        return t.to(tl.bfloat16)
    elif ROUND == "tf32":
        bits = t.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
        return tl.where(t != t, t, rounded)  # a NaN's payload could carry it to 0 or inf
    elif ROUND == "bf16 emulated":
        bits = t.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return tl.where(t != t, t, rounded)
    else:
        return t


@triton.jit
def _upper_block(local, nb):
    """(row, column) block of the `local`-th pair of the upper triangle, row by row."""
    bi = local * 0
    while local >= nb - bi:
        local -= nb - bi
        bi += 1
    return bi, bi + local


@triton.jit
def _gram_loss_kernel(flat, table, gram, partials, num_mats, max_rank, max_rows,
                      ALIGNED: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    acc_dtype = gram.dtype.element_ty
    part = tl.zeros((), dtype=acc_dtype)
    tile = pid.to(tl.int64)
    first = tl.zeros((), dtype=tl.int64)  # first global tile of the current matrix
    cols = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    for g in range(num_mats):
        off, rows, r, s_row, s_col, g_off = _matrix_entry(table, g, ALIGNED)
        nb = tl.cdiv(r, BLOCK_R)
        last = first + nb * (nb + 1) // 2  # upper-triangle block pairs only
        while tile < last:
            bi, bj = _upper_block(tile - first, nb)
            ci = bi * BLOCK_R + cols
            cj = bj * BLOCK_R + cols
            acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=acc_dtype)
            for k0 in range(0, rows, BLOCK_K):
                k = k0 + ks
                a = tl.load(flat + off + k[:, None] * s_row + ci[None, :] * s_col,
                            mask=(k[:, None] < rows) & (ci[None, :] < r), other=0.0)
                b = tl.load(flat + off + k[:, None] * s_row + cj[None, :] * s_col,
                            mask=(k[:, None] < rows) & (cj[None, :] < r), other=0.0)
                acc = tl.dot(tl.trans(_operand(a, ROUND)), _operand(b, ROUND), acc,
                             input_precision=PRECISION, out_dtype=acc_dtype)
            inside = (ci[:, None] < r) & (cj[None, :] < r)
            diff = acc - tl.where(ci[:, None] == cj[None, :], 1.0, 0.0).to(acc_dtype)
            diff = tl.where(inside, diff, 0.0)
            tl.store(gram + g_off + ci[:, None] * r + cj[None, :], diff, mask=inside)
            tl.store(gram + g_off + cj[None, :] * r + ci[:, None], diff, mask=inside)
            weight = tl.where(bi == bj, 1.0, 2.0).to(acc_dtype)
            square = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
            part += weight * square / (r * r).to(acc_dtype)
            tile += num_progs
        first = last
    tl.store(partials + pid, part)


@triton.jit
def _grad_kernel(flat, table, gram, grad_out, grad, num_mats, max_rank, max_rows,
                 ALIGNED: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr,
                 BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    acc_dtype = gram.dtype.element_ty
    upstream = tl.load(grad_out).to(acc_dtype)
    tile = pid.to(tl.int64)
    first = tl.zeros((), dtype=tl.int64)
    ms = tl.arange(0, BLOCK_M)
    ns = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    for g in range(num_mats):
        off, rows, r, s_row, s_col, g_off = _matrix_entry(table, g, ALIGNED)
        nbn = tl.cdiv(r, BLOCK_N)
        last = first + tl.cdiv(rows, BLOCK_M) * nbn
        while tile < last:
            local = tile - first
            rm = (local // nbn) * BLOCK_M + ms
            rn = (local % nbn) * BLOCK_N + ns
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
            for k0 in range(0, r, BLOCK_K):
                k = k0 + ks
                a = tl.load(flat + off + rm[:, None] * s_row + k[None, :] * s_col,
                            mask=(rm[:, None] < rows) & (k[None, :] < r), other=0.0)
                b = tl.load(gram + g_off + k[:, None] * r + rn[None, :],
                            mask=(k[:, None] < r) & (rn[None, :] < r), other=0.0)
                a = _operand(a, ROUND)
                if a.dtype == tl.bfloat16:
                    # G - I in bf16, so a bf16 M multiplies on the tensor cores (the sm_90
                    # PTX has wgmma; with an fp32 operand it has fp32 FMAs, datasheet rate
                    # 67 against 990 TFLOP/s). It moves the bf16 gradient's error from
                    # 2.1-2.8e-3 to 2.6-3.3e-3 of its largest entry on five shapes (CPU
                    # emulation: test_bf16_rounding_of_gram_emulated). Not for fp16: Gram
                    # entries past 65504 would overflow it.
                    acc = tl.dot(a, b.to(tl.bfloat16), acc, input_precision=PRECISION,
                                 out_dtype=acc_dtype)
                else:
                    acc = tl.dot(a.to(acc_dtype), _operand(b, ROUND), acc,
                                 input_precision=PRECISION, out_dtype=acc_dtype)
            scale = 4.0 * upstream / (r * r).to(acc_dtype)
            tl.store(grad + off + rm[:, None] * s_row + rn[None, :] * s_col,
                     (acc * scale).to(grad.dtype.element_ty),
                     mask=(rm[:, None] < rows) & (rn[None, :] < r))
            tile += num_progs
        first = last


def _configs(names: tuple[str, ...], shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """(block sizes..., warps, stages) rows -> configs."""
    return [triton.Config(dict(zip(names, shape[:-2])), num_warps=shape[-2],
                          num_stages=shape[-1]) for shape in shapes]


# On a GPU the block sizes are tuned per (matrix count, largest rank, most rows) bucket,
# among shapes that ptxas spills little for on sm_90 (none in bf16, one 96 bytes per thread
# in fp32 with TF32: `python -m bench.kernel_resources`, bench/results/sm90-kernel-resources-
# 2026-12-02.md); a 128-wide Gram tile, 4 warps on a 64-wide Gram or a 128-row gradient
# tile spilled when compiled the same way (2026-12-02, by hand; not tabled).
# The interpreter runs one fixed config each; the tests run every GPU config through it.
GRAM_CONFIGS = _configs(("BLOCK_R", "BLOCK_K"), [(32, 32, 4, 2), (32, 32, 8, 3), (64, 32, 8, 2),
                                                 (64, 32, 8, 3), (64, 64, 8, 2)])
GRAD_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                        [(32, 32, 32, 4, 2), (32, 32, 32, 8, 3), (64, 64, 32, 8, 2),
                         (64, 64, 32, 8, 3), (128, 64, 32, 8, 2)])
_FIXED_GRAM = _configs(("BLOCK_R", "BLOCK_K"), [(32, 32, 4, 1)])
_FIXED_GRAD = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [(32, 32, 32, 4, 1)])

_TUNING = dict(key=["num_mats", "max_rank", "max_rows", "ALIGNED", "PRECISION", "ROUND"],
               prune_configs_by={
    "early_config_prune": lambda configs, named_args, **kwargs: tuning_choices(configs)})
_gram_loss_tuned = triton.autotune(_FIXED_GRAM if _INTERPRET else GRAM_CONFIGS,
                                   reset_to_zero=["partials"], **_TUNING)(_gram_loss_kernel)
_grad_tuned = triton.autotune(_FIXED_GRAD if _INTERPRET else GRAD_CONFIGS, **_TUNING)(_grad_kernel)


def _grid(shapes: tuple[tuple[int, int], ...], block_a: int, block_b: int, gram: bool,
          cap: int) -> tuple[int]:
    """Persistent grid: one program per tile, at most `cap` (at least 1 to launch)."""
    if gram:  # upper-triangle block pairs of every r x r Gram
        tiles = sum(triton.cdiv(r, block_a) * (triton.cdiv(r, block_a) + 1) // 2
                    for _, r in shapes)
    else:
        tiles = sum(triton.cdiv(rows, block_a) * triton.cdiv(r, block_b) for rows, r in shapes)
    return (max(1, min(cap, tiles)),)


@functools.lru_cache(maxsize=8)
def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERP_PROGRAMS
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _dot_settings(precision: str) -> tuple[str, str]:
    """(`tl.dot` input precision, operand rounding `_operand` applies) of a resolved
    precision (`reference.orthogonality_precision`): TF32 and bf16 on the GPU's tensor
    cores, IEEE dots on rounded operands under the interpreter, which has neither."""
    if precision == "ieee":
        return "ieee", "none"
    if precision == "tf32":
        return ("ieee" if _INTERPRET else "tf32"), "tf32"
    return "ieee", ("bf16 emulated" if _INTERPRET else "bf16")


def gram_loss(flat: torch.Tensor, table: torch.Tensor, shapes: tuple[tuple[int, int], ...],
              gram_numel: int, acc_dtype: torch.dtype, aligned: bool,
              precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Launch 1: (loss scalar, flat `G - I` of every matrix), both in `acc_dtype`.
    `aligned`: every matrix row-major, every rank a multiple of 8 (`aligned_layout`);
    `precision`: of the Gram's dots (`_dot_settings`)."""
    gram = torch.empty(gram_numel, dtype=acc_dtype, device=flat.device)
    cap = _max_programs(flat.device)
    partials = torch.zeros(cap, dtype=acc_dtype, device=flat.device)
    grid = lambda meta: _grid(shapes, meta["BLOCK_R"], 0, True, cap)  # noqa: E731
    dot, rounding = _dot_settings(precision)
    _gram_loss_tuned[grid](flat, table, gram, partials, len(shapes), *_tune_keys(shapes),
                           ALIGNED=aligned, PRECISION=dot, ROUND=rounding, **COMPILE_OPTIONS)
    return partials.sum(), gram


def grad(flat: torch.Tensor, table: torch.Tensor, shapes: tuple[tuple[int, int], ...],
         gram: torch.Tensor, grad_out: torch.Tensor, aligned: bool,
         precision: str = "ieee") -> torch.Tensor:
    """Launch 2: `4 M (G - I) / r^2 * grad_out` for every matrix, laid out like `flat`."""
    out = torch.empty_like(flat)
    cap = _max_programs(flat.device)
    upstream = grad_out.reshape(1).to(gram.dtype)
    grid = lambda meta: _grid(shapes, meta["BLOCK_M"], meta["BLOCK_N"], False, cap)  # noqa: E731
    dot, rounding = _dot_settings(precision)
    _grad_tuned[grid](flat, table, gram, upstream, out, len(shapes), *_tune_keys(shapes),
                      ALIGNED=aligned, PRECISION=dot, ROUND=rounding, **COMPILE_OPTIONS)
    return out


def _tune_keys(shapes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(max_rank, max_rows): autotune keys only (the kernels do not read them), bucketed to
    powers of two so a model pruned to nearby ranks reuses its tuning."""
    return (triton.next_power_of_2(max(r for _, r in shapes)),
            triton.next_power_of_2(max(rows for rows, _ in shapes)))


# ------------------------------------------------------------- packing and custom ops
@reused_across_steps
def matrix_table(key: MatrixKey, device: torch.device) -> tuple[Tensor, int]:
    """(int64 table on `device`, Gram buffer size) for matrices of the given layouts; rows
    follow `TABLE_COLS`. Cached: rebuilt only when shapes change."""
    rows_out, offset, gram_offset = [], 0, 0
    for rows, r, col_major in key:
        strides = (1, rows) if col_major else (r, 1)
        rows_out.append((offset, rows, r, *strides, gram_offset))
        offset += rows * r
        gram_offset += r * r
    return torch.tensor(rows_out, dtype=torch.int64, device=device), gram_offset


def pack_matrices(mats: Sequence[Tensor]) -> tuple[Tensor, MatrixKey]:
    """One flat buffer of all matrices (promoted to a common dtype) and their layout key."""
    _, dtype = common_operands("orthogonality_loss", mats)
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
                   aligned: bool, precision: str) -> tuple[Tensor, Tensor]:
    """(sum ||M^T M - I||_F^2 / r^2, flat G - I of every matrix) in one launch.
    `shapes` is (rows, r) per matrix, flattened: the host sizes the grid from it;
    `aligned`: see `aligned_layout`; `precision`: resolved ("ieee", "tf32", "bf16")."""
    return gram_loss(flat, table, _pairs(shapes), gram_numel, acc_dtype(flat.dtype), aligned,
                     precision)


@_orthogonality.register_fake
def _(flat, table, shapes, gram_numel, aligned, precision):
    acc = acc_dtype(flat.dtype)
    return flat.new_empty((), dtype=acc), flat.new_empty(gram_numel, dtype=acc)


@torch.library.custom_op("svdkern::orthogonality_grad", mutates_args=())
def _orthogonality_grad(flat: Tensor, table: Tensor, shapes: list[int], gram: Tensor,
                        grad_out: Tensor, aligned: bool, precision: str) -> Tensor:
    """`4 M (G - I) / r^2 * grad_out` for every matrix, laid out like `flat`, in one launch."""
    return grad(flat, table, _pairs(shapes), gram, grad_out, aligned, precision)


@_orthogonality_grad.register_fake
def _(flat, table, shapes, gram, grad_out, aligned, precision):
    return torch.empty_like(flat)


def _orthogonality_setup(ctx, inputs, output) -> None:
    flat, table, shapes, _, aligned, precision = inputs
    ctx.save_for_backward(flat, table, output[1])
    ctx.shapes, ctx.aligned, ctx.precision = shapes, aligned, precision


def _orthogonality_backward(ctx, grad_loss: Tensor, _grad_gram: Tensor):
    flat, table, gram = ctx.saved_tensors
    if differentiable.building_graph():
        return differentiable.reference_grads(
            lambda f: reference.orthogonality_loss(unpack_matrices(f, table), ctx.precision),
            (flat,), (True,), grad_loss) + (None,) * 5
    grad = _orthogonality_grad(flat, table, ctx.shapes, gram, grad_loss, ctx.aligned,
                               ctx.precision)
    return grad, None, None, None, None, None


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


def orthogonality_loss(mats: Sequence[Tensor], precision: str | None = None) -> Tensor:
    """`sum ||M^T M - I||_F^2 / r^2` over 2-D matrices of any shapes: two Triton launches
    (loss forward, gradient backward) for the whole list; `precision` as
    `svdkern.ops.orthogonality_loss` takes it."""
    flat, key = pack_matrices(mats)
    table, gram_numel = matrix_table(key, flat.device)
    shapes = [n for rows, r, _ in key for n in (rows, r)]
    resolved = reference.orthogonality_precision(precision, flat.dtype, flat.device)
    return _orthogonality(flat, table, shapes, gram_numel, aligned_layout(key), resolved)[0]
