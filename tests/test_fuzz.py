"""Property tests (hypothesis) over random shapes, ranks, dtypes, strides and energies:
the ops against the reference on float64 copies, `decompose` exact, `prune` obeying the
energy rule and equal to the truncated SVD, `export` computing the same function, and
NaN/Inf caught where it matters (pruning, export) and propagated like PyTorch in forward."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import svdkern
from svdkern import backend, dispatch, ops, reference
from svdkern.layers import SVDLayer

# CI runs a small fixed set of examples; SVDKERN_FUZZ_EXAMPLES=N runs N random ones per test.
EXAMPLES = os.environ.get("SVDKERN_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(EXAMPLES or 20), deadline=None, derandomize=EXAMPLES is None)
DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "permuted", "sliced"])
# every layer converted, rank-1 ones too (decompose leaves those dense by default)
EVERY_LAYER = ["*"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def randn(gen, *shape, dtype=torch.float64, layout="contiguous"):
    """Random tensor with the requested memory layout (same values whatever the layout)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "permuted" and t.dim() >= 2:
        perm = list(range(t.dim()))[::-1]
        return t.permute(perm).contiguous().permute(perm)
    if layout == "sliced":
        big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


def leaves(*tensors):
    """Differentiable float64 copies (the reference's inputs) of the op's inputs."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def check_op_against_reference(op, ref, inputs, dtype):
    """Value and every input gradient of `op` (in `dtype`) vs `ref` on float64 copies."""
    ins = [None if t is None else t.detach().requires_grad_() for t in inputs]
    ref_ins = leaves(*inputs)
    out, expected = op(*ins), ref(*ref_ins)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])
    gy = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    used = [t for t in ins if t is not None]
    grads = torch.autograd.grad(out, used, gy.to(dtype))
    ref_grads = torch.autograd.grad(expected, [t for t in ref_ins if t is not None], gy)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])


@st.composite
def linear_case(draw):
    m, n = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    return dict(m=m, n=n, r=draw(st.integers(1, min(m, n))),
                lead=draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)),
                bias=draw(st.booleans()), dtype=draw(DTYPES), layout=draw(LAYOUTS),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def dense_linear(x, U, s, V, b):
    """Ground truth of every linear path: one dense GEMM on `W = U diag(s) V^T`, written out
    here rather than taken from svdkern."""
    return F.linear(x, (U * s) @ V.transpose(0, 1), b)


def linear_paths(dtype):
    """Every path `svd_linear` may take for `dtype` on CPU: the fused kernel runs through
    Triton's interpreter (conftest sets TRITON_INTERPRET=1) where it can."""
    fused_ok = backend.triton_can_run(torch.device("cpu")) and dtype in dispatch.FUSED_DTYPES
    return {name: fn for name, fn in ops.LINEAR_PATHS.items() if name != "fused" or fused_ok}


@FUZZ
@given(linear_case())
def test_every_svd_linear_path_matches_the_dense_layer(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dt, lay, m, n, r = case["dtype"], case["layout"], case["m"], case["n"], case["r"]
    x = randn(gen, *case["lead"], n, dtype=dt, layout=lay)
    U = randn(gen, r, m, dtype=dt).t()  # factors transposed views: non-contiguous
    s = randn(gen, r, dtype=dt)
    V = randn(gen, n, r, dtype=dt, layout=lay)
    b = randn(gen, m, dtype=dt) if case["bias"] else None
    paths = linear_paths(dt)
    if dt == torch.float32 and backend.triton_installed():
        assert "fused" in paths  # the interpreter runs the kernel: it must be fuzzed too
    for fn in (*paths.values(), ops.svd_linear):
        check_op_against_reference(fn, dense_linear, [x, U, s, V, b], dt)


@st.composite
def conv_spec(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["zeros", "zeros", "circular"]))
    return reference.ConvSpec(
        in_channels=groups * draw(st.integers(1, 3)), out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=(kh, kw), stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 1)), draw(st.integers(0, 1))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), groups=groups,
        padding_mode=mode, scheme=draw(st.sampled_from(reference.SCHEMES)))


