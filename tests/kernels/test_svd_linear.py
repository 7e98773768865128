"""Fused Triton SVD linear kernels (forward and all five gradients) against the float64
reference chain. On CPU they run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which checks fp32 (IEEE dot) and fp16; bf16, TF32 and autotuning need a
GPU and are in the CUDA-only tests at the end."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdkern import reference
from svdkern.dispatch import MAX_FUSED_RANK
from tests.helpers import compile_for_sm90, config_id, distinct_blocks

triton = pytest.importorskip("triton")
from svdkern.kernels import svd_linear as L  # noqa: E402  (needs Triton)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_inputs(B, n, m, r, dtype, bias=True, lead=(), seed=0):
    """Random operands with unit-scale outputs, in `dtype` on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, B, n, generator=gen, dtype=torch.float64)
    U = torch.randn(m, r, generator=gen, dtype=torch.float64) / r ** 0.5
    s = torch.rand(r, generator=gen, dtype=torch.float64) * 2 - 0.5
    V = torch.randn(n, r, generator=gen, dtype=torch.float64) / n ** 0.5
    b = torch.randn(m, generator=gen, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, U, s, V, b)]


def assert_close(actual, expected, dtype, what, scale=None):
    """Error relative to `scale` (default: the largest reference entry), tolerance by dtype."""
    tol = TOL[dtype]
    scale = scale or expected.abs().max().item() or 1.0
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def check_against_reference(x, U, s, V, b, dtype, x_op=None):
    """Forward and dx, dU, ds, dV, db of the fused op vs the reference on float64 copies.
    `x_op` is the (possibly non-contiguous) tensor actually fed to the kernel."""
    x_op = x if x_op is None else x_op
    leaves = [t.detach().requires_grad_() for t in (x_op, U, s, V) + ((b,) if b is not None else ())]
    y = L.svd_linear(*leaves[:4], leaves[4] if b is not None else None)
    assert y.dtype == dtype and y.shape == (*x_op.shape[:-1], U.shape[0])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to(y.device, dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference.svd_linear(*ref_leaves[:4], ref_leaves[4] if b is not None else None)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert_close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dU", "ds", "dV", "db"), grads, ref_grads):
        assert g.shape == g_ref.shape and g.dtype == dtype, name
        assert_close(g, g_ref, dtype, name, ds_scale(ref_leaves[0], ref_leaves[1], ref_leaves[3], dy)
                     if name == "ds" else None)


def ds_scale(x, U, V, dy) -> float:
    """Largest `sum_rows |h * g|` (h = x V, g = dy U): the size of the terms `ds` sums, the
    scale its fp32 error follows at any rank. An entry of `ds` can cancel far below its
    terms (at rank 1 it is the only entry: torch's own fp32 chain then misses 1e-5 of the
    cancelled sum on some shapes)."""
    h, g = x.detach() @ V.detach(), dy.double() @ U.detach()
    return (h.abs() * g.abs()).reshape(-1, h.shape[-1]).sum(0).max().item()


# Odd sizes (no multiple of the 32-wide interpreter blocks), rank 1, full rank
# r = min(n, m), a rank padded from 33 to 64, and the on-chip cap itself.
# (16, 20, 69, 1): a rank-1 `ds` that cancels 330x below its terms (found by hypothesis).
SHAPES = [(37, 45, 29, 5), (1, 17, 19, 1), (33, 20, 12, 12), (70, 40, 71, 40),
          (65, 50, 33, 33), (19, 130, 140, MAX_FUSED_RANK), (16, 20, 69, 1)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,n,m,r", SHAPES)
def test_fp32_matches_reference(B, n, m, r, bias):
    check_against_reference(*make_inputs(B, n, m, r, torch.float32, bias), torch.float32)


@pytest.mark.parametrize("B,n,m,r", SHAPES[:4])
def test_fp16_matches_reference(B, n, m, r):
    check_against_reference(*make_inputs(B, n, m, r, torch.float16), torch.float16)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 70), n=st.integers(1, 70), m=st.integers(1, 70), data=st.data(),
       bias=st.booleans())
def test_random_shapes_match_reference(B, n, m, data, bias):
    r = data.draw(st.integers(1, min(n, m)), label="r")
    check_against_reference(*make_inputs(B, n, m, r, torch.float32, bias), torch.float32)


