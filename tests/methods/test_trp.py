"""TRP: nuclear subgradient and truncation against hand-computed cases, batching by shape,
conv schemes, export at the final ranks."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import TRP, SVDConv2d, SVDLinear, export, svd_layers
from svdkern.reference import ConvSpec, conv_matrix_to_weight, conv_weight_to_matrix


def _linear_with_weight(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def test_nuclear_subgradient_hand_computed():
    # W = diag(3, 2, 1): U = V = I. Energy 0.1 of 14 = 1.4 drops only s=1 (energy 1), so
    # k = 2 and the subgradient is nuclear * diag(1, 1, 0), added to the existing gradient.
    layer = _linear_with_weight(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
    layer.weight.grad = torch.ones(3, 3)
    TRP(layer, energy=0.1, nuclear=0.5).after_backward()
    expected = torch.ones(3, 3) + 0.5 * torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(layer.weight.grad, expected)


def test_nuclear_subgradient_rotated_matrix_full_rank():
    # energy 0: k = full rank and U V^T is the orthogonal polar factor: for W = Q diag(s),
    # Q orthogonal, U V^T = Q.
    q, _ = torch.linalg.qr(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    layer = _linear_with_weight(q @ torch.diag(torch.tensor([5.0, 0.5])))
    TRP(layer, energy=0.0, nuclear=1.0).after_backward()
    torch.testing.assert_close(layer.weight.grad, q, atol=1e-5, rtol=1e-5)


def test_truncation_every_period_steps_hand_computed():
    w = torch.diag(torch.tensor([4.0, 2.0, 0.5, 0.1]))[:, :3]  # 4x3, s = (4, 2, 0.5)
    layer = _linear_with_weight(w)
    trp = TRP(layer, energy=0.05, nuclear=0.0, period=3, schedule="per_step")
    # 0.05 * (16 + 4 + 0.25) = 1.0125: drops 0.25 only -> rank 2
    assert [trp.after_step() for _ in range(2)] == [False, False]
    torch.testing.assert_close(layer.weight.detach(), w)
    assert trp.after_step() is True
    torch.testing.assert_close(layer.weight.detach(), torch.diag(torch.tensor([4.0, 2.0, 0.0, 0.0]))[:, :3])
    assert trp.ranks == {"": 2}


def test_truncation_rounds_ranks_up_to_rank_multiple():
    w = torch.diag(torch.tensor([4.0, 2.0, 0.5, 0.1]))[:, :3]  # the energy rule keeps 2 of 3
    layer = _linear_with_weight(w)
    trp = TRP(layer, energy=0.05, nuclear=0.0, period=1, rank_multiple=3)
    trp.after_step()
    assert trp.ranks == {"": 3}
    torch.testing.assert_close(layer.weight.detach(), w)  # rank 3 of 3: nothing truncated


def test_truncation_matches_per_layer_svd_batched_by_shape():
    torch.manual_seed(0)
    mods = nn.ModuleDict({"a": nn.Linear(7, 5), "b": nn.Linear(7, 5), "c": nn.Linear(5, 3)})
    ref = {k: m.weight.detach().clone() for k, m in mods.items()}
    trp = TRP(mods, energy=0.2, nuclear=0.0)
    trp.truncate()
    for name, w in ref.items():
        U, s, Vh = torch.linalg.svd(w.double())
        e2 = s.pow(2)
        k = len(s)
        while k > 1 and e2[k - 1:].sum() <= 0.2 * e2.sum():
            k -= 1
        expected = (U[:, :k] * s[:k]) @ Vh[:k]
        assert trp.ranks[name] == k
        torch.testing.assert_close(mods[name].weight.detach().double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_truncation_uses_scheme_matrix(scheme):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, (3, 2), padding=1)
    spec = ConvSpec(3, 5, (3, 2), (1, 1), (1, 1), (1, 1), 1, "zeros", scheme)
    mat = conv_weight_to_matrix(conv.weight.detach(), spec).double()
    trp = TRP(conv, energy=0.3, nuclear=0.0, scheme=scheme)
    trp.truncate()
    k = trp.ranks[""]
    U, s, Vh = torch.linalg.svd(mat)
    expected = conv_matrix_to_weight((U[..., :k] * s[..., None, :k]) @ Vh[..., :k, :], spec)
    assert k < min(mat.shape[-2:])
    torch.testing.assert_close(conv.weight.detach().double(), expected, atol=1e-5, rtol=1e-5)


def test_to_svd_exports_at_final_ranks_and_computes_truncated_function():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 4))
    trp = TRP(model, energy=0.25, nuclear=0.0, period=1)
    trp.after_step()
    svd = trp.to_svd()
    layers = dict(svd_layers(svd))
    assert isinstance(layers["0"], SVDConv2d) and isinstance(layers["3"], SVDLinear)
    assert {n: l.rank for n, l in layers.items()} == trp.ranks
    assert all(not isinstance(m, (SVDConv2d, SVDLinear)) for m in model.modules())
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(svd(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(export(svd)(x), model(x), atol=1e-4, rtol=1e-4)


def test_nuclear_pushes_singular_values_down_under_sgd():
    torch.manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(6, 6))
    q2, _ = torch.linalg.qr(torch.randn(6, 6))
    layer = _linear_with_weight(q1 @ torch.diag(torch.arange(1.0, 7.0)) @ q2)
    before = torch.linalg.svdvals(layer.weight.detach()).sum()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    trp = TRP(layer, energy=0.0, nuclear=0.1, period=1000, schedule="per_step")
    for _ in range(3):
        opt.zero_grad()
        trp.after_backward()
        opt.step()
    after = torch.linalg.svdvals(layer.weight.detach()).sum()
    # W - lr nuclear U V^T = U (S - 0.01 I) V^T: every singular value drops by 0.01 a step
    torch.testing.assert_close(after, before - 3 * 6 * 0.01, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(energy=1.0), "energy"), (dict(nuclear=-1.0), "nuclear"), (dict(period=0), "period"),
    (dict(scheme="diag"), "scheme"), (dict(rank_multiple=0), "rank_multiple")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TRP(nn.Linear(3, 3), **kwargs)


def test_model_without_layers_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"):
        TRP(nn.ReLU())


def test_frozen_and_skipped_layers_are_left_alone():
    """A frozen weight gets no nuclear term and is never truncated; `skip` takes glob
    patterns as `decompose` does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 4))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trp = TRP(model, energy=0.5, nuclear=1e-2, period=1, skip=["3*"])
    assert sorted(trp.layers) == ["0", "2"]
    model(torch.randn(5, 6)).sum().backward()
    trp.after_backward()
    trp.after_step()
    assert model[0].weight.grad is None and torch.equal(model[0].weight, frozen)
    assert trp.ranks["0"] == 6 and trp.ranks["2"] < 6
    low = trp.to_svd()
    assert type(low[0]) is nn.Linear and isinstance(low[2], SVDLinear)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_an_error_naming_the_layer(bad):
    """NaN makes the SVD fail, Inf makes it return NaN silently: both are refused by name."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    trp = TRP(model, schedule="per_step")
    with torch.no_grad():
        model[1].weight[0, 0] = bad
    for call in (trp.after_backward, trp.truncate):
        with pytest.raises(ValueError, match="layer '1': weight contains NaN or Inf"):
            call()


@pytest.mark.parametrize("energy", [np.float32(0.1), torch.tensor(0.1), 0])
def test_energy_may_be_any_real_number(energy):
    """NumPy scalars and one-element tensors are numbers (they were refused as out of range)."""
    assert TRP(nn.Linear(3, 3), energy=energy).energy == pytest.approx(float(energy))


def test_lazy_frozen_and_bare_layers_are_named():
    """An uninitialized lazy layer is refused by name; a frozen layer TRP leaves alone is
    not checked until it is unfrozen; a bare layer's hint names no path to skip."""
    with pytest.raises(ValueError, match="0: LazyLinear is not initialized yet.*skip=\\['0'\\]"):
        TRP(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)))

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    trp = TRP(model, period=1)  # the frozen Doubled is left alone, unchecked
    assert trp.trained() == ["1"]
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="0: Doubled has its own forward"):
        trp.trained()
    with pytest.raises(ValueError, match="it is the model itself") as err:
        svdkern.decompose(Doubled(4, 3))
    assert "skip=" not in str(err.value)
    odd = nn.Sequential(nn.Conv2d(2, 3, 4, padding="same"), nn.Flatten(), nn.LazyLinear(2))
    odd[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="2: LazyLinear is not initialized"):
        TRP(odd)  # the trainable lazy layer is named ...
    odd[2] = nn.Linear(3, 2)
    assert TRP(odd).trained() == ["2"]  # ... the frozen 'same'-padded conv is never read


