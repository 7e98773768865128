"""Grouped orthogonality and segmented L1/Hoyer Triton kernels against the float64
reference (value and gradient). On CPU they run through Triton's interpreter (conftest sets
TRITON_INTERPRET=1): fp32 with IEEE dots, fp16 and fp64; bf16 and TF32 need a GPU and are in
the CUDA-only tests at the end."""
import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import svdkern
from svdkern import backend, ops, reference
from tests.helpers import compile_for_sm90, config_id, distinct_blocks

triton = pytest.importorskip("triton")
from svdkern.kernels import orthogonality as O  # noqa: E402  (needs Triton)
from svdkern.kernels import sparsity as S  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Exact fp32 dots, as the float64 reference holds them to 1e-5 (a GPU's default is TF32).
orthogonality_ieee = functools.partial(ops.orthogonality_loss, precision="ieee")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# tall, square, rank 1, wide (rows < r), ranks off every block size, r > one 32-wide Gram tile
SHAPES = [(37, 5), (20, 20), (9, 1), (3, 17), (70, 40), (1, 1)]


def rand_matrices(shapes, dtype, seed=0):
    """Near-orthonormal-scale random matrices (Gram entries of order 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, r, generator=gen, dtype=torch.float64) / rows ** 0.5)
            .to(DEVICE, dtype) for rows, r in shapes]


def assert_close(actual, expected, dtype, what):
    err = (actual.double() - expected.double()).abs().max().item()
    # relative to the largest entry; the floor covers exact zeros (Hoyer of a length-1 s)
    scale = max(expected.double().abs().max().item(), 1e-2)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def check_against_reference(loss_fn, ref_fn, inputs, dtype, what, views=None):
    """Loss and every input gradient on the triton backend vs the float64 reference (on
    float64 copies), with a non-unit upstream gradient; `views` (one function per input)
    feeds the losses views of the leaves instead of the leaves."""
    views = views or [lambda t: t] * len(inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with backend.use("triton"):
        loss = loss_fn([view(t) for t, view in zip(leaves, views)])
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.shape == ()
    upstream = torch.tensor(0.7, dtype=loss.dtype, device=DEVICE)
    loss.backward(upstream)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    ref_loss = ref_fn([view(t) for t, view in zip(refs, views)])
    ref_loss.backward(upstream.double())
    # the loss accumulates in fp32 (fp64) whatever the inputs: hold it to that tolerance
    assert_close(loss, ref_loss, loss.dtype, f"{what} loss")
    for i, (leaf, ref) in enumerate(zip(leaves, refs)):
        assert leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad, ref.grad, dtype, f"{what} grad {i}")


# Error of each precision mode against the exact float64 loss and gradient (relative to the
# loss, and to the gradient's largest entry), measured on MODE_SHAPES at 1e-6 / 5e-7 (IEEE),
# 6e-5 / 1e-3 (TF32) and 2e-4 / 1e-2 (bf16): docs/SPEC.md section 4.
MODE_BOUNDS = {"ieee": (1e-6, 1e-5), "tf32": (5e-4, 3e-3), "bf16": (2e-3, 3e-2)}
MODE_SHAPES = SHAPES + [(300, 130)]


def check_precision_mode(mats, precision, backend_name):
    """The loss and gradients at `precision` (None: the device's default) within the mode's
    bound of the exact float64 values, and close to the reference's emulation of the same
    mode: within fp32 rounding for the loss; the kernels' gradient dot also reads G - I at
    that precision, which the reference's does not (1e-3 TF32, 5e-3 bf16)."""
    resolved = reference.orthogonality_precision(precision, torch.float32, mats[0].device)
    exact = [M.detach().double().requires_grad_() for M in mats]
    emulated = [M.detach().double().requires_grad_() for M in mats]
    leaves = [M.detach().clone().requires_grad_() for M in mats]
    with backend.use(backend_name):
        loss = ops.orthogonality_loss(leaves, precision=precision)
    loss.backward()
    exact_loss = reference.orthogonality_loss(exact)
    exact_loss.backward()
    emulated_loss = reference.orthogonality_loss(emulated, resolved)
    emulated_loss.backward()
    loss_bound, grad_bound = MODE_BOUNDS[resolved]
    assert abs(loss.item() - exact_loss.item()) <= loss_bound * exact_loss.item(), resolved
    assert abs(loss.item() - emulated_loss.item()) <= 1e-5 * exact_loss.item(), resolved
    same_mode = {"tf32": 1e-3, "bf16": 5e-3}.get(resolved, 1e-5) if backend_name == "triton" \
        else 1e-5
    for leaf, ex, em in zip(leaves, exact, emulated):
        scale = ex.grad.abs().max().item()
        assert (leaf.grad.double() - ex.grad).abs().max().item() <= grad_bound * scale, resolved
        assert (leaf.grad.double() - em.grad).abs().max().item() <= same_mode * scale, resolved


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_each_precision_mode_is_within_its_bound(precision, backend_name):
    """TF32 and bf16 run on CPU too (emulated by rounding), with the errors documented."""
    check_precision_mode(rand_matrices(MODE_SHAPES, torch.float32), precision, backend_name)


def test_the_default_precision_and_the_dtypes_it_applies_to():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert reference.orthogonality_precision(None, torch.float32, cpu) == "ieee"
    assert reference.orthogonality_precision(None, torch.float32, gpu) == "tf32"
    assert reference.orthogonality_precision("bf16", torch.float32, cpu) == "bf16"
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert reference.orthogonality_precision("tf32", dtype, gpu) == "ieee"
    with pytest.raises(ValueError, match="precision must be None or one of"):
        ops.orthogonality_loss(rand_matrices([(5, 2)], torch.float32), precision="fp8")
    with pytest.raises(ValueError, match="SVDRegularizer: precision"):
        svdkern.SVDRegularizer(svdkern.decompose(nn.Linear(4, 3)), precision="half")
    model = svdkern.decompose(nn.Linear(40, 30))
    exact = svdkern.SVDRegularizer(model, sparsity=None, precision="ieee")()
    rounded = svdkern.SVDRegularizer(model, sparsity=None, precision="bf16")()
    assert exact.item() != rounded.item()  # the setting reaches the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_orthogonality_mixed_shapes(dtype):
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            rand_matrices(SHAPES, dtype), dtype, f"{dtype} mix")


@pytest.mark.parametrize("shape", [(45, 45), (80, 70), (4, 1)])
def test_orthogonality_single_matrix(shape):
    """One matrix; the larger ones also tile their Gram into 2 x 2 and 3 x 3 blocks of 32
    (upper triangle computed, mirrored)."""
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            rand_matrices([shape], torch.float32), torch.float32, "single")