def input_hw(spec, draw):
    """A spatial size the kernel fits in (and circular padding can wrap)."""
    return tuple(max(d * (k - 1) + 1, 2) + draw(st.integers(0, 3))
                 for k, d in zip(spec.kernel_size, spec.dilation))


def dense_conv(spec, dtype=torch.float64, bias=True):
    return nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride,
                     spec.padding, spec.dilation, spec.groups, bias, spec.padding_mode,
                     dtype=dtype)


def dense_conv_of_factors(spec):
    """Ground truth of every conv path: `nn.Conv2d`'s own forward (padding modes included)
    on the weight built from the factors."""
    def run(x, U, s, V, b):
        conv = dense_conv(spec, bias=b is not None)
        params = {"weight": reference.conv_weight(U, s, V, spec)}
        if b is not None:
            params["bias"] = b
        return torch.func.functional_call(conv, params, (x,))
    return run


@FUZZ
@given(conv_spec(), st.data())
def test_every_svd_conv_path_matches_the_dense_conv(spec, data):
    dt, lay = data.draw(DTYPES), data.draw(LAYOUTS)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
    rows, cols = spec.matrix_shape
    r = data.draw(st.integers(1, min(rows, cols)))
    x = randn(gen, data.draw(st.integers(1, 2)), spec.in_channels, *input_hw(spec, data.draw),
              dtype=dt, layout=lay)
    U = randn(gen, spec.groups, rows, r, dtype=dt, layout=lay)
    s = randn(gen, spec.groups, r, dtype=dt)
    V = randn(gen, spec.groups, cols, r, dtype=dt, layout=lay)
    b = randn(gen, spec.out_channels, dtype=dt) if data.draw(st.booleans()) else None
    for fn in (*ops.CONV_PATHS.values(), ops.svd_conv):
        check_op_against_reference(lambda *a: fn(*a, spec), dense_conv_of_factors(spec),
                                   [x, U, s, V, b], dt)


@FUZZ
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=4),
       DTYPES, LAYOUTS, st.integers(0, 2 ** 31 - 1))
