"""SVDRegularizer: value over the model, errors instead of silent zeros."""
import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDRegularizer, ops
from tests.helpers import small_cnn


def _model():
    model = svdkern.decompose(small_cnn())
    with torch.no_grad():  # move away from exact orthonormality so the term is non-zero
        for _, layer in svdkern.svd_layers(model):
            layer.U.add_(0.05 * torch.randn_like(layer.U))
    return model


@pytest.mark.parametrize("sparsity", ["hoyer", "hoyer_square", "l1"])
def test_value_is_weighted_sum_over_every_group(sparsity):
    model = _model()
    reg = SVDRegularizer(model, ortho=2.0, sparsity=sparsity, strength=0.3)
    mats, svals = [], []
    for _, layer in svdkern.svd_layers(model):
        U, s, V = layer.grouped_factors()
        for g in range(U.shape[0]):
            mats += [U[g], V[g]]
            svals.append(s[g])
    fn = getattr(ops, f"{sparsity}_loss")
    expected = 2.0 * ops.orthogonality_loss(mats) + 0.3 * fn(svals)
    value = reg()
    assert torch.allclose(value, expected)
    assert float(value.detach()) > 0
    value.backward()
    assert all(p.grad is not None for _, l in svdkern.svd_layers(model) for p in (l.U, l.s, l.V))


def test_orthogonality_only_and_follows_pruning():
    model = _model()
    reg = SVDRegularizer(model, ortho=1.0, sparsity=None)
    assert torch.allclose(reg(), reg.orthogonality())
    svdkern.prune(model, 0.3)
    assert torch.isfinite(reg())


def test_no_svd_layers_is_an_error():
    with pytest.raises(ValueError, match="no SVD layers"):
        SVDRegularizer(nn.Sequential(nn.Linear(3, 3)))


def test_bad_settings_and_nothing_to_add_are_errors():
    model = _model()
    with pytest.raises(ValueError, match="sparsity"):
        SVDRegularizer(model, sparsity="l2")
    with pytest.raises(ValueError, match="ortho"):
        SVDRegularizer(model, ortho=-1.0)
    with pytest.raises(ValueError, match="strength"):
        SVDRegularizer(model, strength=float("nan"))
    with pytest.raises(ValueError, match="nothing"):
        SVDRegularizer(model, ortho=0.0, sparsity=None)
    reg = SVDRegularizer(model, ortho=0.0, sparsity="l1", strength=0.1)
    reg.sparsity = None  # switched off later, e.g. for fine-tuning
    with pytest.raises(ValueError, match="nothing"):
        reg()


def test_stages_of_the_paper_and_when_each_begins():
    """Orthogonality only until sparsity_start, the sparsity term until the prune, then
    fine-tuning: on_epoch_start says when each begins (a loop rebuilds its optimizer)."""
    from svdkern import SVDTraining
    model = _model()
    hook = SVDTraining(model, sparsity_start=2, prune_epoch=4)
    began = {epoch: (hook.on_epoch_start(epoch), hook.stage) for epoch in range(6)}
    assert began == {0: (True, "orthogonality"), 1: (False, "orthogonality"),
                     2: (True, "sparsity"), 3: (False, "sparsity"), 4: (True, "finetune"),
                     5: (False, "finetune")}
    assert SVDTraining(_model(), sparsity=None).stage == "orthogonality"  # no sparsity term