def test_orthogonality_non_contiguous():
    """Transposed (column-major: packed in its own layout, read through its strides) and
    strided slices."""
    mats = rand_matrices([(19, 33), (40, 6), (21, 18), (35, 20)], torch.float32, seed=1)
    views = [lambda t: t.t(), lambda t: t[::2], lambda t: t[:, 1:], lambda t: t.t()[:, :-1]]
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss, mats,
                            torch.float32, "views", views)


@settings(max_examples=12, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 40)), min_size=1,
                       max_size=4),
       lengths=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 16))
def test_random_shapes(shapes, lengths, seed):
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            rand_matrices(shapes, torch.float32, seed), torch.float32, "ortho")
    check_against_reference(ops.hoyer_loss, reference.hoyer_loss,
                            rand_vectors(lengths, torch.float32, seed), torch.float32, "hoyer")
    check_against_reference(ops.hoyer_square_loss, reference.hoyer_square_loss,
                            rand_vectors(lengths, torch.float32, seed), torch.float32,
                            "hoyer_square")


def test_hoyer_square_against_hand_computed_values():
    """(||s||_1 / ||s||_2)^2 and its gradient 2 H (sign(s) / ||s||_2 - ||s||_1 s / ||s||_2^3),
    by hand for s = (3, -4, 0) and (2,): H^2 = 49 / 25 and 1."""
    s = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64, requires_grad=True)
    one = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    for fn in (reference.hoyer_square_loss, ops.hoyer_square_loss):
        s.grad = one.grad = None
        with backend.use("triton"):
            loss = fn([s, one])
        assert abs(loss.item() - (49 / 25 + 1)) < 1e-12
        loss.backward()
        h, n1, n2 = 7 / 5, 7.0, 5.0
        want = [2 * h * (sign / n2 - n1 * x / n2 ** 3) for x, sign in ((3, 1), (-4, -1), (0, 0))]
        torch.testing.assert_close(s.grad, torch.tensor(want, dtype=torch.float64))
        torch.testing.assert_close(one.grad, torch.zeros(1, dtype=torch.float64))