def test_official_schedule_hand_computed():
    """cifar-TRP.py: truncate before the first step and after every `period` steps; the
    nuclear subgradient U_k V_k^T of that truncation's SVD only on the step after it."""
    w = torch.diag(torch.tensor([4.0, 2.0, 0.5, 0.1]))[:, :3]  # 4x3, s = (4, 2, 0.5)
    layer = _linear_with_weight(w)
    trp = TRP(layer, energy=0.05, nuclear=0.1, period=3)  # the default schedule
    truncated = torch.diag(torch.tensor([4.0, 2.0, 0.0, 0.0]))[:, :3]
    torch.testing.assert_close(layer.weight.detach(), truncated)  # before the first step
    sub = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))[:, :3]  # U_2 V_2^T
    added = []
    for step in range(7):
        layer.weight.grad = torch.zeros_like(w)
        trp.after_backward()
        added.append(layer.weight.grad.clone())
        trp.after_step()
    for step, grad in enumerate(added):  # steps 0, 3, 6 follow a truncation
        expected = 0.1 * sub if step % 3 == 0 else torch.zeros_like(w)
        torch.testing.assert_close(grad, expected, msg=f"step {step}")
    assert trp.ranks == {"": 2}


def test_official_scope_skips_the_first_conv_the_1x1_convs_and_linears():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3),
                          nn.Conv2d(8, 8, (3, 1)), nn.Flatten(), nn.LazyLinear(4))
    trp = TRP(model, scope="official", skip=["5"])
    assert sorted(trp.layers) == ["2", "3"]
    with pytest.raises(ValueError, match="unknown scope 'some'"):
        TRP(model, scope="some", skip=["5"])
    with pytest.raises(ValueError, match="unknown schedule 'daily'"):
        TRP(model, schedule="daily", skip=["5"])


