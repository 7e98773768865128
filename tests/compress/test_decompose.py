"""decompose / SVD layers compute exactly the original function (float64)."""
import copy
import types
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

import svdkern
from svdkern import SVDConv2d, SVDLinear, reference
from tests.helpers import rel_err, small_cnn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (1, 5), (9, 9)])
def test_linear_decomposition_is_exact(shape, bias):
    n, m = shape
    dense = nn.Linear(n, m, bias=bias).double()
    layer = SVDLinear.from_dense(dense)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    assert layer.rank == min(n, m)
    assert rel_err(layer(x), dense(x)) < 1e-10
    assert rel_err(layer.weight, dense.weight) < 1e-10


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("conv", [
    dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(2, 1),
         dilation=(1, 2), bias=False),
    dict(in_channels=6, out_channels=4, kernel_size=3, groups=2, padding=1),
    dict(in_channels=5, out_channels=5, kernel_size=3, groups=5, dilation=2, padding=2),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=2, out_channels=3, kernel_size=1),
])
def test_conv_decomposition_is_exact(scheme, conv):
    dense = nn.Conv2d(**conv).double()
    layer = SVDConv2d.from_dense(dense, scheme=scheme)
    x = torch.randn(2, conv["in_channels"], 9, 11, dtype=torch.float64)
    assert rel_err(layer(x), dense(x)) < 1e-10
    # the two thin convs too (at full rank the dispatch may build the dense weight instead)
    chain = reference.svd_conv(x, layer.U, layer.s, layer.V, layer.bias, layer.spec)
    assert rel_err(chain, dense(x)) < 1e-10
    assert rel_err(layer.weight, dense.weight) < 1e-10
    assert layer.weight.shape == dense.weight.shape
    for attr in ("in_channels", "out_channels", "groups"):
        assert getattr(layer, attr) == getattr(dense, attr)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_decompose_model_is_exact_and_in_place(scheme):
    """Every layer converts, but the depthwise conv under the channel scheme (1 x 9 matrices
    per group: rank 1) stays dense, warned, unless `include` names it."""
    model = small_cnn()
    x = torch.randn(3, 3, 10, 8, dtype=torch.float64)
    expected = model(x)
    if scheme == "channel":
        with pytest.warns(UserWarning, match=r"2 \(its per-group weight matrix is 1x9, of rank "
                                             r"<= 1, so a factorization saves nothing"):
            out = svdkern.decompose(model, scheme=scheme)
        assert type(model[2]) is nn.Conv2d
        assert [name for name, _ in svdkern.svd_layers(model)] == ["0", "3", "4", "6"]
        model = small_cnn()
        out = svdkern.decompose(model, scheme=scheme, include=[nn.Conv2d, nn.Linear])
    else:  # spatial: the depthwise kernel's 3 x 3 matrix has rank 3
        out = svdkern.decompose(model, scheme=scheme)
    assert out is model
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    assert rel_err(model(x), expected) < 1e-10
    names = [name for name, _ in svdkern.svd_layers(model)]
    assert names == ["0", "2", "3", "4", "6"]
    assert model[2].layer_name == "2"


def test_decompose_skip_by_name_and_glob():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    svdkern.decompose(model, skip=["0.*"])
    assert type(model[0][0]) is nn.Linear and type(model[0][1]) is nn.Linear
    assert isinstance(model[1], SVDLinear)


def test_decompose_bare_layer_returns_svd_layer():
    dense = nn.Linear(5, 3).double()
    layer = svdkern.decompose(dense)
    assert isinstance(layer, SVDLinear)


def test_decompose_keeps_dtype_and_is_idempotent():
    model = nn.Sequential(nn.Linear(6, 4)).to(torch.bfloat16)
    svdkern.decompose(model)
    assert model[0].U.dtype == torch.bfloat16
    before = model[0]
    svdkern.decompose(model)
    assert model[0] is before


def test_from_scratch_layers_are_orthonormal_with_default_spectrum():
    torch.manual_seed(1)
    lin = SVDLinear(12, 7, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64)
    assert rel_err(lin.U.T @ lin.U, eye) < 1e-10
    assert rel_err(lin.V.T @ lin.V, eye) < 1e-10
    assert bool((lin.s[:-1] >= lin.s[1:]).all()) and bool((lin.s > 0).all())
    conv = SVDConv2d(4, 6, 3, scheme="spatial", rank=2, dtype=torch.float64)
    assert conv.U.shape == (1, 6 * 3, 2) and conv.V.shape == (1, 4 * 3, 2)
    assert conv(torch.randn(1, 4, 5, 5, dtype=torch.float64)).shape == (1, 6, 3, 3)


def test_truncated_rank_matches_truncated_svd():
    dense = nn.Linear(8, 6).double()
    layer = SVDLinear.from_dense(dense, rank=2)
    U, s, Vh = torch.linalg.svd(dense.weight.detach())
    assert rel_err(layer.weight, (U[:, :2] * s[:2]) @ Vh[:2]) < 1e-10


def test_weight_property_is_differentiable():
    layer = SVDLinear(5, 4, dtype=torch.float64)
    layer.weight.sum().backward()
    assert layer.U.grad is not None and layer.s.grad is not None and layer.V.grad is not None


def test_grouped_factors_and_matrices():
    conv = SVDConv2d(6, 4, 3, groups=2, dtype=torch.float64)
    U, s, V = conv.grouped_factors()
    assert U.shape == (2, 2, 2) and s.shape == (2, 2) and V.shape == (2, 27, 2)
    assert len(list(conv.factor_matrices())) == 4 and len(list(conv.singular_values())) == 2
    lin = SVDLinear(5, 3)
    assert [t.shape for t in lin.grouped_factors()] == [(1, 3, 3), (1, 3), (1, 5, 3)]
    assert copy.deepcopy(lin).rank == 3