# For the GPU block shapes: a Gram of three 64-wide (five 32-wide) blocks, two row blocks of
# the tallest gradient tile, rank 1, wide (rows < r), ranks off every block size; and a mix
# the kernels take in their aligned form (row-major, every rank a multiple of 8).
CONFIG_SHAPES = [(150, 70), (33, 1), (3, 17), (130, 130), (20, 20)]
ALIGNED_SHAPES = [(150, 72), (33, 8), (3, 16), (130, 136), (20, 24)]


def test_aligned_layout_needs_row_major_ranks_multiple_of_8():
    def key(shapes, col_major=False):
        return tuple((rows, r, col_major) for rows, r in shapes)
    assert O.aligned_layout(key(ALIGNED_SHAPES))
    assert not O.aligned_layout(key(CONFIG_SHAPES))
    assert not O.aligned_layout(key(ALIGNED_SHAPES, col_major=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_orthogonality_aligned_layout(dtype):
    """The aligned kernels (told that rows and matrices start 16 bytes apart) against the
    reference, with a column-major matrix making the same mix take the general ones."""
    mats = rand_matrices(ALIGNED_SHAPES, dtype, seed=3)
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss, mats, dtype,
                            "aligned")
    views = [lambda t: t] * (len(mats) - 1) + [lambda t: t.t().contiguous().t()]
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss, mats, dtype,
                            "general", views)


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter; a GPU checks the configs it tunes to")
@pytest.mark.parametrize("kernel, cfg", [("_gram_loss_tuned", c)
                                         for c in distinct_blocks(O.GRAM_CONFIGS)] +
                         [("_grad_tuned", c) for c in distinct_blocks(O.GRAD_CONFIGS)],
                         ids=lambda v: config_id(v) if isinstance(v, triton.Config) else v)
def test_every_orthogonality_block_shape_matches_reference(monkeypatch, kernel, cfg):
    """The autotuner may pick any of these on a GPU: each one, run alone through the
    interpreter, gives the reference loss and gradients, in the general and aligned forms."""
    tuned = getattr(O, kernel)
    monkeypatch.setattr(tuned, "configs", [cfg])
    for shapes in (CONFIG_SHAPES, ALIGNED_SHAPES):
        check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                                rand_matrices(shapes, torch.float32), torch.float32,
                                config_id(cfg))
    assert tuned.best_config is cfg  # the patched list reached the launches


def test_fp16_gradient_of_large_factors_stays_finite():
    """Gram entries past fp16's 65504 (column norms of 16 * sqrt(300)): the gradient keeps
    G - I in fp32 for fp16 factors, so it is finite and matches the reference."""
    M = torch.randn(300, 128, generator=torch.Generator().manual_seed(0)) * 16
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            [M.to(DEVICE, torch.float16)], torch.float16, "fp16 large")


def test_orthogonality_exact_for_orthonormal():
    """Orthonormal columns give zero loss and zero gradient (up to rounding)."""
    Q = torch.linalg.qr(torch.randn(50, 33, dtype=torch.float64))[0].to(DEVICE)
    Q.requires_grad_()
    with backend.use("triton"):
        loss = ops.orthogonality_loss([Q, Q[:, :1]])
    loss.backward()
    assert loss.item() < 1e-24 and Q.grad.abs().max().item() < 1e-13


