"""The per-call dispatch of svd_linear / svd_conv: FLOP model, backend rules, explain(),
and that each path computes the reference result."""
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from svdkern import SVDConv2d, backend, dispatch, ops, reference
from svdkern.dispatch import MAX_FUSED_RANK
from tests.helpers import run_script, run_without_interpreter

pytest.importorskip("triton")
# Where Triton runs here: CUDA, else CPU through the interpreter (set by conftest).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def factors(n, m, r, rows=1, dtype=torch.float64, lead=(), device=DEVICE):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, rows, n, generator=gen, dtype=dtype)
    tensors = (x, torch.randn(m, r, generator=gen, dtype=dtype),
               torch.rand(r, generator=gen, dtype=dtype), torch.randn(n, r, generator=gen, dtype=dtype))
    return tuple(t.to(device) for t in tensors)


class OpsCalled(TorchDispatchMode):
    """Records the aten/custom ops a block dispatches."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_linear_flop_counts():
    assert dispatch.linear_flops(rows=10, n=6, m=4, r=3) == (2 * 10 * 3 * 10, 2 * 4 * 6 * 3 + 2 * 10 * 24)


@pytest.mark.parametrize("rows,expected", [(63, "chain"), (64, "chain"), (65, "materialized")])
def test_full_rank_square_crosses_over_at_batch_equal_rank(rows, expected):
    """n = m = r = k: chain 4 B k^2, materialized 2 k^3 + 2 B k^2: materialized iff B > k."""
    x, U, s, V = factors(64, 64, 64, rows)
    with backend.use("auto"):
        assert dispatch.explain(x, U, s, V).path == expected


@pytest.mark.parametrize("n,m,r,rows,expected", [
    (512, 512, 16, 4096, "chain"),          # low rank: chain far cheaper
    (512, 256, 256, 4096, "materialized"),  # full rank, large batch
    (512, 256, 256, 8, "chain"),            # full rank, tiny batch: building W dominates
    (768, 3072, 48, 1, "chain"),            # decode-style single row at rank n/16
])
def test_auto_picks_the_cheaper_path(n, m, r, rows, expected):
    x, U, s, V = factors(n, m, r, rows)
    with backend.use("auto"):
        plan = dispatch.explain(x, U, s, V)
    assert plan.path == expected
    chain, mat = dispatch.linear_flops(rows, n, m, r)
    assert (plan.chain_flops, plan.materialized_flops) == (chain, mat)
    assert "FLOPs" in str(plan)


@pytest.mark.parametrize("name", ["reference", "auto", "triton"])
def test_zero_input_features_give_the_bias_like_nn_linear(name):
    """`nn.Linear(0, m)` returns its bias; so must the dispatch (it divided by n)."""
    x, U, s, V = factors(0, 5, 1, rows=3, dtype=torch.float32)
    bias = torch.randn(5, device=DEVICE)
    with backend.use(name):
        assert dispatch.explain(x, U, s, V).chain_flops == 2 * 3 * 1 * 5  # the U GEMM alone
        y = ops.svd_linear(x, U, s, V, bias)
    assert torch.equal(y, bias.expand(3, 5))


def test_reference_backend_always_runs_the_chain():
    x, U, s, V = factors(64, 64, 64, 1000, dtype=torch.float32)
    with backend.use("reference"):
        assert dispatch.explain(x, U, s, V).path == "chain"
        with OpsCalled() as seen:
            ops.svd_linear(x, U, s, V)
    assert "svdkern.svd_linear_fwd" not in seen.names and "aten.linear" not in seen.names


@pytest.mark.parametrize("env,expected", [("reference", "chain"), ("triton", "fused")])
def test_environment_variable_forces_the_path(env, expected):
    """SVDKERN_BACKEND is read once, at import, in the process it is set for."""
    done = run_script("import torch, svdkern\n"
                      "x, U, s, V = torch.randn(1000, 64), torch.randn(64, 64), torch.rand(64), "
                      "torch.randn(64, 64)\n"
                      "print(svdkern.explain(x, U, s, V).path)\n",
                      SVDKERN_BACKEND=env, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [expected]


def test_use_overrides_the_backend_in_its_own_thread_only():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def hold_reference():
        with backend.use("reference"):
            seen["holder"] = backend.requested()
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold_reference)
    holder.start()
    inside.wait(10)
    with backend.use("triton"):
        seen["main"] = backend.requested()
    release.set()
    holder.join(10)
    assert seen == {"holder": "reference", "main": "triton"}
    assert backend.requested() == backend._ENV_BACKEND


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU fallback rules")
def test_auto_on_cpu_never_runs_triton():
    x, U, s, V = factors(40, 30, 4, 50, dtype=torch.float32, device="cpu")
    with backend.use("auto"):
        plan = dispatch.explain(x, U, s, V)
        with OpsCalled() as seen:
            ops.svd_linear(x, U, s, V)
    assert plan.path == "chain" and "Triton cannot run" in plan.reason
    assert "svdkern.svd_linear_fwd" not in seen.names


def test_triton_backend_runs_the_fused_kernel_whatever_the_cost():
    x, U, s, V = factors(40, 30, 30, 500, dtype=torch.float32)
    with backend.use("triton"):
        assert dispatch.explain(x, U, s, V).path == "fused"
        with OpsCalled() as seen:
            y = ops.svd_linear(x, U, s, V)
    assert "svdkern.svd_linear_fwd" in seen.names
    torch.testing.assert_close(y.double(), reference.svd_linear(*(t.double() for t in (x, U, s, V))),
                               rtol=1e-5, atol=1e-4)


def test_triton_backend_beyond_the_fused_rank_falls_back_by_cost():
    k = MAX_FUSED_RANK + 2
    with backend.use("triton"):
        assert dispatch.explain(*factors(k, k, k, 1, dtype=torch.float32)).path == "chain"
        plan = dispatch.explain(*factors(k, k, k, 4 * k, dtype=torch.float32))
        assert plan.path == "materialized"
        plan = dispatch.explain(*factors(k, k, 3, 1, dtype=torch.float64))
        assert plan.path == "chain" and "dtype" in plan.reason


def test_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, U, s, V = factors(8, 8, 2, 3, dtype=torch.float32, device="cpu")
    with backend.use("triton"), pytest.raises(RuntimeError, match="SVDKERN_BACKEND=triton"):
        ops.svd_linear(x, U, s, V)


@pytest.mark.parametrize("triton_release, numpy_release, broken", [
    ((3, 6), (2, 4), True), ((3, 6), (3, 0), True), ((3, 7), (2, 4), False),
    ((3, 6), (2, 3), False), (None, (2, 4), False)])
def test_interpreter_defect_is_named_with_its_fix(monkeypatch, triton_release, numpy_release,
                                                  broken):
    """Triton < 3.7 with NumPy >= 2.4 cannot run the interpreter (triton-lang/triton#9171):
    asking for Triton on CPU then says so and how to fix it, before any kernel runs."""
    releases = {"triton": triton_release, "numpy": numpy_release}
    monkeypatch.setattr(backend, "_release", releases.get)
    defect = backend._interpreter_defect()
    assert (defect is not None) == broken
    if broken:
        assert "numpy<2.4" in defect and "triton>=3.7" in defect
        monkeypatch.setattr(backend, "_INTERPRETER_DEFECT", defect)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        x, U, s, V = factors(8, 8, 2, 3, dtype=torch.float32, device="cpu")
        with backend.use("triton"), pytest.raises(RuntimeError, match="numpy<2.4"):
            ops.svd_linear(x, U, s, V)


def test_installed_release_is_read_from_package_metadata():
    assert backend._release("torch") == tuple(int(p) for p in torch.__version__.split(".")[:2])
    assert backend._release("no-such-package-svdkern") is None


@pytest.mark.parametrize("name", ["auto", "triton", "reference"])
def test_every_path_matches_the_reference_with_gradients(name):
    """Forward and gradients of whatever path runs, at full rank and large batch (so auto
    materializes) and at low rank, against the float64 chain."""
    for n, m, r, rows in ((24, 20, 20, 60), (24, 20, 3, 7)):
        x, U, s, V = (t.float().requires_grad_() for t in factors(n, m, r, rows, lead=(2,)))
        b = torch.randn(m, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
        with backend.use(name):
            y = ops.svd_linear(x, U, s, V, b)
        grads = torch.autograd.grad(y.square().sum(), (x, U, s, V, b))
        ref_in = [t.detach().double().requires_grad_() for t in (x, U, s, V, b)]
        y_ref = reference.svd_linear(*ref_in)
        ref_grads = torch.autograd.grad(y_ref.square().sum(), ref_in)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
        for g, g_ref in zip(grads, ref_grads):  # fp32 sums of ~60 terms: relative to the largest
            assert (g.double() - g_ref).abs().max() <= 1e-5 * g_ref.abs().max(), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_runs_the_fused_kernel_at_low_rank():
    x, U, s, V = factors(1024, 1024, 64, 512, dtype=torch.float32)
    with backend.use("auto"):
        assert dispatch.explain(x, U, s, V).path == "fused"


# ----------------------------------------------------------------------------- conv
CONVS = [  # (layer kwargs, input shape)
    (dict(in_channels=16, out_channels=16, kernel_size=3, padding=1), (8, 16, 16, 16)),
    (dict(in_channels=12, out_channels=20, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2),
          dilation=(1, 2), scheme="spatial"), (3, 12, 11, 13)),
    (dict(in_channels=8, out_channels=12, kernel_size=3, groups=4), (2, 8, 7, 9)),
]


@pytest.mark.parametrize("kwargs,shape", CONVS)
@pytest.mark.parametrize("rank", [None, 2])
def test_conv_flops_match_a_count_from_the_convs_run(kwargs, shape, rank):
    """dispatch.conv_flops against 2 * outputs * weights-per-output of the convs actually run."""
    layer = SVDConv2d(**kwargs, rank=rank)
    sp = layer.spec
    x = torch.randn(shape)
    w1, w2 = reference.conv_chain_weights(layer.U, layer.s, layer.V, sp)
    geo1, geo2 = reference.conv_chain_geometry(sp)
    with torch.no_grad():
        h = reference.conv(x, w1, None, sp.groups, sp.padding_mode, **geo1)
        y = reference.conv(h, w2, None, sp.groups, sp.padding_mode, **geo2)
    chain = 2 * h.numel() * w1[0].numel() + 2 * y.numel() * w2[0].numel()
    dense = 2 * y.numel() * layer.weight[0].numel()
    rows, cols = layer.matrix_shape
    assert dispatch.conv_flops(shape, sp, layer.rank) == (chain, dense + 2 * sp.groups * rows * cols * layer.rank)
    assert layer.flops(shape[-2:]) == (chain // shape[0], dense // shape[0])


def test_conv_picks_the_cheaper_path():
    """3x3, 16 -> 16 channels on 8 x 16 x 16: full rank 16 is cheaper materialized
    (2*8*256*16*(144+16) > 2*16*144*16 + 2*8*256*16*144); rank 2 is cheaper as two convs."""
    kwargs, shape = CONVS[0]
    x = torch.randn(shape)
    full, low = SVDConv2d(**kwargs), SVDConv2d(**kwargs, rank=2)
    with backend.use("auto"):
        assert dispatch.explain(x, full.U, full.s, full.V, spec=full.spec).path == "materialized"
        assert dispatch.explain(x, low.U, low.s, low.V, spec=low.spec).path == "chain"
        assert dispatch.explain(x[0], low.U, low.s, low.V, spec=low.spec).path == "chain"
    with backend.use("reference"):
        assert dispatch.explain(x, full.U, full.s, full.V, spec=full.spec).path == "chain"


@pytest.mark.parametrize("kwargs,shape", CONVS)
@pytest.mark.parametrize("name", ["auto", "reference"])
def test_conv_paths_match_the_reference(kwargs, shape, name):
    layer = SVDConv2d(**kwargs).double()
    x = torch.randn(shape, dtype=torch.float64)
    with backend.use(name):
        y = layer(x)
    torch.testing.assert_close(y, reference.svd_conv(x, layer.U, layer.s, layer.V, layer.bias,
                                                       layer.spec))


TF32_SWITCHES = """
import torch
from svdkern.backend import dot_precision
cuda, cpu = torch.device("cuda"), torch.device("cpu")
b = torch.backends

def expect(precision):
    assert dot_precision(torch.float32, cuda) == precision, precision
    assert dot_precision(torch.bfloat16, cuda) == "ieee"
    assert dot_precision(torch.float32, cpu) == "ieee"

expect("ieee")  # PyTorch's default, as nn.Linear
b.cuda.matmul.allow_tf32 = True; expect("tf32")
b.cuda.matmul.allow_tf32 = False; expect("ieee")
torch.set_float32_matmul_precision("high"); expect("tf32")
torch.set_float32_matmul_precision("highest"); expect("ieee")
b.cuda.matmul.fp32_precision = "tf32"; expect("tf32")  # the new API: legacy getters now raise
b.cuda.matmul.fp32_precision = "ieee"; expect("ieee")
b.fp32_precision = "tf32"; b.cuda.matmul.fp32_precision = "none"; expect("tf32")  # inherited
print("ok")
"""


def test_tf32_follows_every_pytorch_switch():
    """The kernels use TF32 for fp32 exactly where PyTorch's matmuls may: the legacy flag,
    set_float32_matmul_precision and the new fp32_precision API (after which the legacy
    getters raise, so the kernels must not read them). In a subprocess, because the new
    API leaves this process's legacy getters raising, and without the interpreter, which
    is IEEE only."""
    done = run_without_interpreter(TF32_SWITCHES)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


NO_TRITON_WARNINGS = """
import warnings
import torch
from svdkern import backend, ops
# Triton 3.9 warns when a launch leaves FP fusion implicit (3.6 never does)
warnings.filterwarnings("error", category=UserWarning, module=r"triton\\.")
x = torch.randn(70, 40, device="cuda", requires_grad=True)
U, V = torch.randn(30, 8, device="cuda"), torch.randn(40, 8, device="cuda")
s = torch.rand(8, device="cuda", requires_grad=True)
with backend.use("triton"):
    ops.svd_linear(x, U, s, V).sum().backward()
    (ops.orthogonality_loss([U.requires_grad_(), V]) + ops.hoyer_loss([s])).backward()
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles and launches on a GPU")
def test_kernel_launches_raise_no_triton_warning():
    """Every launch states its compile options (kernels.COMPILE_OPTIONS), so Triton has
    nothing to warn about and results do not change with its defaults (what it checks shows
    on Triton >= 3.9, which warns about an implicit FP-fusion default)."""
    done = run_without_interpreter(NO_TRITON_WARNINGS)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_symbolic_sizes_say_what_settled_the_path():
    """Three outcomes with symbolic sizes: the sizes' ranges settle it, the large-batch
    limit does, or nothing does and the chain is the default (explain says which)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    env = ShapeEnv()
    batch, other = env.create_unbacked_symint(), env.create_unbacked_symint()
    assert dispatch.cheaper(2 * batch * 10, 500 + 2 * batch * 3, lambda: (20, 6)) == (
        "materialized", dispatch.BY_LARGE_BATCH)
    assert dispatch.cheaper(2 * batch * 3, 500 + 2 * batch * 10, lambda: (6, 20)) == (
        "chain", dispatch.BY_LARGE_BATCH)
    assert dispatch.cheaper(batch, other, lambda: (batch, other)) == ("chain", dispatch.BY_DEFAULT)
    assert "at large batch" not in dispatch._FEWER[dispatch.BY_DEFAULT]
    assert dispatch._FEWER[dispatch.BY_DEFAULT].startswith("the default")


def test_ranks_past_the_on_chip_limit_run_the_chain_and_say_why_in_bytes():
    """A kernel tiling the rank would move x and the partial y again per tile; the chain
    writes and reads h: at ViT-B's fc1 (768 -> 3072) rank 192, 768 + 6144 against 384."""
    assert dispatch.rank_tiling_bytes(768, 3072, 192) == (768 + 2 * 3072, 384)
    assert dispatch.rank_tiling_bytes(768, 3072, 512) == (3 * (768 + 2 * 3072), 1024)
    assert dispatch.rank_tiling_bytes(768, 3072, 128) == (0, 256)  # fits: no tiling
    for n, m, r in ((200, 3072, 129), (129, 129, 129), (512, 512, 512)):  # r <= min(n, m)
        tiled, chain = dispatch.rank_tiling_bytes(n, m, r)
        assert tiled > chain
    with backend.use("triton"):
        plan = dispatch.explain(*factors(768, 3072, 192, 8, dtype=torch.float32))
    assert plan.path == "chain" and "192 > 128" in plan.reason
    assert "6912 more elements per row, against the 384" in plan.reason
    assert "chain's two GEMMs move fewer bytes" in plan.reason
