"""SVDTraining callback: sparsity schedule, pruning at the chosen epoch with the user's
optimizer, then fine-tuning with sparsity off and orthogonality kept."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import svdkern
from svdkern import SVDRegularizer, SVDTraining, decompose, svd_layers


def _model():
    torch.manual_seed(0)
    return decompose(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))


def test_penalty_matches_regularizer_then_switches_to_ortho_only():
    model = _model()
    hook = SVDTraining(model, ortho=0.5, sparsity="l1", strength=0.2, sparsity_start=1)
    ref = SVDRegularizer(model, 0.5, "l1", 0.2)
    hook.on_epoch_start(0)
    torch.testing.assert_close(hook.penalty(), 0.5 * ref.orthogonality())
    hook.on_epoch_start(1)
    torch.testing.assert_close(hook.penalty(), ref())
    hook.prune_now()
    assert hook.finetuning
    torch.testing.assert_close(hook.penalty(), 0.5 * ref.orthogonality())
    hook.on_epoch_start(2)  # stays in fine-tuning
    torch.testing.assert_close(hook.penalty(), 0.5 * ref.orthogonality())


def test_custom_loop_prunes_at_chosen_epoch_and_keeps_training():
    model = _model()
    with torch.no_grad():  # make the last singular values negligible so pruning bites
        for _, layer in svd_layers(model):
            layer.s[2:] *= 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = SVDTraining(model, strength=0.01, energy=0.01, prune_epoch=2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def step():
        loss = F.cross_entropy(model(x), y) + hook.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()  # Adam state was sliced by prune: no shape error here

    ranks = []
    for epoch in range(4):
        hook.on_epoch_start(epoch, opt)
        for _ in range(2):
            step()
        ranks.append([layer.rank for _, layer in svd_layers(model)])
    assert ranks[0] == ranks[1] == [6, 3]
    assert ranks[2] == ranks[3] and ranks[2][0] == 2 and ranks[2][1] <= 2
    assert [r.rank_after for r in hook.records] == ranks[2]
    assert hook.finetuning and hook.regularizer.sparsity is None


def test_penalty_zero_when_everything_off():
    model = _model()
    hook = SVDTraining(model, ortho=0.0, sparsity="hoyer", strength=0.1, sparsity_start=5)
    assert float(hook.penalty()) == 0.0


@pytest.mark.parametrize("kwargs", [dict(energy=1.5), dict(prune_epoch=1, sparsity_start=3),
                                    dict(rank_multiple=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SVDTraining(_model(), **kwargs)


def test_prune_while_previous_loss_graph_alive():
    """A top-level loop's last `loss` keeps its graph alive across the prune."""
    model = _model()
    with torch.no_grad():
        for _, layer in svd_layers(model):
            layer.s[2:] *= 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = SVDTraining(model, energy=0.01, prune_epoch=1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for epoch in range(2):
        hook.on_epoch_start(epoch, opt)
        loss = F.cross_entropy(model(x), y) + hook.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [layer.rank for _, layer in svd_layers(model)][0] == 2


def test_hook_resumed_after_the_pruning_epoch_stays_in_fine_tuning():
    """A new hook (e.g. after loading a checkpoint) past prune_epoch keeps sparsity off."""
    hook = SVDTraining(_model(), strength=0.01, prune_epoch=1)
    hook.on_epoch_start(2)
    assert hook.finetuning and hook.regularizer.sparsity is None and hook.records == []


def test_step_schedule_never_drops_in_a_phase_first_epoch():
    from svdkern.app.pipeline import Run
    run = Run.__new__(Run)
    run.cfg = type("Cfg", (), {"lr": 1e-3})()
    assert run.lr_at(10, range(10, 11)) == 1e-3
    assert [run.lr_at(e, range(0, 4)) for e in range(4)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def test_a_step_prune_by_threshold_and_a_resume_after_it():
    model = svdkern.decompose(nn.Sequential(nn.Linear(6, 5)).double())
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0], dtype=torch.float64))
    hook = SVDTraining(model, threshold=1.0, prune_step=3)
    for step in (1, 2):
        hook.on_step_end(step)
    assert model[0].rank == 5 and not hook.finetuning
    hook.on_step_end(3)
    assert model[0].rank == 3 and hook.finetuning and hook.regularizer.sparsity is None
    fresh = SVDTraining(svdkern.decompose(nn.Sequential(nn.Linear(6, 5))), prune_step=3)
    fresh.resumed_at(step=3, epoch=0.4)  # a checkpoint written after the prune
    assert fresh.finetuning
    fresh.on_step_end(4)
    assert fresh.model[0].rank == 5 and fresh.records == []  # never pruned again
    early = SVDTraining(svdkern.decompose(nn.Sequential(nn.Linear(6, 5))), prune_epoch=2)
    early.resumed_at(step=10, epoch=2.0)  # end of epoch 1: the epoch prune is still ahead
    assert not early.finetuning
    early.resumed_at(step=11, epoch=2.1)
    assert early.finetuning


def test_step_and_epoch_prunes_exclude_each_other():
    model = svdkern.decompose(nn.Sequential(nn.Linear(6, 5)))
    with pytest.raises(ValueError, match="at most one of prune_epoch and prune_step"):
        SVDTraining(model, prune_epoch=1, prune_step=1)
    with pytest.raises(ValueError, match="prune_step must be an integer >= 0"):
        SVDTraining(model, prune_step=1.5)