def rand_vectors(lengths, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, generator=gen, dtype=torch.float64) for n in lengths]
    if out[0].numel() > 1:
        out[0][0] = 0.0  # sign(0) = 0, as autograd of abs (an all-zero s is 0/0 in Hoyer)
    return [v.to(DEVICE, dtype) for v in out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_sparsity(kind, dtype):
    """Segments of length 1, odd, and longer than one 256-wide chunk."""
    loss_fn, ref_fn = getattr(ops, f"{kind}_loss"), getattr(reference, f"{kind}_loss")
    check_against_reference(loss_fn, ref_fn, rand_vectors([7, 1, 300, 513], dtype), dtype,
                            f"{kind} {dtype}")


@pytest.mark.parametrize("kind", ["l1", "hoyer", "hoyer_square"])
def test_sparsity_single_and_strided(kind):
    loss_fn, ref_fn = getattr(ops, f"{kind}_loss"), getattr(reference, f"{kind}_loss")
    base = rand_vectors([40], torch.float32)[0]
    for views in ([base], [base[::3], base[1:2]]):
        leaves = [v.detach().clone().requires_grad_() for v in views]
        with backend.use("triton"):
            loss = loss_fn(leaves)
        loss.backward()
        refs = [v.detach().double().requires_grad_() for v in views]
        ref_fn(refs).backward()
        assert_close(loss, ref_fn(refs), torch.float32, kind)
        for leaf, ref in zip(leaves, refs):
            assert_close(leaf.grad, ref.grad, torch.float32, kind)


@pytest.mark.parametrize("scale", [1e-14, 1e14, 1e-23, 1e30])
def test_hoyer_gradient_far_from_unit_scale(scale):
    """||s||^3 leaves fp32 beyond ||s|| ~ 7e12 or below ~ 1e-13, s^2 below ~ 1e-19 or beyond
    ~ 1e19: the kernel forms neither (it returned a zero gradient at 1e14, inf at 1e-23).
    Errors relative to the largest entry, no floor."""
    s = (rand_vectors([50], torch.float64, seed=3)[0] * scale).float().requires_grad_()
    with backend.use("triton"):
        ops.hoyer_loss([s]).backward()
    ref = s.detach().double().requires_grad_()
    reference.hoyer_loss([ref]).backward()
    err = (s.grad.double() - ref.grad).abs().max() / ref.grad.abs().max()
    assert err <= TOL[torch.float32], f"relative error {err:.3g}"


def test_hoyer_of_a_segment_whose_peak_is_subnormal():
    """max|s| below fp32's normal range: 1 / max|s| overflowed (NaN loss); s / max|s| does not."""
    s = (torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64) * 2e-39).float()
    s = s.to(DEVICE).requires_grad_()
    with backend.use("triton"):
        loss = ops.hoyer_loss([s])
    loss.backward()
    ref = s.detach().double().requires_grad_()
    ref_loss = reference.hoyer_loss([ref])
    ref_loss.backward()
    assert_close(loss, ref_loss, torch.float32, "loss")
    err = (s.grad.double() - ref.grad).abs().max() / ref.grad.abs().max()
    assert err <= TOL[torch.float32], f"relative error {err:.3g}"


def test_all_zero_singular_values_add_nothing():
    """Hoyer of an all-zero s is 0 with gradient 0 on both paths (it was 0/0 = NaN, which one
    optimizer step wrote into the model); the other vectors are unaffected."""
    svals = [torch.zeros(3, device=DEVICE), torch.tensor([0.5, -0.25, 0.1], device=DEVICE)]
    for name in ("triton", "reference"):
        leaves = [s.clone().requires_grad_() for s in svals]
        with backend.use(name):
            loss = ops.hoyer_loss(leaves)
        loss.backward()
        alone = svals[1].clone().requires_grad_()
        reference.hoyer_loss([alone]).backward()
        assert_close(loss, reference.hoyer_loss([svals[1]]), torch.float32, name)
        assert torch.equal(leaves[0].grad, torch.zeros(3, device=DEVICE))
        assert_close(leaves[1].grad, alone.grad, torch.float32, name)
        zero = svals[0].clone().requires_grad_()  # a gradient penalty: second order too
        with backend.use(name):
            (grad,) = torch.autograd.grad(ops.hoyer_loss([zero]), zero, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum() + grad.sum(), zero)
        assert torch.equal(second, torch.zeros(3, device=DEVICE)), second


