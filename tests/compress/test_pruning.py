"""The energy rule on hand-built spectra, and prune() on models and optimizers."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDConv2d, SVDLinear
from svdkern.reference import energy_keep_count
from tests.helpers import rel_err, small_cnn


@pytest.mark.parametrize("s, energy, kept", [
    ([4.0, 3.0, 2.0, 1.0], 0.0, 4),          # nothing may be dropped
    ([4.0, 3.0, 2.0, 1.0], 1 / 30, 3),       # drops 1 (energy 1 of 30, exactly at the bound)
    ([4.0, 3.0, 2.0, 1.0], 0.03, 4),         # 1/30 > 0.03: keeps all
    ([4.0, 3.0, 2.0, 1.0], 5 / 30, 2),       # drops 1 + 4
    ([4.0, 3.0, 2.0, 1.0], 0.99, 1),         # keeps at least rank 1
    ([1.0, -3.0, 0.0, 2.0], 0.08, 2),        # unsorted, signed: drops 0 and 1 (1/14 <= 0.08)
    ([0.0, 0.0], 0.5, 1),                    # all-zero spectrum keeps rank 1
])
def test_energy_rule_on_hand_built_spectra(s, energy, kept):
    assert energy_keep_count(torch.tensor(s), energy) == kept


def _spectrum_layer(svals):
    layer = SVDLinear(6, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.s.copy_(torch.tensor(svals, dtype=torch.float64))
    return layer


def test_prune_keeps_largest_and_matches_truncation():
    layer = _spectrum_layer([5.0, 0.1, 4.0, 0.2, 3.0])
    model = nn.Sequential(layer)
    full = layer.weight.detach().clone()
    kept_U = layer.U.detach()[:, [0, 2, 4]]
    (record,) = svdkern.prune(model, energy=0.01)
    assert (record.name, record.rank_before, record.rank_after) == ("0", 5, 3)
    assert record.energy_kept == pytest.approx(50 / 50.05)
    assert torch.equal(layer.s.detach(), torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64))
    assert torch.equal(layer.U.detach(), kept_U)
    assert layer.U.shape == (5, 3) and layer.V.shape == (6, 3)
    assert rel_err(layer.weight, full) == pytest.approx((0.05 / 50.05) ** 0.5)


@pytest.mark.parametrize("svals, rank_multiple, kept", [
    ([5.0, 0.1, 4.0, 0.2, 3.0, 0.05, 2.0], 1, 4),  # the paper's rule: 5, 4, 3, 2
    ([5.0, 0.1, 4.0, 0.2, 3.0, 0.05, 2.0], 3, 6),  # rounded up to 6: 0.2 and 0.1 come back
    ([5.0, 0.1, 4.0, 0.2, 3.0, 0.05, 2.0], 8, 7),  # never above the full rank
    ([5.0, 0.1, 4.0, 0.2, 3.0, 0.05, 2.0], 4, 4),  # already a multiple
])
def test_rank_multiple_rounds_the_kept_rank_up(svals, rank_multiple, kept):
    """`rank_multiple` keeps the next-largest singular values up to a multiple of it, so
    the factors' rows stay 16 bytes apart for the GPU kernels (SVDLinear(8, 7): r = 7)."""
    layer = SVDLinear(8, 7, dtype=torch.float64)
    with torch.no_grad():
        layer.s.copy_(torch.tensor(svals, dtype=torch.float64))
    (record,) = svdkern.prune(nn.Sequential(layer), energy=0.01, rank_multiple=rank_multiple)
    assert record.rank_after == kept == layer.rank
    expected = sorted(svals, key=abs, reverse=True)[:kept]
    assert sorted(layer.s.tolist(), reverse=True) == sorted(expected, reverse=True)


@pytest.mark.parametrize("rank_multiple", [0, 2.0, -8])
def test_bad_rank_multiple_is_an_error_before_any_change(rank_multiple):
    layer = SVDLinear(8, 7)
    with pytest.raises(ValueError, match="rank_multiple"):
        svdkern.prune(nn.Sequential(layer), energy=0.1, rank_multiple=rank_multiple)
    assert layer.rank == 7


