"""SVDConv1d and SVDConv3d against nn.Conv1d / nn.Conv3d in float64: forward, every
gradient, geometry, and the model-level operations (prune, export, checkpoints, TRP)."""
import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDConv1d, SVDConv3d
from tests.helpers import rel_err

CONV1D = [dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
          dict(in_channels=4, out_channels=6, kernel_size=5, dilation=2, padding=4, groups=2),
          dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="circular",
               bias=False),
          dict(in_channels=2, out_channels=3, kernel_size=1)]
CONV3D = [dict(in_channels=3, out_channels=5, kernel_size=(3, 1, 2), stride=(2, 1, 1),
               padding=(1, 0, 1)),
          dict(in_channels=4, out_channels=4, kernel_size=3, groups=2, dilation=(1, 2, 1),
               padding="same"),
          dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="reflect")]


def _inputs(dims: int, channels: int, batch: int = 2) -> torch.Tensor:
    size = {1: (9,), 3: (5, 6, 4)}[dims]
    x = torch.randn(batch, channels, *size, dtype=torch.float64).transpose(-1, -2)
    return x.contiguous().transpose(-1, -2)  # odd strides: the layer must not assume layout


@pytest.mark.parametrize("svd_type, dense_type, kwargs", [
    *((SVDConv1d, nn.Conv1d, k) for k in CONV1D), *((SVDConv3d, nn.Conv3d, k) for k in CONV3D)])
def test_from_dense_matches_forward_and_every_gradient(svd_type, dense_type, kwargs):
    torch.manual_seed(0)
    dense = dense_type(**kwargs).double()
    layer = svd_type.from_dense(dense, name="c")
    x = _inputs(layer.dims, dense.in_channels)
    x_svd = x.detach().clone().requires_grad_(True)
    x.requires_grad_(True)
    y, y_svd = dense(x), layer(x_svd)
    assert rel_err(y_svd, y) < 1e-12
    assert rel_err(layer.weight, dense.weight) < 1e-12 and layer.weight.shape == dense.weight.shape
    for attr in ("in_channels", "out_channels", "groups", "padding_mode"):
        assert getattr(layer, attr) == getattr(dense, attr)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_svd.backward(grad)
    assert rel_err(x_svd.grad, x.grad) < 1e-12
    # the factors' gradients are the dense gradient pulled back through W = U diag(s) V^T
    G = svdkern.reference.conv_weight_to_matrix(dense.weight.grad, layer.spec)
    U, s, V = layer.grouped_factors()
    gU, gs, gV = (layer._to_grouped(p.grad) for p in (layer.U, layer.s, layer.V))
    assert rel_err(gU, G @ V * s.unsqueeze(-2)) < 1e-10
    assert rel_err(gs, torch.einsum("gmr,gmn,gnr->gr", U, G, V)) < 1e-10
    assert rel_err(gV, G.transpose(1, 2) @ U * s.unsqueeze(-2)) < 1e-10
    if dense.bias is not None:
        assert rel_err(layer.bias.grad, dense.bias.grad) < 1e-12
    unbatched = _inputs(layer.dims, dense.in_channels, batch=1)[0]
    assert rel_err(layer(unbatched), dense(unbatched)) < 1e-12


@pytest.mark.parametrize("svd_type", [SVDConv1d, SVDConv3d])
def test_gradcheck_at_rank_one(svd_type):
    dense = {SVDConv1d: nn.Conv1d(3, 4, 3, padding=1), SVDConv3d: nn.Conv3d(2, 3, 2)}[svd_type]
    layer = svd_type.from_dense(dense.double(), rank=1)
    assert layer.rank == 1
    x = _inputs(layer.dims, dense.in_channels, batch=1)[..., :4].requires_grad_(True)
    torch.autograd.gradcheck(lambda x, U, s, V, b: svdkern.ops.svd_conv(x, U, s, V, b, layer.spec),
                             (x, layer.U, layer.s, layer.V, layer.bias))