@pytest.mark.parametrize("rows,r", [(300, 31), (1024, 128), (4608, 512), (768, 768), (64, 64)])
def test_bf16_rounding_of_gram_emulated(rows, r):
    """Why the bf16 gradient launch may round `G - I` to bf16 (tensor cores): emulated on
    CPU (a record of the trade, not a kernel test), the bf16 gradient's error grows by less
    than half (2.1-2.8e-3 to 2.6-3.3e-3 of its largest entry on these shapes), most of the
    error being the bf16 output itself."""
    M = (torch.randn(rows, r, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
         / rows ** 0.5).bfloat16()
    M64 = M.double()
    truth = 4 * M64 @ (M64.t() @ M64 - torch.eye(r, dtype=torch.float64)) / r ** 2
    gram = M.float().t() @ M.float() - torch.eye(r)
    errors = [((4 * M.float() @ g / r ** 2).bfloat16().double() - truth).abs().max()
              / truth.abs().max() for g in (gram, gram.bfloat16().float())]
    assert errors[1] <= 1.45 * errors[0] and errors[1] < 3.5e-3, errors


class _Penalty(nn.Module):
    def __init__(self):
        super().__init__()
        self.U = nn.Parameter(torch.randn(12, 4, device=DEVICE))
        self.s = nn.Parameter(torch.rand(4, device=DEVICE) + 0.1)

    def forward(self):
        return ops.orthogonality_loss([self.U]) + ops.hoyer_loss([self.s])


@pytest.mark.parametrize("first", ["inference_mode", "non-strict export", "fake mode"])
def test_cached_tables_stay_usable_for_training(first):
    """Tables built by a penalty logged under inference mode, by a non-strict `torch.export`
    or under a FakeTensorMode (memory estimates) must not be what a later training step gets
    from the cache (it could not save an inference tensor; it returned FakeTensors)."""
    penalty = _Penalty()
    O.matrix_table.cache_clear()
    S.segment_offsets.cache_clear()
    with backend.use("triton"):
        if first == "inference_mode":
            with torch.inference_mode():
                penalty()
        elif first == "non-strict export":
            torch.export.export(penalty, (), strict=False)
        else:
            with FakeTensorMode() as mode:
                fake = [mode.from_tensor(p) for p in (penalty.U, penalty.s)]
                ops.orthogonality_loss(fake[:1]) + ops.hoyer_loss(fake[1:])
        loss = penalty()
        loss.backward()
    assert type(loss) is torch.Tensor and type(penalty.U.grad) is torch.Tensor
    refs = [p.detach().double().requires_grad_() for p in (penalty.U, penalty.s)]
    ref = reference.orthogonality_loss(refs[:1]) + reference.hoyer_loss(refs[1:])
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(penalty.U.grad, refs[0].grad, torch.float32, "U grad")
    assert_close(penalty.s.grad, refs[1].grad, torch.float32, "s grad")


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.Linear(10, 37))
    return svdkern.decompose(model).to(DEVICE)


def regularizer_grads(model, reg, name):
    model.zero_grad()
    with backend.use(name):
        loss = reg()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("sparsity", ["hoyer", "hoyer_square", "l1"])
def test_regularizer_matches_reference_before_and_after_prune(sparsity):
    """SVDRegularizer on the triton backend equals the reference backend, also after a
    prune that changes ranks (the cached layout table is rebuilt for the new shapes)."""
    model = small_model()
    with torch.no_grad():  # perturb so that U, V are not exactly orthonormal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reg = svdkern.SVDRegularizer(model, ortho=1.0, sparsity=sparsity, strength=0.3)
    O.matrix_table.cache_clear()
    for step in ("decomposed", "pruned"):
        if step == "pruned":
            ranks = [layer.rank for _, layer in svdkern.svd_layers(model)]
            svdkern.prune(model, energy=0.2)
            assert [layer.rank for _, layer in svdkern.svd_layers(model)] != ranks
        loss, grads = regularizer_grads(model, reg, "triton")
        ref_loss, ref_grads = regularizer_grads(model, reg, "reference")
        assert_close(loss, ref_loss, torch.float32, step)
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        for n in grads:
            assert_close(grads[n], ref_grads[n], torch.float32, f"{step} {n}")
    assert O.matrix_table.cache_info().misses == 2  # one layout per rank set


