"""SVD layers inside standard PyTorch machinery: conversion keeps what the dense layers had
(sharing, frozen weights, mode, hooks) or refuses by name; meta-device init; torch.func
transforms and double backward through the Triton ops (interpreter on CPU); torch.compile
after pruning, torch.export and jit.trace with a free batch size."""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounter
from torch.nn.utils import parametrizations

import svdkern
from svdkern import SVDConv2d, SVDLinear, backend, ops, reference
from tests.helpers import rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend runs there


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


# ------------------------------------------------------------------------ conversion
def test_module_used_twice_becomes_one_svd_layer_at_both_places():
    shared = nn.Linear(4, 4).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = model(x)
    svdkern.decompose(model)
    assert isinstance(model[0], SVDLinear) and model[0] is model[2]
    assert rel_err(model(x), expected) < 1e-12
    model(x).sum().backward()
    assert model[0].U.grad is not None


def test_frozen_weights_mode_and_hooks_carry_over():
    model = mlp().double()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model.eval()
    seen = []
    handle = model[2].register_forward_hook(lambda mod, inp, out: seen.append(type(mod)))
    svdkern.decompose(model)
    assert [p.requires_grad for p in model[0].parameters()] == [False] * 4
    assert [p.requires_grad for p in model[2].parameters()] == [True, True, True, False]
    assert not any(m.training for m in model.modules())
    model(torch.randn(2, 7, dtype=torch.float64))
    assert seen == [SVDLinear]
    handle.remove()  # the handle still reaches the hook, now on the SVD layer
    model(torch.randn(2, 7, dtype=torch.float64))
    assert seen == [SVDLinear]


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def instance_forward() -> nn.Module:
    layer = nn.Linear(3, 2)
    plain = layer.forward
    layer.forward = lambda x: 2 * plain(x)  # as accelerate-style hooks patch it
    return nn.Sequential(layer)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("build, problem", [
    (lambda: nn.Sequential(Doubled(3, 2)), "Doubled has its own forward"),
    (instance_forward, "0: Linear has its own forward"),
    (lambda: nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 2))), "reparametrized"),
    (lambda: nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(2, 3, 3))), "reparametrized"),
])
def test_layers_whose_svd_form_would_differ_are_refused_by_name(build, problem):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=problem) as err:
        svdkern.decompose(model)
    assert "skip=" in str(err.value)
    assert not svdkern.svd_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=problem):  # TRP would convert them in to_svd()
        svdkern.TRP(model)


class TiedWithBody(Tied):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)


def test_tied_weights_stay_dense_with_a_warning_naming_both():
    """GPT-2's head tied to its embedding: the default call converts the rest and warns;
    with nothing else to convert it is an error naming the tie; TRP refuses it by name."""
    model = TiedWithBody()
    with pytest.warns(UserWarning, match="head .its weight is tied to emb's.*untie them") as seen:
        svdkern.decompose(model)
    assert [name for name, _ in svdkern.svd_layers(model)] == ["body"]
    assert model.head.weight is model.emb.weight
    assert len([w for w in seen if "left these modules dense" in str(w.message)]) == 1
    assert "emb (an embedding is a lookup table" in str(seen[0].message)
    with pytest.raises(ValueError, match="no layer svdkern converts .*head: its weight is tied "
                                         "to emb's"):
        svdkern.decompose(Tied())
    with pytest.raises(ValueError, match="head: its weights are tied to emb's.*skip="):
        svdkern.TRP(Tied())


def test_trp_skips_a_shared_layer_by_any_of_its_names():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 2))
    assert list(svdkern.TRP(model, skip=["2"]).layers) == ["3"]


