"""export(): plain PyTorch models computing the same function as the SVD model."""
import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDLayer
from tests.helpers import rel_err, small_cnn

PLAIN = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten)


@pytest.mark.parametrize("form", ["lowrank", "dense"])
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_export_computes_the_same_function(scheme, form):
    model = svdkern.decompose(small_cnn(), scheme=scheme)
    svdkern.prune(model, 0.2)  # low ranks so the lowrank form really splits layers
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    exported = svdkern.export(model, form)
    assert all(isinstance(m, PLAIN) for m in exported.modules())
    assert rel_err(exported(x), model(x)) < 1e-10
    assert any(isinstance(m, SVDLayer) for m in model.modules())  # input untouched


def test_lowrank_splits_only_where_cheaper():
    model = svdkern.decompose(nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20)).double())
    with torch.no_grad():
        model[0].s[5:] = 0
    svdkern.prune(model, 1e-12)
    assert model[0].rank == 5 and model[1].rank == 20
    exported = svdkern.export(model, "lowrank")
    first, second = exported[0]
    assert (first.weight.shape, second.weight.shape) == ((5, 40), (30, 5))
    assert second.bias is not None and first.bias is None
    assert isinstance(exported[1], nn.Linear) and exported[1].weight.shape == (20, 30)
    x = torch.randn(3, 40, dtype=torch.float64)
    assert rel_err(exported(x), model(x)) < 1e-10


def test_exported_model_has_fewer_parameters_after_pruning():
    model = svdkern.decompose(nn.Sequential(nn.Linear(64, 64)).double())
    svdkern.prune(model, 0.5)
    n_params = sum(p.numel() for p in svdkern.export(model).parameters())
    assert n_params < 64 * 64 + 64


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_deployed_cost_is_that_of_the_exported_model(scheme):
    """The CLI's deployed parameters are the exported model's (they counted `s` too)."""
    from types import SimpleNamespace
    from svdkern.app.pipeline import costs
    model = svdkern.decompose(small_cnn(), scheme=scheme, include=[nn.Conv2d, nn.Linear])
    svdkern.prune(model, 0.2)
    data = SimpleNamespace(test_x=torch.randn(1, 3, 10, 8, dtype=torch.float64))
    exported = svdkern.export(model, "lowrank")
    assert costs(model, data)["deployed_params"] == sum(p.numel() for p in exported.parameters())


def test_export_bare_layer_and_bad_form():
    layer = svdkern.SVDLinear(5, 4, dtype=torch.float64)
    assert isinstance(svdkern.export(layer, "dense"), nn.Linear)
    with pytest.raises(ValueError, match="form"):
        svdkern.export(layer, "tucker")


def test_export_refuses_non_finite_factors():
    model = svdkern.decompose(small_cnn())
    with torch.no_grad():
        model[0].V[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="0: V contains NaN or Inf"):
        svdkern.export(model)


def test_torch_transformer_layers_export_their_weight_read_linears_dense():
    """nn.MultiheadAttention multiplies by `out_proj.weight` itself, and
    nn.TransformerEncoderLayer reads its linears' weights (inference fast path): those are
    merged, the rest split, and the exported layer runs in both modes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                          nn.Linear(16, 16)).double()
    model = svdkern.decompose(model)
    svdkern.prune(model, 0.2)
    exported = svdkern.export(model, "lowrank")
    layer = exported[0]
    merged = (layer.linear1, layer.linear2, layer.self_attn.out_proj)
    assert all(type(m) is nn.Linear for m in merged)
    assert isinstance(exported[1], nn.Sequential)  # a plain pair where nothing reads .weight
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for train in (True, False):
        model.train(train), exported.train(train)
        with torch.no_grad():
            assert rel_err(exported(x), model(x)) < 1e-10


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch >= 2.13")
def test_linear_cross_entropy_loss_keeps_its_linear_dense():
    """nn.LinearCrossEntropyLoss multiplies by `self.linear.weight` itself."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(12, 12), "loss": nn.LinearCrossEntropyLoss(12, 7)})
    model = svdkern.decompose(model.double())
    svdkern.prune(model, 0.3)
    exported = svdkern.export(model, "lowrank")
    assert type(exported["loss"].linear) is nn.Linear
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 7, (5,))
    with torch.no_grad():
        assert rel_err(exported["loss"](exported["body"](x), y),
                       model["loss"](model["body"](x), y)) < 1e-10


@pytest.mark.parametrize("frozen", [("U", "V"), ("V",), ("U", "s"), ()])
@pytest.mark.parametrize("conv", [False, True])
def test_export_trainable_flags_follow_the_factors_folded_in(frozen, conv):
    """First layer: V^T; second: U diag(s); merged: all three. s-only training (U and V
    frozen) exports a trainable second layer and a frozen first one."""
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 8, 3) if conv else nn.Linear(12, 10)
    layer = (svdkern.SVDConv2d.from_dense(dense, rank=2) if conv
             else svdkern.SVDLinear.from_dense(dense, rank=2))
    for name in frozen:
        getattr(layer, name).requires_grad_(False)
    trains = {name: name not in frozen for name in ("U", "s", "V")}
    first, second = svdkern.export(layer, "lowrank")
    assert first.weight.requires_grad == trains["V"]
    assert second.weight.requires_grad == (trains["U"] or trains["s"])
    merged = svdkern.export(layer, "dense")
    assert merged.weight.requires_grad == any(trains.values())
    assert second.bias.requires_grad and merged.bias.requires_grad