def test_prune_keeps_parameters_and_slices_optimizer_state():
    layer = _spectrum_layer([5.0, 0.1, 4.0, 0.2, 3.0])
    model = nn.Sequential(layer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    U_param, exp_avg = layer.U, opt.state[layer.U]["exp_avg"].clone()
    svdkern.prune(model, 0.01, optimizer=opt)
    assert layer.U is U_param
    assert torch.equal(opt.state[layer.U]["exp_avg"], exp_avg[:, [0, 2, 4]])
    assert opt.state[layer.s]["exp_avg_sq"].shape == (3,)
    model(torch.randn(2, 6, dtype=torch.float64)).sum().backward()
    opt.step()  # the optimizer keeps working on the shrunk parameters


def test_prune_grouped_conv_uses_common_rank():
    conv = SVDConv2d(8, 8, 1, groups=2, dtype=torch.float64)
    with torch.no_grad():
        conv.s.copy_(torch.tensor([[3.0, 2.0, 1.0, 0.01], [3.0, 0.01, 0.02, 0.0]],
                                  dtype=torch.float64))
    svdkern.prune(nn.Sequential(conv), 0.05)
    assert conv.rank == 3  # group 0 needs 3 ranks, so both keep 3
    assert torch.equal(conv.s.detach()[1], torch.tensor([3.0, 0.01, 0.02], dtype=torch.float64))
    assert conv(torch.randn(1, 8, 5, 5, dtype=torch.float64)).shape == (1, 8, 5, 5)


@pytest.mark.parametrize("energy", [-0.1, 1.0, float("nan"), "0.1", True, np.False_,
                                    torch.tensor(False), torch.tensor([0.1, 0.2])])
def test_bad_energy_is_an_error(energy):
    with pytest.raises(ValueError, match="energy"):
        svdkern.prune(svdkern.decompose(small_cnn()), energy)


def test_non_finite_weights_leave_model_unchanged():
    model = svdkern.decompose(small_cnn())
    with torch.no_grad():
        model[6].s[0] = float("nan")
    ranks = [l.rank for _, l in svdkern.svd_layers(model)]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="6: s contains NaN"):
        svdkern.prune(model, 0.5)
    assert ranks == [l.rank for _, l in svdkern.svd_layers(model)]
    assert all(torch.equal(v, state[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())


def test_prune_without_svd_layers_is_an_error():
    with pytest.raises(ValueError, match="no SVD layers"):
        svdkern.prune(nn.Linear(3, 3), 0.1)


def test_prune_while_last_graph_is_alive_then_train_on():
    """A training loop's last `loss` keeps its graph (and autograd's gradient accumulators)
    alive across the prune: the next backward must still see the new shapes."""
    model = svdkern.decompose(small_cnn())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    loss = svdkern.SVDRegularizer(model)() + model(x).sum()
    loss.backward()
    opt.step()
    svdkern.prune(model, 0.3, optimizer=opt)
    loss = svdkern.SVDRegularizer(model)() + model(x).sum()
    loss.backward()
    opt.step()
    assert all(l.U.grad.shape == l.U.shape for _, l in svdkern.svd_layers(model))


def test_prune_and_rank_adopting_load_keep_hooks_and_attributes():
    """Pruning and a load at other ranks give the factors new data but keep each Parameter's
    Python attributes, gradient hooks and post-accumulate hooks (optimizer-in-backward)."""
    model = svdkern.decompose(small_cnn())
    layer = model[6]
    fired = []
    layer.s.tag = "kept"
    layer.s.register_hook(lambda g: fired.append(("hook", tuple(g.shape))))
    layer.U.register_post_accumulate_grad_hook(lambda p: fired.append(("post", p.grad.shape)))
    for step in (lambda: svdkern.prune(model, 0.5), lambda: model.load_state_dict(
            svdkern.decompose(small_cnn()).state_dict())):
        step()
        fired.clear()
        model(torch.randn(2, 3, 10, 8, dtype=torch.float64)).sum().backward()
        assert layer.s.tag == "kept"
        assert sorted(fired) == [("hook", tuple(layer.s.shape)), ("post", layer.U.shape)]
    assert layer.rank == svdkern.decompose(small_cnn())[6].rank  # the load restored full rank


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor: torch >= 2.5")
def test_optimizer_state_without_a_rank_axis_is_refused_before_any_change():
    """Adafactor keeps row and column factors of each matrix's second moment, which pruning
    cannot cut: a clear error before anything changes, not a failed step later."""
    model = svdkern.decompose(small_cnn())
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 10, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    ranks = [l.rank for _, l in svdkern.svd_layers(model)]
    with pytest.raises(ValueError, match=r"Adafactor state 'row_var' of layer 0 U has shape"):
        svdkern.prune(model, 0.5, optimizer=opt)
    assert ranks == [l.rank for _, l in svdkern.svd_layers(model)]
    svdkern.prune(model, 0.5)  # without it, then a new optimizer
    torch.optim.Adafactor(model.parameters(), lr=1e-2).step()


def test_prune_while_a_forward_graph_awaits_backward_then_train_on():
    """A graph not yet back-propagated (a logged loss kept with its graph) holds the factors,
    so they cannot be swapped; the fallback must still leave autograd no accumulator of the
    old shape for the next backward."""
    model = svdkern.decompose(small_cnn())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    model(x).sum().backward()
    opt.step()
    kept = model(x).sum()  # noqa: F841  (alive across the prune)
    svdkern.prune(model, 0.3, optimizer=opt)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert all(l.U.grad.shape == l.U.shape for _, l in svdkern.svd_layers(model))


def test_parametrized_factors_are_refused_before_any_change():
    model = svdkern.decompose(small_cnn())
    torch.nn.utils.parametrize.register_parametrization(model[6], "s", nn.Identity())
    ranks = [l.rank for _, l in svdkern.svd_layers(model)]
    with pytest.raises(ValueError, match="layer 6 has parametrized factors"):
        svdkern.prune(model, 0.5)
    assert ranks == [l.rank for _, l in svdkern.svd_layers(model)]


def test_an_ema_copy_is_pruned_by_the_same_plan():
    """README recipe: the model's plan applied to an AveragedModel keeps it updatable."""
    model = svdkern.decompose(small_cnn(torch.float32))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ema.update_parameters(model)
    plans = svdkern.compress.pruning.plan(model, 0.3)
    svdkern.compress.pruning.apply_plan(plans)
    ema_layers = dict(svdkern.svd_layers(ema.module))
    svdkern.compress.pruning.apply_plan([(name, ema_layers[name], index) for name, _, index in plans])
    assert [l.rank for _, l in svdkern.svd_layers(ema.module)] == \
        [l.rank for _, l in svdkern.svd_layers(model)]
    ema.update_parameters(model)
    x = torch.randn(2, 3, 10, 8)
    assert ema(x).shape == model(x).shape


def test_threshold_pruning_keeps_the_values_at_or_above_it_and_at_least_one():
    """Value rule (official --sensitivity) on hand-set spectra: |s| >= t kept, rank >= 1."""
    model = svdkern.decompose(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double())
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([1.0, -5.0, 2.0, 4.0, 2.5], dtype=torch.float64))
        model[1].s.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    U0, V0 = model[0].U.detach().clone(), model[0].V.detach().clone()
    records = svdkern.prune(model, threshold=2.5)
    assert [r.rank_after for r in records] == [3, 1]  # |-5|, 4, 2.5 kept; 0.4 alone (>= 1)
    assert model[0].s.tolist() == [-5.0, 4.0, 2.5]
    assert torch.equal(model[0].U, U0[:, [1, 3, 4]]) and torch.equal(model[0].V, V0[:, [1, 3, 4]])
    assert model[1].s.tolist() == [0.4]


@pytest.mark.parametrize("kwargs,match", [
    (dict(energy=0.1, threshold=0.5), "exactly one of energy and threshold"),
    (dict(), "exactly one of energy and threshold"),
    (dict(threshold=-1.0), "threshold must be a finite number >= 0"),
    (dict(threshold=float("inf")), "threshold must be a finite number >= 0"),
    (dict(threshold=True), "threshold must be a finite number >= 0"),
    (dict(threshold="0.1"), "threshold must be a finite number >= 0"),
])
def test_the_pruning_rule_is_checked(kwargs, match):
    model = svdkern.decompose(nn.Sequential(nn.Linear(6, 5)))
    with pytest.raises(ValueError, match=match):
        svdkern.prune(model, **kwargs)
    assert model[0].rank == 5