def test_spatial_scheme_is_refused_by_name_for_1d_and_3d_convs():
    with pytest.raises(ValueError, match="enc.0: scheme 'spatial' splits a 2-D kernel"):
        SVDConv1d.from_dense(nn.Conv1d(2, 3, 3), scheme="spatial", name="enc.0")
    with pytest.raises(ValueError, match="SVDConv3d: scheme 'spatial'"):
        SVDConv3d(2, 3, 3, scheme="spatial")
    # a model-wide spatial scheme applies to the 2-D convs only
    model = svdkern.decompose(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3)),
                              scheme="spatial")
    assert [m.scheme for _, m in svdkern.svd_layers(model)] == ["channel", "channel"]


def test_from_scratch_shapes_and_bad_input_named():
    layer = SVDConv3d(4, 6, (3, 3, 1), groups=2, rank=2, dtype=torch.float64)
    assert layer.U.shape == (2, 3, 2) and layer.V.shape == (2, 18, 2)
    assert layer.weight.shape == nn.Conv3d(4, 6, (3, 3, 1), groups=2).weight.shape
    with pytest.raises(ValueError, match="SVDConv3d: expected input with 4 features at dim -4"):
        layer(torch.randn(1, 3, 4, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="SVDConv1d: rank 9 out of range"):
        SVDConv1d(2, 3, 3, rank=9)


def _conv1d_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, groups=16, padding=1),  # depthwise: rank 1
                         nn.Conv1d(16, 24, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24 * 9, 5)).double()


def test_conv1d_network_prune_export_checkpoint_and_artifact(tmp_path):
    net = _conv1d_net()
    x = torch.randn(4, 3, 20, dtype=torch.float64)
    expected = net(x)
    with pytest.warns(UserWarning, match=r"2 \(its per-group weight matrix is 1x3"):
        model = svdkern.decompose(net)
    assert [n for n, _ in svdkern.svd_layers(model)] == ["0", "3", "6"]
    assert rel_err(model(x), expected) < 1e-12
    svdkern.prune(model, energy=0.3)
    assert model[0].rank < 16
    pruned = model(x)
    for form in ("lowrank", "dense"):
        plain = svdkern.export(model, form)
        assert not svdkern.svd_layers(plain)
        assert rel_err(plain(x), pruned) < 1e-10
    assert isinstance(svdkern.export(model, "lowrank")[0], nn.Sequential)
    svdkern.save(model, tmp_path / "ckpt.pt")
    fresh = _decomposed()  # at full rank; the load resizes it to the pruned ranks
    svdkern.load(fresh, tmp_path / "ckpt.pt")
    assert rel_err(fresh(x), pruned) < 1e-12 and fresh[0].rank == model[0].rank
    svdkern.save_compressed(model, tmp_path / "art")
    loaded = svdkern.load_compressed(_conv1d_net(), tmp_path / "art")
    assert isinstance(loaded[0], nn.Sequential) and isinstance(loaded[0][0], nn.Conv1d)
    assert rel_err(loaded(x), pruned) < 1e-10


def _decomposed() -> nn.Module:
    with pytest.warns(UserWarning, match="rank <= 1"):
        return svdkern.decompose(_conv1d_net())


def test_trp_truncates_conv1d_and_conv3d_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 6, 3)).double()
    trp = svdkern.TRP(model, energy=0.3, period=1)
    loss = model(torch.randn(2, 4, 8, dtype=torch.float64)).square().sum()
    loss.backward()
    trp.after_backward()
    trp.after_step()
    # TRP takes its SVDs in fp32: the dropped singular values are fp32 round-off
    assert torch.linalg.matrix_rank(model[0].weight.reshape(6, -1), atol=1e-6) == trp.ranks["0"]
    low = trp.to_svd()
    assert isinstance(low[0], SVDConv1d) and low[0].rank == trp.ranks["0"]
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    assert rel_err(low(x), model(x)) < 1e-6  # the fp32 round-off TRP's truncation left
    cube = nn.Conv3d(2, 4, 2).double()
    trp3 = svdkern.TRP(cube, energy=0.5, period=1)
    trp3.truncate()
    assert isinstance(trp3.to_svd(), SVDConv3d)


def test_compiles_fullgraph():
    layer = SVDConv1d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 11)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