def test_never_silent_about_what_stays_dense():
    """One warning names every module holding a matrix that stays dense, with the reason;
    a skip that matches nothing and a model with nothing to convert are errors."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Bilinear(8, 8, 8), nn.Embedding(5, 4))
    with pytest.warns(UserWarning) as seen:
        svdkern.decompose(model)
    messages = [str(w.message) for w in seen if "left these modules dense" in str(w.message)]
    assert len(messages) == 1
    assert "1 (svdkern has no SVD form of Bilinear)" in messages[0]
    assert "2 (an embedding is a lookup table" in messages[0]
    assert isinstance(model[0], svdkern.SVDLinear)
    with pytest.raises(ValueError, match=r"skip \['0.wieght'\] matches no module"):
        svdkern.decompose(nn.Sequential(nn.Linear(3, 2)), skip=["0.wieght"])
    with pytest.raises(ValueError, match="Bilinear has no layer svdkern converts .*<root>: "
                                         "svdkern has no SVD form of Bilinear"):
        svdkern.decompose(nn.Bilinear(4, 4, 4))
    with pytest.raises(ValueError, match="Conv2d has no layer svdkern converts .*<root>: its "
                                         "per-group weight matrix is 1x9, of rank <= 1"):
        svdkern.decompose(nn.Conv2d(4, 4, 3, groups=4))
    quiet = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped by the user: no warning
        svdkern.decompose(quiet, skip=["1"])


def test_a_forward_bound_back_to_its_own_class_is_accepted():
    """accelerate's remove_hook leaves `forward` on the instance as a bound method of the
    class's own function: the layer computes what its class does, so it converts."""
    layer = nn.Linear(5, 3).double()
    layer.forward = nn.Linear.forward.__get__(layer)
    model = svdkern.decompose(nn.Sequential(layer))
    assert isinstance(model[0], svdkern.SVDLinear)
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ layer.weight.t() + layer.bias)


def test_include_and_min_size_choose_the_layers_without_warnings():
    """PEFT's target_modules convention: names, globs or classes; every entry must match."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Conv2d(2, 4, 3), nn.Linear(8, 2),
                             nn.Sequential(nn.Linear(8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left dense by the user's choice: no warning
        by_glob = svdkern.decompose(build(), include=["3.*", "1"])
        by_class = svdkern.decompose(build(), include=[nn.Conv2d])
        by_size = svdkern.decompose(build(), min_size=20)
    assert [n for n, _ in svdkern.svd_layers(by_glob)] == ["1", "3.0"]
    assert [n for n, _ in svdkern.svd_layers(by_class)] == ["1"]
    assert [n for n, _ in svdkern.svd_layers(by_size)] == ["0", "1", "3.0"]  # 16-element 2 dense
    with pytest.raises(ValueError, match=r"include \['attn\*', 'LSTM'\] matches no layer svdkern converts"):
        svdkern.decompose(build(), include=["attn*", nn.LSTM, "0"])
    with pytest.raises(ValueError, match="min_size must be an integer >= 0"):
        svdkern.decompose(build(), min_size=-1)


def test_review_cases_of_matching_and_checking():
    """Generators, containers, PEFT-style suffixes, forwards bound elsewhere, lazy layers,
    choices that leave nothing, parametrized layers in the report, min_size per group."""
    def nested():
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4))
    model = svdkern.decompose(nested(), skip=(name for name in ["0"]))  # a generator, a container
    assert [n for n, _ in svdkern.svd_layers(model)] == ["1"]
    model = svdkern.decompose(nested(), include=["0"])
    assert [n for n, _ in svdkern.svd_layers(model)] == ["0.0", "0.1"]
    model = svdkern.decompose(nn.Sequential(nn.ModuleDict({"q_proj": nn.Linear(4, 4)}),
                                            nn.Linear(4, 4)), include=["q_proj"])  # PEFT suffix
    assert [n for n, _ in svdkern.svd_layers(model)] == ["0.q_proj"]

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    sub = Doubled(3, 3)
    sub.forward = types.MethodType(Doubled.forward, sub)  # bound, but the subclass's function
    other_a, other_b = nn.Linear(3, 3), nn.Linear(3, 3)
    other_b.forward = other_a.forward  # another layer's method
    for layer in (sub, other_b):
        with pytest.raises(ValueError, match="has its own forward"):
            svdkern.decompose(nn.Sequential(layer))
    with pytest.raises(ValueError, match="1: LazyLinear is not initialized yet"):
        svdkern.decompose(nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(4)))
    assert "1: svdkern converts it" in str(svdkern.coverage(nn.Sequential(nn.Linear(4, 4),
                                                                          nn.LazyLinear(4))))
    with pytest.raises(ValueError, match="leave every layer of Sequential that svdkern would "
                                         "convert dense"):
        svdkern.decompose(nested(), min_size=10 ** 6)
    normed = nn.Sequential(nn.Linear(4, 4), parametrizations.weight_norm(nn.Linear(4, 4)))
    report = svdkern.coverage(normed)
    assert dict(report.left_dense)["1"].startswith("its weight is reparametrized")
    assert not any("parametrizations" in name for name, _ in report.left_dense)
    depthwise = svdkern.decompose(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Linear(4, 4)),
                                  min_size=10)  # 9 elements per group: stays dense
    assert [n for n, _ in svdkern.svd_layers(depthwise)] == ["1"]