def test_non_contiguous_x():
    """Transposed storage (stride (1, B)) goes through the kernels' strides, no copy."""
    x, U, s, V, b = make_inputs(45, 37, 29, 7, torch.float32)
    x_t = x.t().contiguous().t()
    assert not x_t.is_contiguous()
    check_against_reference(x, U, s, V, b, torch.float32, x_op=x_t)


def test_sliced_x():
    """A column slice of a wider tensor: row stride larger than n."""
    x, U, s, V, b = make_inputs(23, 60, 21, 6, torch.float32)
    check_against_reference(x, U, s, V[:30].contiguous(), b, torch.float32, x_op=x[:, 5:35])


@pytest.mark.parametrize("bias", [True, False])
def test_3d_input(bias):
    check_against_reference(*make_inputs(11, 26, 18, 9, torch.float32, bias, lead=(3,)),
                            torch.float32)


def test_non_contiguous_3d_input():
    x, U, s, V, b = make_inputs(9, 26, 18, 9, torch.float32, lead=(4,))
    check_against_reference(x, U, s, V, b, torch.float32, x_op=x.transpose(0, 1))


def test_non_contiguous_factors_and_expanded_dy():
    """U, V stored transposed, s and bias strided views, and the stride-0 `dy` that
    `y.sum()` produces."""
    x, U, s, V, b = make_inputs(21, 34, 27, 8, torch.float32)
    s = torch.stack([s, -s], 1)[:, 0]
    b = torch.stack([b, -b], 1)[:, 0]
    assert not s.is_contiguous() and not b.is_contiguous()
    Ut = U.t().contiguous().t().requires_grad_()
    Vt = V.t().contiguous().t().requires_grad_()
    y = L.svd_linear(x, Ut, s, Vt, b)
    dU, dV = torch.autograd.grad(y.sum(), (Ut, Vt))
    Ud, Vd = U.double().requires_grad_(), V.double().requires_grad_()
    dU_ref, dV_ref = torch.autograd.grad(
        reference.svd_linear(x.double(), Ud, s.double(), Vd, b.double()).sum(), (Ud, Vd))
    assert_close(y, reference.svd_linear(x.double(), U.double(), s.double(), V.double(),
                                         b.double()), torch.float32, "y")
    assert_close(dU, dU_ref, torch.float32, "dU")
    assert_close(dV, dV_ref, torch.float32, "dV")


@pytest.mark.parametrize("trainable", [(0,), (1, 2, 3, 4), (2,)])
def test_partial_gradients(trainable):
    """Only some operands need grad (frozen input or frozen factors): those gradients match
    and the others are not computed."""
    inputs = make_inputs(29, 35, 22, 6, torch.float32)
    leaves = [t.requires_grad_(i in trainable) for i, t in enumerate(inputs)]
    y = L.svd_linear(*leaves)
    y.square().sum().backward()
    ref = [t.detach().double().requires_grad_() for t in inputs]
    reference.svd_linear(*ref).square().sum().backward()
    for i, (t, t_ref) in enumerate(zip(leaves, ref)):
        if i in trainable:
            assert_close(t.grad, t_ref.grad, torch.float32, f"grad {i}")
        else:
            assert t.grad is None


# Shapes for the GPU block shapes: two row blocks of the largest BLOCK_B, two column tiles of
# the widest BLOCK_N and a partial one of BLOCK_K, and the rank paddings 64, 128 (the cap), 16.
CONFIG_SHAPES = [(133, 75, 141, 37), (20, 130, 45, MAX_FUSED_RANK), (70, 19, 33, 1)]


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter; a GPU checks the configs it tunes to")
@pytest.mark.parametrize("cfg", distinct_blocks(L.FWD_CONFIGS), ids=config_id)
def test_every_forward_block_shape_matches_reference(monkeypatch, cfg):
    """The autotuner may pick any of these on a GPU: each one, run alone through the
    interpreter, computes the reference (masks, tiling, column groups)."""
    monkeypatch.setattr(L._fwd_kernel, "configs", [cfg])
    for B, n, m, r in CONFIG_SHAPES:
        check_against_reference(*make_inputs(B, n, m, r, torch.float32), torch.float32)
    assert L._fwd_kernel.best_config is cfg  # the patched list reached the launches


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter; a GPU checks the configs it tunes to")
@pytest.mark.parametrize("block_b", [32, 64])  # the rows per program the GPU uses
@pytest.mark.parametrize("cfg", distinct_blocks(L.BWD_CONFIGS), ids=config_id)
def test_every_backward_block_shape_matches_reference(monkeypatch, cfg, block_b):
    monkeypatch.setattr(L._bwd_rows_kernel, "configs", [cfg])
    monkeypatch.setattr(L, "_bwd_block_b", lambda r_pad: block_b)
    for B, n, m, r in CONFIG_SHAPES:
        check_against_reference(*make_inputs(B, n, m, r, torch.float32), torch.float32)
    assert L._bwd_rows_kernel.best_config is cfg