def test_export_keeps_frozen_weights_and_mode_of_a_bare_layer():
    layer = SVDLinear(6, 5, rank=2).eval().requires_grad_(False)
    for form in ("lowrank", "dense"):
        plain = svdkern.export(layer, form)
        assert not plain.training
        assert not any(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("make", [
    lambda: SVDLinear(6, 4, rank=3),
    lambda: SVDConv2d(4, 6, 3, padding=1, groups=2, rank=2, scheme="spatial"),
])
def test_meta_construction_then_to_empty_and_reset_parameters(make):
    with torch.device("meta"):
        layer = make()
    assert layer.U.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    rows_U = layer.grouped_factors()[0]
    eye = torch.eye(layer.rank).expand(rows_U.shape[0], -1, -1)
    assert torch.allclose(rows_U.transpose(-1, -2) @ rows_U, eye, atol=1e-5)
    assert layer.rank == (3 if isinstance(layer, SVDLinear) else 2)
    assert bool(torch.isfinite(layer.weight).all())


def test_decompose_a_meta_model():
    with torch.device("meta"):
        model = svdkern.decompose(mlp())
    assert all(p.is_meta for p in model.parameters())


def test_assigning_weight_names_the_layer():
    layer = SVDLinear(3, 2, name="fc")
    for value in (torch.zeros(2, 3), nn.Parameter(torch.zeros(2, 3))):
        with pytest.raises(AttributeError, match="fc: weight is computed from the factors"):
            layer.weight = value


def test_inputs_of_any_rank_like_nn_linear():
    dense = nn.Linear(4, 3).double()
    layer = SVDLinear.from_dense(dense)
    x = torch.randn(1, 2, 1, 2, 1, 2, 1, 2, 4, dtype=torch.float64)
    assert rel_err(layer(x), dense(x)) < 1e-12


# ------------------------------------------------------------ torch.func, double backward
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_torch_func_transforms_match_the_dense_layer(backend_name):
    layer = SVDLinear.from_dense(nn.Linear(5, 4), rank=4).to(DEVICE)
    x = torch.randn(6, 5, device=DEVICE)
    with backend.use(backend_name):
        jac = torch.func.jacrev(layer)(x[0])
        params = dict(layer.named_parameters())
        per_sample = torch.func.vmap(torch.func.grad(
            lambda p, xi: torch.func.functional_call(layer, p, (xi,)).square().sum()),
            in_dims=(None, 0))(params, x)
        reg_grad = torch.func.grad(lambda s: ops.hoyer_loss([s]))(layer.s.detach())
    torch.testing.assert_close(jac, layer.weight, rtol=1e-5, atol=1e-6)
    assert per_sample["U"].shape == (6, *layer.U.shape)
    one = torch.autograd.grad(layer(x[2]).square().sum(), layer.U)[0]
    torch.testing.assert_close(per_sample["U"][2], one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg_grad, torch.autograd.grad(
        reference.hoyer_loss([layer.s]), layer.s)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_compiled_torch_func_transforms_run_the_reference(transform):
    """Inside a compiled transform too (the triton backend once ran its custom op there)."""
    layer = SVDLinear(5, 4, rank=2).to(DEVICE)
    x = torch.randn(5, device=DEVICE)
    fn = {"grad": torch.func.grad(lambda xi: layer(xi).square().sum()),
          "jacrev": torch.func.jacrev(layer)}[transform]
    torch._dynamo.reset()
    with backend.use("triton"):
        got = torch.compile(fn, fullgraph=True)(x)
    with backend.use("reference"):
        want = fn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_explain_says_a_transform_runs_the_reference():
    layer = SVDLinear(5, 4, rank=2).to(DEVICE)
    reasons = []
    with backend.use("triton"):
        torch.func.vmap(lambda xi: reasons.append(svdkern.explain(
            xi, layer.U, layer.s, layer.V).reason) or layer(xi))(torch.randn(3, 5, device=DEVICE))
    assert "torch.func transform" in reasons[0]


def penalty_gradients(fn, params):
    """Gradient of the squared gradient norm of `fn()` (a gradient penalty)."""
    grads = torch.autograd.grad(fn(), params, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), params)


@pytest.mark.parametrize("op", ["svd_linear", "orthogonality_loss", "hoyer_loss", "l1_loss"])
def test_double_backward_through_the_triton_ops_matches_reference(op):
    """A backward with create_graph=True differentiates the reference's gradient (the kernels'
    gradients are constants to autograd: the Hoyer penalty gradient came back zero)."""
    torch.manual_seed(0)
    x, U, V, b = (torch.randn(*shape, device=DEVICE, requires_grad=True)
                  for shape in ((5, 6), (4, 3), (6, 3), (4,)))
    s = (torch.rand(3, device=DEVICE) + 0.5).requires_grad_()
    fn, params = {
        "svd_linear": (lambda: ops.svd_linear(x, U, s, V, b).sin().sum(), [x, U, s, V]),
        "orthogonality_loss": (lambda: ops.orthogonality_loss([U, V.t()]), [U, V]),
        "hoyer_loss": (lambda: ops.hoyer_loss([s, V[:, 0]]), [s, V]),
        "l1_loss": (lambda: ops.l1_loss([s]) * ops.l1_loss([V[0]]), [s, V]),
    }[op]
    with backend.use("triton"):
        got = penalty_gradients(fn, params)
    with backend.use("reference"):
        want = penalty_gradients(fn, params)
    assert any(w.abs().sum() > 0 for w in want)
    for g, w in zip(got, want):  # fp32 second derivatives: relative to the largest entry
        assert (g - w).abs().max() <= 1e-4 * max(w.abs().max(), 1e-3), (g, w)


# ------------------------------------------------------------- compile, export, tracing
def test_compiled_model_recompiles_after_pruning():
    """torch < 2.13 guarded parameters through the module's dict, not their shapes: a
    compiled model kept running the graph of the old ranks."""
    model = svdkern.decompose(mlp())
    x = torch.randn(4, 7)
    frames = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=frames, fullgraph=True)
    compiled(x)
    svdkern.prune(model, energy=0.3)
    assert [layer.rank for _, layer in svdkern.svd_layers(model)] != [5, 3]
    torch.testing.assert_close(compiled(x), model(x))
    assert frames.frame_count == 2


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_regularizer_compiles_into_one_graph(backend_name):
    model = svdkern.decompose(mlp()).to(DEVICE)
    reg = svdkern.SVDRegularizer(model, sparsity="hoyer")
    x = torch.randn(4, 7, device=DEVICE)
    torch._dynamo.reset()
    with backend.use(backend_name):
        loss = torch.compile(lambda: model(x).square().mean() + reg(), fullgraph=True)
        got = torch.autograd.grad(loss(), list(model.parameters()))
        want = torch.autograd.grad(model(x).square().mean() + reg(), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("conv", [False, True])
def test_export_with_a_dynamic_batch(strict, conv):
    """The chain-vs-materialized choice must not guard on the batch size."""
    torch.manual_seed(0)
    model = svdkern.decompose(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1)) if conv else mlp())
    shape = (4, 6, 5, 5) if conv else (4, 7)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(shape),), dynamic_shapes=({0: batch},),
                                  strict=strict)
    for n in (1, 9, 700):
        x = torch.randn(n, *shape[1:])
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_jit_trace_keeps_the_batch_size_free(backend_name):
    layer = SVDLinear(6, 4, rank=2).to(DEVICE)
    with backend.use(backend_name):
        traced = torch.jit.trace(layer, torch.randn(3, 6, device=DEVICE))
    with backend.use(backend_name):
        x = torch.randn(5, 6, device=DEVICE)
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-6)


def test_fx_tracing_names_the_layer_and_works_with_svd_layers_as_leaves():
    model = svdkern.decompose(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                            nn.Linear(4 * 4 * 4, 5)))
    with pytest.raises(TypeError, match="0: torch.fx symbolic tracing cannot enter"):
        torch.fx.symbolic_trace(model)

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, svdkern.SVDLayer) or super().is_leaf_module(module, name)
    traced = torch.fx.GraphModule(model, LeafTracer().trace(model))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x))