def test_regularizer_ops_match_reference(shapes, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    mats = [randn(gen, rows, min(rows, cols), dtype=dtype, layout=layout) for rows, cols in shapes]
    svals = [randn(gen, cols, dtype=dtype) for _, cols in shapes]
    check_op_against_reference(lambda *m: ops.orthogonality_loss(m),
                               lambda *m: reference.orthogonality_loss(m), mats, dtype)
    for op, ref in ((ops.l1_loss, reference.l1_loss), (ops.hoyer_loss, reference.hoyer_loss)):
        check_op_against_reference(lambda *v: op(v), lambda *v: ref(v), svals, dtype)


@st.composite
def dense_model(draw):
    """A float64 model of a random Linear or Conv2d layer and its input."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    if draw(st.booleans()):
        m, n = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        layer = nn.Linear(n, m, bias=draw(st.booleans()), dtype=torch.float64)
        x = randn(gen, draw(st.integers(1, 4)), n)
    else:
        spec = draw(conv_spec())
        layer = dense_conv(spec, bias=draw(st.booleans()))
        x = randn(gen, 2, spec.in_channels, *input_hw(spec, draw))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(gen, *p.shape))
    scheme = draw(st.sampled_from(reference.SCHEMES))
    return nn.Sequential(layer), x, scheme


@FUZZ
@given(dense_model())
def test_decompose_is_exact(case):
    model, x, scheme = case
    expected = model(x)
    svd = svdkern.decompose(copy.deepcopy(model), scheme=scheme, include=EVERY_LAYER)
    assert isinstance(svd[0], SVDLayer)
    torch.testing.assert_close(svd(x), expected, rtol=1e-10, atol=1e-10)


def with_spectrum(model, spectrum_seed, decay):
    """Give every group of the (decomposed) layer a geometric spectrum of random scale."""
    layer = model[0]
    gen = torch.Generator().manual_seed(spectrum_seed)
    with torch.no_grad():
        s = layer._to_grouped(layer.s)
        sv = torch.rand(s.shape, generator=gen, dtype=s.dtype) * decay ** torch.arange(
            s.shape[-1], dtype=s.dtype)
        layer.set_factors(layer._to_grouped(layer.U), torch.sort(sv, descending=True).values,
                          layer._to_grouped(layer.V))
    return model


def matrices(layer, weight):
    """A layer's dense weight as its per-group matrices (g, rows, cols)."""
    if hasattr(layer, "spec"):
        return reference.conv_weight_to_matrix(weight, layer.spec)
    return weight.unsqueeze(0)


@FUZZ
@given(dense_model(), st.floats(0.0, 0.99), st.floats(0.2, 1.0), st.integers(0, 2 ** 31 - 1))
def test_prune_obeys_the_energy_rule_and_is_the_truncated_svd(case, energy, decay, seed):
    model, x, scheme = case
    model = with_spectrum(svdkern.decompose(model, scheme=scheme, include=EVERY_LAYER), seed, decay)
    layer = model[0]
    s_before = layer._to_grouped(layer.s).detach().clone()
    weight_before = layer.weight.detach().clone()
    record, = svdkern.prune(model, energy)
    k = layer.rank
    assert 1 <= k == record.rank_after <= record.rank_before
    for group in s_before:  # within each group, sorted descending by construction
        e2 = group.pow(2)
        assert e2[k:].sum() <= energy * e2.sum() * (1 + 1e-12)
    if layer.num_groups == 1 and k > 1:  # maximal: dropping one more breaks the rule
        e2 = s_before[0].pow(2)
        assert e2[k - 1:].sum() > energy * e2.sum()
    truncated = reference.materialize(*reference.svd_factors(matrices(layer, weight_before), k))
    pruned = matrices(layer, layer.weight.detach())
    torch.testing.assert_close(pruned, truncated, rtol=1e-9, atol=1e-9)


@FUZZ
@given(dense_model(), st.floats(0.0, 0.5), st.sampled_from(["lowrank", "dense"]))
def test_export_computes_the_same_function(case, energy, form):
    model, x, scheme = case
    model = svdkern.decompose(model, scheme=scheme, include=EVERY_LAYER)
    svdkern.prune(model, energy)
    expected = model(x)
    plain = svdkern.export(model, form)
    assert not any(isinstance(m, SVDLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-10)


@FUZZ
@given(dense_model(), st.sampled_from(["U", "s", "V"]), st.sampled_from([float("nan"),
       float("inf"), float("-inf")]), st.integers(0, 10 ** 6))
def test_nonfinite_factors_are_caught_by_prune_and_export(case, pname, bad, where):
    model, x, scheme = case
    model = svdkern.decompose(model, scheme=scheme, include=EVERY_LAYER)
    param = getattr(model[0], pname)
    with torch.no_grad():
        param[torch.unravel_index(torch.tensor(where % param.numel()), param.shape)] = bad
    before = copy.deepcopy(model.state_dict())
    for action in (lambda: svdkern.prune(model, 0.1), lambda: svdkern.export(model)):
        with pytest.raises(ValueError, match=f"{model[0].layer_name}: {pname} contains NaN or Inf"):
            action()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(model(x)).all()  # forward propagates like nn.Linear/Conv2d


@FUZZ
@given(st.integers(1, 6), st.integers(1, 6), st.integers(2, 5), st.sampled_from(
    [float("nan"), float("inf")]), st.integers(0, 2 ** 31 - 1))
def test_nonfinite_input_rows_propagate_like_nn_linear(n, m, batch, bad, seed):
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(n, m, dtype=torch.float64)
    layer = svdkern.decompose(copy.deepcopy(dense), include=[type(dense)])
    x = randn(gen, batch, n)
    x[0, n - 1] = bad
    y, y_dense = layer(x), dense(x)
    assert not torch.isfinite(y[0]).any() and not torch.isfinite(y_dense[0]).any()
    torch.testing.assert_close(y[1:], y_dense[1:], rtol=1e-10, atol=1e-10)