def test_aligned_factor_rows_are_those_of_ranks_multiple_of_8():
    """The kernels are told the factors' rows start 16 bytes apart only when every factor is
    row-major with a rank and a row stride that are multiples of 8."""
    def factor(rows, r):
        return torch.empty(rows, r)
    assert L._rows_start_16_bytes_apart(factor(30, 56), factor(20, 56))
    assert not L._rows_start_16_bytes_apart(factor(30, 56), factor(20, 57))
    assert not L._rows_start_16_bytes_apart(factor(30, 56).t().contiguous().t(), factor(20, 56))
    assert L._rows_start_16_bytes_apart(factor(30, 64)[:, :56], factor(20, 56))
    assert not L._rows_start_16_bytes_apart(factor(30, 60)[:, :56], factor(20, 56))


def test_backward_is_deterministic():
    """ds and db come from per-program partials summed once: bitwise reproducible."""
    x, U, s, V, b = (t.requires_grad_() for t in make_inputs(97, 33, 41, 10, torch.float32))
    dy = torch.randn(97, 41, device=DEVICE)
    first = torch.autograd.grad(L.svd_linear(x, U, s, V, b), (x, U, s, V, b), dy)
    second = torch.autograd.grad(L.svd_linear(x, U, s, V, b), (x, U, s, V, b), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_empty_batch():
    x, U, s, V, b = (t.requires_grad_() for t in make_inputs(0, 12, 10, 3, torch.float32))
    y = L.svd_linear(x, U, s, V, b)
    assert y.shape == (0, 10)
    dx, dU, ds, dV, db = torch.autograd.grad(y.sum(), (x, U, s, V, b))
    assert dx.shape == (0, 12) and not dU.any() and not ds.any() and not dV.any() and not db.any()


def test_rank_above_on_chip_cap_is_an_error():
    x, U, s, V, b = make_inputs(4, MAX_FUSED_RANK + 1, MAX_FUSED_RANK + 1, MAX_FUSED_RANK + 1,
                                torch.float32)
    with pytest.raises(ValueError, match="rank"):
        L.svd_linear(x, U, s, V, b)


def test_mixed_or_unsupported_dtypes_are_an_error():
    x, U, s, V, b = make_inputs(4, 8, 6, 2, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        L.svd_linear(x.half(), U, s, V, b)
    with pytest.raises(TypeError, match="dtype"):
        L.svd_linear(*(t.double() for t in (x, U, s, V, b)))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast under the interpreter")
def test_autocast_casts_to_the_autocast_dtype():
    """Under autocast every operand is cast (like nn.Linear) and the kernel runs in fp16."""
    x, U, s, V, b = make_inputs(25, 30, 20, 7, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        y = L.svd_linear(x, U, s, V, b)
    assert y.dtype == torch.float16
    ref = reference.svd_linear(*(t.half().double() for t in (x, U, s, V, b)))
    assert_close(y, ref, torch.float16, "y")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 stand-in")
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_on_cpu_is_read_as_fp32(autocast):
    """The interpreter has no bf16 (its bf16 dot returned values off by 1e9): bf16 operands,
    given or from CPU autocast (bf16 by default), are read as fp32 and the results rounded
    to bf16."""
    inputs = make_inputs(37, 45, 29, 5, torch.float32 if autocast else torch.bfloat16)
    if not autocast:
        check_against_reference(*inputs, torch.bfloat16)
        return
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.autocast("cpu"):
        y = L.svd_linear(*leaves)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    grads = torch.autograd.grad(y, leaves, dy)
    refs = [t.detach().bfloat16().double().requires_grad_() for t in inputs]
    ref = reference.svd_linear(*refs)
    assert_close(y, ref, torch.bfloat16, "y")
    for name, g, g_ref in zip(("dx", "dU", "ds", "dV", "db"), grads,
                              torch.autograd.grad(ref, refs, dy.double())):
        assert g.dtype == torch.float32, name  # gradients of fp32 leaves, like nn.Linear
        assert_close(g, g_ref, torch.bfloat16, name)


@pytest.mark.parametrize("operand,shape", [("V", (44, 5)), ("V", (45, 6)), ("s", (4,)),
                                           ("bias", (28,))])
def test_operands_that_disagree_in_shape_are_an_error(operand, shape):
    """The kernel sizes itself from x and U: a V, s or bias of another size would be read
    out of bounds, so it is refused, by name."""
    x, U, s, V, b = make_inputs(37, 45, 29, 5, torch.float32)
    args = dict(x=x, U=U, s=s, V=V, bias=b)
    args[operand] = torch.zeros(shape, device=DEVICE)
    with pytest.raises(ValueError, match=rf"{operand} is \({shape[0]},"):
        L.svd_linear(**args)


def test_bias_of_another_dtype_is_cast_like_the_reference():
    x, U, s, V, b = make_inputs(37, 45, 29, 5, torch.float16)
    y = L.svd_linear(x, U, s, V, b.float())
    assert y.dtype == torch.float16
    assert_close(y, reference.svd_linear(*(t.double() for t in (x, U, s, V, b))),
                 torch.float16, "y")


def test_opcheck_forward_and_backward_ops():
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (the
    backward op itself has no second derivative, so it is checked without grad inputs)."""
    x, U, s, V, b = make_inputs(19, 21, 17, 5, torch.float32)
    for args in ((x, U, s, V, b), (x, U, s, V, None)):
        torch.library.opcheck(torch.ops.svdkern.svd_linear_fwd.default,
                              tuple(t.detach().requires_grad_() if t is not None else t
                                    for t in args))
    dy = torch.randn(19, 17, device=DEVICE)
    for need_dx, need_db in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.svdkern.svd_linear_bwd_rows.default,
                              (dy, x, U, s, V, need_dx, need_db))


# ----------------------------------------------------------------------------- GPU only
@cuda_only
@pytest.mark.parametrize("B,n,m,r", [(300, 257, 193, 31), (1025, 768, 3072, 128)])
def test_bf16_matches_reference(B, n, m, r):
    check_against_reference(*make_inputs(B, n, m, r, torch.bfloat16), torch.bfloat16)


@cuda_only
def test_tf32_follows_torch_matmul_precision(monkeypatch):
    """fp32 runs IEEE at "highest" (1e-5) and TF32 at "high" (1e-3, and really TF32: the
    output changes)."""
    inputs = make_inputs(513, 384, 320, 64, torch.float32)
    check_against_reference(*inputs, torch.float32)
    ieee = L.svd_linear(*inputs)
    monkeypatch.setitem(TOL, torch.float32, 1e-3)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        check_against_reference(*inputs, torch.float32)
        assert not torch.equal(L.svd_linear(*inputs), ieee)
    finally:
        torch.set_float32_matmul_precision(previous)


@cuda_only
@pytest.mark.parametrize("B,n,m,r", [(4096, 1024, 1024, 16), (4097, 1000, 4000, 100),
                                     (8, 64, 64, 1)])
def test_autotuned_configs_match_reference(monkeypatch, B, n, m, r):
    """The test session runs untuned (conftest); here, with the tuners' caches emptied
    (an untuned choice is cached per shape key), every config is timed and the chosen one
    must still be correct."""
    monkeypatch.setenv("SVDKERN_AUTOTUNE", "1")
    for kernel in (L._fwd_kernel, L._bwd_rows_kernel):
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "configs_timings", {}, raising=False)
    check_against_reference(*make_inputs(B, n, m, r, torch.float16), torch.float16)
    assert len(L._fwd_kernel.configs_timings) > 1 and len(L._bwd_rows_kernel.configs_timings) > 1


@cuda_only
def test_autocast_cuda_bf16_like_nn_linear():
    x, U, s, V, b = make_inputs(130, 96, 80, 24, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = L.svd_linear(x, U, s, V, b)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference.svd_linear(*(t.double() for t in (x, U, s, V, b))),
                 torch.bfloat16, "y")


@cuda_only
def test_int64_offsets_beyond_2_31_elements():
    """x with more than 2^31 elements: the last rows must be addressed correctly."""
    B, n, m, r = 2 ** 21 + 3, 1040, 16, 16
    x = torch.randn(B, n, device="cuda", dtype=torch.float16)
    _, U, s, V, b = make_inputs(1, n, m, r, torch.float16)
    y = L.svd_linear(x, U, s, V, b)
    tail = x[-5:].double()
    assert_close(y[-5:], reference.svd_linear(tail, U.double(), s.double(), V.double(),
                                              b.double()), torch.float16, "y tail")


def test_autotune_prefilter_keeps_configs_within_the_register_budget(monkeypatch):
    """Before tuning on a GPU, each kernel drops the block shapes whose live fp32 values per
    thread exceed the budget for this call's rank and dtype (they spill), keeps at least two
    for every rank and dtype the kernels take, and keeps the smallest one should all exceed
    it."""
    monkeypatch.setattr(L, "_INTERPRET", False)  # the GPU backward block rows

    def kept(kernel, configs, dtype, r_pad, **kwargs):
        return kernel.early_config_prune(configs, {"x_ptr": torch.empty(0, dtype=dtype)},
                                         R_PAD=r_pad, PRECISION="ieee", **kwargs)

    def shape(c):
        return (c.kwargs.get("BLOCK_B"), c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_warps)

    fwd, bwd = L.FWD_CONFIGS, L.BWD_CONFIGS
    # the forward drops exactly the configs ptxas spilled for, compiled as launched
    # (bench/results/sm90-kernel-resources-2026-12-02.md)
    for dtype, r_pad, spilled in ((torch.bfloat16, 128, [(128, 64, 64, 4)]),
                                  (torch.float32, 128, [(128, 64, 128, 8), (128, 64, 64, 4)]),
                                  (torch.float32, 64, [(128, 64, 64, 4)])):
        dropped = [c for c in fwd if c not in kept(L._fwd_kernel, fwd, dtype, r_pad)]
        assert [shape(c) for c in dropped] == spilled, (dtype, r_pad)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for r_pad in (16, 32, 64, 128):
            block_b = L._bwd_block_b(r_pad)
            for kernel, configs, extra, accumulators in (
                    (L._fwd_kernel, fwd, {"HAS_BIAS": True}, 1),
                    (L._bwd_rows_kernel, bwd, {"BLOCK_B": block_b, "COMPUTE_DX": True}, 2)):
                chosen = kept(kernel, configs, dtype, r_pad, **extra)
                within = [c for c in configs if L.register_footprint(
                    c, c.kwargs.get("BLOCK_B", block_b), r_pad, dtype.itemsize,
                    accumulators) <= L._REGISTER_BUDGET]
                assert chosen == within and len(chosen) >= 2, (dtype, r_pad, len(chosen))
    # beyond any real rank every config is over budget: the smallest footprint remains
    assert [shape(c) for c in kept(L._fwd_kernel, fwd, torch.float32, 4096)] == [
        (16, 32, 64, 4)]


@pytest.mark.parametrize("switch", ["SVDKERN_AUTOTUNE=0", "deterministic algorithms"])
def test_untuned_kernels_take_the_first_fitting_config(monkeypatch, switch):
    """With tuning off, nothing is chosen by timing: each kernel keeps only the first config
    of its list that the register prefilter keeps for the call (runs repeat bitwise)."""
    from svdkern.kernels import orthogonality as O
    monkeypatch.setattr(L, "_INTERPRET", False)  # the GPU backward block rows
    calls = [(L._fwd_kernel, L.FWD_CONFIGS, dict(HAS_BIAS=True)),
             (L._bwd_rows_kernel, L.BWD_CONFIGS, dict(BLOCK_B=32, COMPUTE_DX=True)),
             (O._gram_loss_tuned, O.GRAM_CONFIGS, {}), (O._grad_tuned, O.GRAD_CONFIGS, {})]
    named = {"x_ptr": torch.empty(0, dtype=torch.float32)}

    def kept():
        return [kernel.early_config_prune(configs, named, R_PAD=r_pad, PRECISION="ieee", **kw)
                for kernel, configs, kw in calls for r_pad in (16, 128)]
    tuned = kept()
    assert all(len(choices) >= 2 for choices in tuned)
    if switch == "SVDKERN_AUTOTUNE=0":
        monkeypatch.setenv("SVDKERN_AUTOTUNE", "0")
        untuned = kept()
    else:
        torch.use_deterministic_algorithms(True)
        try:
            untuned = kept()
        finally:
            torch.use_deterministic_algorithms(False)
    assert untuned == [choices[:1] for choices in tuned]


LAYER_KERNELS_FOR_SM90 = """
import torch
from bench.kernel_resources import (compile_backward, compile_forward, matrix_instructions,
                                    wide_load_share)
from svdkern.kernels import svd_linear as L

def first_kept(kernel, configs, dtype, r_pad, **kwargs):
    return kernel.early_config_prune(configs, {"x_ptr": torch.empty(0, dtype=dtype)},
                                     R_PAD=r_pad, **kwargs)[0]

def both(name, dtype, precision, r_pad, flag=True, rank=None):
    fwd = first_kept(L._fwd_kernel, L.FWD_CONFIGS, dtype, r_pad)
    bwd = first_kept(L._bwd_rows_kernel, L.BWD_CONFIGS, dtype, r_pad,
                     BLOCK_B=L._bwd_block_b(r_pad))
    for kernel in (compile_forward(name, r_pad, fwd, precision, has_bias=flag, rank=rank),
                   compile_backward(name, r_pad, bwd, precision, dx=flag, db=flag, rank=rank)):
        # tensor cores for every dtype but exact fp32 (IEEE), which has none
        expected = ("fma",) if precision == "ieee" and dtype == torch.float32 else ("wgmma", "mma")
        assert matrix_instructions(kernel) in expected, (name, precision, r_pad)

for name, dtype, precision in (("fp32", torch.float32, "ieee"), ("fp32", torch.float32, "tf32"),
                               ("fp16", torch.float16, "ieee"), ("bf16", torch.bfloat16, "ieee")):
    both(name, dtype, precision, 16)
both("bf16", torch.bfloat16, "ieee", 16, flag=False)  # no bias; no dx, no db
both("bf16", torch.bfloat16, "ieee", 128)  # the on-chip rank cap
both("bf16", torch.bfloat16, "ieee", 128, rank=117)  # factor strides not divisible by 16
# a rank that is a multiple of 8 loads its factors as wide as one of 16; an odd one cannot
cfg = L.FWD_CONFIGS[0]
wide = {r: wide_load_share(compile_forward("bf16", 128, cfg, rank=r)) for r in (128, 120, 127)}
assert wide[120] == wide[128] > 2 * wide[127], wide
both("fp32", torch.float32, "tf32", 128)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_layer_kernels_compile_for_gpu():
    """The forward and backward kernels compile for sm_90, as their launchers launch them, in
    every dtype (fp32 IEEE and TF32, fp16, bf16) with bias, dx and db on, bf16 also with them
    all off, at rank paddings 16 and 128 (bf16 and TF32) and at a rank off 16, each with the
    first config the autotune prefilter keeps, and their dots on the tensor cores wherever
    the dtype allows."""
    compile_for_sm90(LAYER_KERNELS_FOR_SM90)


COUNT_COMPILES = """
import torch
from bench.kernel_resources import _Recorder, _patched, compile_key
from svdkern.kernels import svd_linear as L
ranks = list(range(1, 129, 2))[:50] + [64]  # 50 distinct odd ranks and one multiple of 8
keys = {"forward": set(), "backward": set()}
tuning = {"forward": set(), "backward": set()}
for r in ranks:
    x, U, s, V = torch.empty(512, 768), torch.empty(768, r), torch.empty(r), torch.empty(768, r)
    with _patched(L, "_fwd_kernel", _Recorder()) as fwd, \\
            _patched(L, "_target_programs", lambda device: 264):
        L.launch_forward(x, U, s, V, torch.empty(768))
    with _patched(L, "_bwd_rows_kernel", _Recorder()) as bwd:
        L.launch_backward_rows(torch.empty(512, 768), x, U, s, V, True, True)
    for name, kernel, rec in (("forward", L._fwd_kernel, fwd), ("backward", L._bwd_rows_kernel, bwd)):
        keys[name].add(compile_key(kernel, rec, kernel.configs[0]))
        tuning[name].add(tuple(rec.kwargs.get(k, rec.args[kernel.fn.arg_names.index(k)]
                                              if k in kernel.fn.arg_names[:len(rec.args)] else None)
                               for k in kernel.keys))
print("counts", len(keys["forward"]), len(keys["backward"]), len(tuning["forward"]),
      len(tuning["backward"]))
"""


def test_a_model_with_50_distinct_ranks_compiles_each_config_a_bounded_number_of_times():
    """Triton compiles a binary per argument specialization and constexpr set, and tunes per
    autotune key: the rank reaches both only through R_PAD (a power of two up to 128) and
    ALIGNED_FACTORS, so 51 ranks give at most 4 x 2 of each, not one per rank."""
    from tests.helpers import run_without_interpreter
    done = run_without_interpreter(COUNT_COMPILES)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [int(n) for n in done.stdout.split("counts")[-1].split()]
    assert all(1 <= n <= 8 for n in counts), counts
    assert "R" not in L._fwd_kernel.keys and "R" not in L._bwd_rows_kernel.keys