def test_table_cached_between_steps():
    mats = rand_matrices([(11, 3), (12, 4)], torch.float32)
    with backend.use("triton"):
        ops.orthogonality_loss(mats)
        before = O.matrix_table.cache_info()
        ops.orthogonality_loss(mats)
        after = O.matrix_table.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_auto_backend_on_cpu_uses_reference(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("auto picks triton on CUDA")

    def fail(*args):
        raise AssertionError("triton path taken")
    monkeypatch.setattr(O, "orthogonality_loss", fail)
    monkeypatch.setattr(S, "hoyer_loss", fail)
    with backend.use("auto"):
        ops.orthogonality_loss(rand_matrices([(5, 2)], torch.float32))
        ops.hoyer_loss(rand_vectors([4], torch.float32))


def test_bad_inputs():
    with backend.use("triton"):
        with pytest.raises(ValueError, match="expected 2-D"):
            ops.orthogonality_loss([torch.randn(2, 3, 4, device=DEVICE)])
        with pytest.raises(ValueError, match="floating point"):
            ops.orthogonality_loss([torch.randn(3, 2, device=DEVICE),
                                    torch.ones(3, 2, dtype=torch.int64, device=DEVICE)])
        with pytest.raises(ValueError, match="got no"):
            ops.orthogonality_loss([])
        with pytest.raises(ValueError, match="vector 1 is empty"):
            ops.l1_loss([torch.randn(3, device=DEVICE), torch.randn(0, device=DEVICE)])


def test_opcheck():
    tests = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    for shapes_in, precision in (([(9, 3), (5, 5)], "ieee"),  # general and aligned layouts
                                 ([(9, 8), (5, 16)], "bf16")):
        flat, key = O.pack_matrices(rand_matrices(shapes_in, torch.float32))
        table, gram_numel = O.matrix_table(key, flat.device)
        shapes = [n for rows, r, _ in key for n in (rows, r)]
        aligned = O.aligned_layout(key)
        flat.requires_grad_()
        torch.library.opcheck(O._orthogonality,
                              (flat, table, shapes, gram_numel, aligned, precision),
                              test_utils=tests)
        _, gram = O._orthogonality(flat.detach(), table, shapes, gram_numel, aligned, precision)
        torch.library.opcheck(O._orthogonality_grad,
                              (flat.detach(), table, shapes, gram, torch.tensor(1.0), aligned,
                               precision), test_utils=tests)
    svals = torch.randn(12, device=DEVICE, requires_grad=True)
    offsets = S.segment_offsets((5, 7), svals.device)
    for hoyer in (False, True):
        torch.library.opcheck(S._sparsity, (svals, offsets, hoyer),
                              test_utils=tests)


def test_torch_compile_fullgraph():
    """The custom ops trace into one graph (their fake implementations) and run the kernels."""
    mats = [m.requires_grad_() for m in rand_matrices([(9, 3), (20, 17)], torch.float32)]
    svals = [v.requires_grad_() for v in rand_vectors([5, 2], torch.float32)]

    def regularizer(mats, svals):
        return O.orthogonality_loss(mats) + S.hoyer_loss(svals)
    loss = torch.compile(regularizer, backend="aot_eager", fullgraph=True)(mats, svals)
    loss.backward()
    refs = [t.detach().double().requires_grad_() for t in mats + svals]
    ref = reference.orthogonality_loss(refs[:2]) + reference.hoyer_loss(refs[2:])
    ref.backward()
    assert_close(loss, ref, torch.float32, "compiled loss")
    for t, r in zip(mats + svals, refs):
        assert_close(t.grad, r.grad, torch.float32, "compiled grad")


def test_bf16_on_cpu_is_read_as_fp32():
    """The interpreter has no bf16: bf16 factors are packed as fp32, grads come back bf16."""
    if DEVICE == "cuda":
        pytest.skip("bf16 runs natively on the GPU (test_bf16_on_gpu)")
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            rand_matrices([(37, 5), (3, 17)], torch.bfloat16), torch.bfloat16,
                            "bf16 cpu")
    check_against_reference(ops.l1_loss, reference.l1_loss,
                            rand_vectors([7, 3], torch.bfloat16), torch.bfloat16, "bf16 cpu")


# ------------------------------------------------------------------------- GPU only
@cuda_only
def test_bf16_on_gpu():
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            rand_matrices(SHAPES + [(300, 130)], torch.bfloat16),
                            torch.bfloat16, "bf16 mix")
    check_against_reference(ops.hoyer_loss, reference.hoyer_loss,
                            rand_vectors([7, 1, 300], torch.bfloat16), torch.bfloat16, "bf16")