def _close_fp32(actual, expected):
    """TRP takes its SVDs in fp32 whatever the dtype: fp32's tolerance."""
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _truncated(w: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The energy rule's truncation of `w` in float64, and U_k V_k^T: the hand reference."""
    U, s, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    e2 = s.pow(2)
    k = len(s)
    while k > 1 and e2[k - 1:].sum() <= energy * e2.sum():
        k -= 1
    return (U[:, :k] * s[:k]) @ Vh[:k], U[:, :k] @ Vh[:k], k


def test_rnn_and_attention_matrices_truncated_each_on_its_own():
    """Every weight matrix of an LSTM (with projections) and each of attention's Q, K and V
    blocks of the packed in-projection is one TRP matrix: truncated alone at its own rank,
    its nuclear subgradient added to its rows of the gradient only; to_svd builds the SVD
    forms at those ranks and computes the truncated model."""
    torch.manual_seed(4)
    model = nn.ModuleDict({"lstm": nn.LSTM(5, 6, 2, proj_size=3).double(),
                           "attn": nn.MultiheadAttention(4, 2).double()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trp = TRP(model, energy=0.2, nuclear=0.5)  # official: truncated when built
    assert set(trp.ranks) == {
        *(f"lstm.weight_{kind}_l{i}" for kind in ("ih", "hh", "hr") for i in (0, 1)),
        "attn.q", "attn.k", "attn.v", "attn.out_proj"}
    subgradients = {}
    for i in (0, 1):
        for kind in ("ih", "hh", "hr"):
            name = f"weight_{kind}_l{i}"
            low, sub, k = _truncated(before[f"lstm.{name}"], 0.2)
            assert trp.ranks[f"lstm.{name}"] == k
            _close_fp32(getattr(model["lstm"], name).detach(), low)
            subgradients[f"lstm.{name}"] = sub
    packed = before["attn.in_proj_weight"].chunk(3)
    lows, subs = [], []
    for key, block in zip("qkv", packed):
        low, sub, k = _truncated(block, 0.2)
        assert trp.ranks[f"attn.{key}"] == k and k < 4
        lows.append(low)
        subs.append(sub)
    _close_fp32(model["attn"].in_proj_weight.detach(), torch.cat(lows))
    # the step after: nuclear * U_k V_k^T of that truncation, each block in its rows
    model["attn"].in_proj_weight.grad = torch.ones(12, 4, dtype=torch.double)
    trp.after_backward()
    _close_fp32(model["attn"].in_proj_weight.grad, 1 + 0.5 * torch.cat(subs))
    _close_fp32(model["lstm"].weight_hh_l1.grad,
                               0.5 * subgradients["lstm.weight_hh_l1"])
    low = trp.to_svd()
    ranks = {n: layer.rank for n, layer in svd_layers(low)}
    assert ranks["attn.factors.q"] == trp.ranks["attn.q"]
    assert ranks["lstm.factors.weight_hr_l1"] == trp.ranks["lstm.weight_hr_l1"]
    x = torch.randn(7, 2, 5, dtype=torch.double)
    _close_fp32(low["lstm"](x)[0], model["lstm"](x)[0])
    q = torch.randn(3, 2, 4, dtype=torch.double)
    _close_fp32(low["attn"](q, q, q)[0], model["attn"](q, q, q)[0])


def test_frozen_rnn_matrix_left_alone():
    torch.manual_seed(5)
    lstm = nn.LSTM(4, 5)
    lstm.weight_ih_l0.requires_grad_(False)
    frozen = lstm.weight_ih_l0.detach().clone()
    trp = TRP(lstm, energy=0.3, nuclear=0.0)
    _close_fp32(lstm.weight_ih_l0.detach(), frozen)
    assert trp.ranks["weight_ih_l0"] == 4 and trp.ranks["weight_hh_l0"] < 5
