"""gradcheck of every reference op in float64, and the docs/SPEC.md's closed-form gradients."""
import pytest
import torch
from torch.autograd import gradcheck

from svdkern import ops, reference
from svdkern.reference import ConvSpec
from tests.helpers import rel_err

f64 = dict(dtype=torch.float64)


def _leaf(*shape):
    return torch.randn(*shape, **f64).requires_grad_()


def test_gradcheck_svd_linear():
    x, U, s, V, b = _leaf(3, 2, 5), _leaf(4, 3), _leaf(3), _leaf(5, 3), _leaf(4)
    assert gradcheck(ops.svd_linear, (x, U, s, V, b))
    assert gradcheck(lambda *a: ops.svd_linear(*a, None), (x, U, s, V))


def test_gradcheck_materialize():
    assert gradcheck(reference.materialize, (_leaf(2, 4, 3), _leaf(2, 3), _leaf(2, 5, 3)))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_gradcheck_svd_conv(scheme):
    spec = ConvSpec(4, 6, (3, 2), (2, 1), (1, 1), (1, 2), 2, "zeros", scheme)
    rows, cols = spec.matrix_shape
    r = 2
    x, U, s, V, b = _leaf(1, 4, 5, 6), _leaf(2, rows, r), _leaf(2, r), _leaf(2, cols, r), _leaf(6)
    assert gradcheck(lambda *a: ops.svd_conv(*a, spec), (x, U, s, V, b))
    out = ops.svd_conv(x, U, s, V, b, spec)
    assert rel_err(out, reference.svd_conv_materialized(x, U, s, V, b, spec)) < 1e-12


def test_gradcheck_regularizers():
    mats = [_leaf(5, 3), _leaf(4, 1), _leaf(3, 3)]
    assert gradcheck(lambda *m: ops.orthogonality_loss(list(m)), tuple(mats))
    svals = [torch.rand(4, **f64).add(0.1).requires_grad_(), (-torch.rand(2, **f64) - 0.1).requires_grad_()]
    assert gradcheck(lambda *v: ops.l1_loss(list(v)), tuple(svals))
    assert gradcheck(lambda *v: ops.hoyer_loss(list(v)), tuple(svals))


def test_orthogonality_value_and_spec_gradient():
    U = _leaf(7, 4)
    r = 4
    G = U.T @ U - torch.eye(r, **f64)
    loss = ops.orthogonality_loss([U])
    assert torch.allclose(loss, (G ** 2).sum() / r ** 2)
    loss.backward()
    assert rel_err(U.grad, 4 * U.detach() @ G.detach() / r ** 2) < 1e-12
    Q = torch.linalg.qr(torch.randn(7, 4, **f64)).Q
    assert float(ops.orthogonality_loss([Q])) < 1e-25


def test_hoyer_value_and_spec_gradient():
    s = torch.tensor([3.0, -1.0, 0.5, 2.0], **f64, requires_grad=True)
    loss = ops.hoyer_loss([s])
    l1, l2 = s.detach().abs().sum(), s.detach().norm()
    assert torch.allclose(loss, l1 / l2)
    loss.backward()
    assert rel_err(s.grad, torch.sign(s.detach()) / l2 - l1 * s.detach() / l2 ** 3) < 1e-12
    # scale invariant: a scaled copy has the same value
    assert torch.allclose(ops.hoyer_loss([5 * s.detach()]), l1 / l2)


def test_l1_value():
    assert float(ops.l1_loss([torch.tensor([1.0, -2.0]), torch.tensor([0.5])])) == 3.5


def test_regularizers_accumulate_fp32_for_half_inputs():
    M = torch.randn(6, 3).half()
    assert ops.orthogonality_loss([M]).dtype == torch.float32
    assert ops.hoyer_loss([torch.rand(3).bfloat16()]).dtype == torch.float32


def test_empty_lists_are_errors():
    for fn in (ops.orthogonality_loss, ops.l1_loss, ops.hoyer_loss):
        with pytest.raises(ValueError):
            fn([])


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_matrix_round_trip(scheme):
    spec = ConvSpec(6, 4, (3, 5), (1, 1), (0, 0), (1, 1), 2, "zeros", scheme)
    w = torch.randn(4, 3, 3, 5, **f64)
    mat = reference.conv_weight_to_matrix(w, spec)
    assert mat.shape == (2, *spec.matrix_shape)
    assert torch.equal(reference.conv_matrix_to_weight(mat, spec), w)