@cuda_only
def test_autotuned_configs_match_reference(monkeypatch):
    """The test session runs untuned (conftest); here, with the tuners' caches emptied, the
    tuners time every config and the ones they keep must still be correct."""
    monkeypatch.setenv("SVDKERN_AUTOTUNE", "1")
    for kernel in (O._gram_loss_tuned, O._grad_tuned):
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "configs_timings", {}, raising=False)
    check_against_reference(orthogonality_ieee, reference.orthogonality_loss,
                            rand_matrices([(2304, 256), (512, 512), (3072, 48), (5, 1)],
                                          torch.float32), torch.float32, "tuned")
    assert len(O._gram_loss_tuned.configs_timings) > 1 and len(O._grad_tuned.configs_timings) > 1


@cuda_only
def test_tf32_is_the_default_on_gpu():
    """Without a precision the GPU runs TF32 (the loss differs from IEEE), within its bound
    of the float64 reference and within fp32 rounding of the TF32 emulation."""
    mats = rand_matrices(SHAPES + [(1000, 600)], torch.float32)
    with backend.use("triton"):
        ieee = orthogonality_ieee(mats)
        default = ops.orthogonality_loss(mats)
    assert not torch.equal(default, ieee)
    check_precision_mode(mats, None, "triton")


COMPILE_FOR_SM90 = """
from bench.kernel_resources import (compile_grad, compile_gram, compile_sparsity,
                                    matrix_instructions, wide_load_share)
from svdkern.kernels import orthogonality as O
for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("fp32", "bf16"), ("fp16", "ieee"),
                 ("bf16", "ieee"), ("fp64", "ieee")):
    for aligned in (False, True):
        for name, kernel in (("gram", compile_gram(dt, O.GRAM_CONFIGS[-1], prec, aligned)),
                             ("grad", compile_grad(dt, O.GRAD_CONFIGS[-1], prec, aligned))):
            # tensor cores for every dot but exact fp32 (IEEE), which has none, and the fp16
            # gradient, which keeps G - I in fp32 (fp16 would overflow past 65504); fp32
            # factors at precision "tf32" or "bf16" on the tensor cores too
            expected = {"fp32ieee": "fma", "fp64ieee": "mma"}.get(dt + prec, "wgmma")
            if (name, dt) == ("grad", "fp16"):
                expected = "fma"
            assert matrix_instructions(kernel) == expected, (name, dt, prec, aligned)
        if aligned and dt in ("bf16", "fp16"):  # rows known 16 bytes apart: wide loads
            assert wide_load_share(compile_gram(dt, O.GRAM_CONFIGS[-1], prec, aligned)) > 0.3
    for hoyer in (False, True):
        ptx = compile_sparsity(dt, hoyer).asm["ptx"]
        # Hoyer: ||s||_2 and the gradient's ratios correctly rounded (a GPU's default fp32
        # sqrt is approximate, and a length-1 segment's gradient must be exactly 0)
        assert not hoyer or ("sqrt.approx" not in ptx and "div.rn" in ptx), dt
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_kernels_compile_for_gpu():
    """Every kernel variant compiles for sm_90 as launched (what the interpreter cannot
    check), with its dots on the tensor cores wherever the dtype allows."""
    compile_for_sm90(COMPILE_FOR_SM90)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_rounding_keeps_nan_and_inf(precision, backend_name):
    """A NaN of any payload (0x7FFFFFFF is a GPU's) stays NaN through the rounding: a
    diverged factor must not give a finite regularizer."""
    for bits in (0x7FFFFFFF, -1, 0x7F800001):
        M = rand_matrices([(16, 8)], torch.float32)[0]
        M[3, 2] = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
        with backend.use(backend_name):
            assert torch.isnan(ops.orthogonality_loss([M], precision=precision))
    M = rand_matrices([(16, 8)], torch.float32)[0]
    M[0, 0] = float("inf")
    with backend.use(backend_name):
        assert not torch.isfinite(ops.orthogonality_loss([M], precision=precision))


def test_the_reference_rounds_the_same_under_torch_compile():
    """bf16 rounding on the fp32 bits: Inductor folds a cast round trip away."""
    x = torch.tensor([1.0048828125, -3.0009765625])
    eager = reference.dot_operand(x, "bf16")
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: reference.dot_operand(t, "bf16"), fullgraph=True)(x)
    assert torch.equal(eager, compiled) and eager[0].item() == 1.0078125
    with pytest.raises(ValueError, match="precision must be one of"):
        reference.orthogonality_loss([x.reshape(2, 1)], "highest")
