"""svdkern.integrations.lightning.SVDTrainingCallback in a real lightning.Trainer on CPU."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import svdkern
from svdkern import SVDTraining

lightning = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from svdkern.integrations.lightning import SVDTrainingCallback  # noqa: E402

SETTINGS = dict(ortho=1.0, sparsity="hoyer", strength=0.05)


class Classifier(lightning.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.net = svdkern.decompose(nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3)))
        self.optimizer, self.lr = optimizer, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        kind = torch.optim.SGD if self.optimizer == "sgd" else torch.optim.Adam
        return kind(self.parameters(), lr=self.lr)


def loader(batch_size=4, samples=32):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(samples, 6, generator=g),
                                          torch.randint(0, 3, (samples,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def fit(tmp_path, callbacks, module=None, ckpt_path=None, batch_size=4, samples=32,
        **trainer_args):
    args = dict(max_steps=1, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path))
    args.update(trainer_args)
    module = Classifier() if module is None else module
    trainer = lightning.Trainer(callbacks=callbacks, **args)
    trainer.fit(module, loader(batch_size, samples), ckpt_path=ckpt_path)
    return module, trainer


def precision_args(precision: str) -> dict:
    """Trainer arguments for `precision`; fp16 with a GradScaler through Lightning's own
    plugin (Lightning swaps "16-mixed" for bf16 on CPU, a plugin it takes as given)."""
    if precision != "16-mixed":
        return dict(precision=precision)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_adds_the_penalty_gradient_once_per_step(tmp_path, accumulate, precision):
    """Same seeded run with and without the callback: after one SGD step the weights differ
    by exactly -lr * grad(penalty), once per optimizer step whatever the accumulation, and
    unscaled under fp16 (a scaled penalty gradient would be off by the scale, 1024)."""
    extra = dict(accumulate_grad_batches=accumulate, batch_size=4 // accumulate,
                 **precision_args(precision))
    plain, _ = fit(tmp_path / "plain", [], **extra)
    regularized, _ = fit(tmp_path / "reg", [SVDTrainingCallback(**SETTINGS)],
                         **{**extra, **precision_args(precision)})
    start = Classifier()
    params = list(start.parameters())
    grads = torch.autograd.grad(SVDTraining(start, **SETTINGS).penalty(), params,
                                allow_unused=True)
    for (name, p0), g, p1, p2 in zip(start.named_parameters(), grads, plain.parameters(),
                                     regularized.parameters()):
        want = torch.zeros_like(p0) if g is None else -0.1 * g
        torch.testing.assert_close(p2 - p1, want, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g is not None for g in grads) == 6  # every U, s, V of both layers


def test_prune_at_a_step_slices_the_optimizer_state_and_training_goes_on(tmp_path):
    module, trainer = fit(tmp_path, [SVDTrainingCallback(energy=0.3, prune_step=2)],
                          module=Classifier("adam", 1e-2), max_steps=5)
    ranks = [layer.rank for _, layer in svdkern.svd_layers(module)]
    assert trainer.global_step == 5 and ranks != [6, 3] and min(ranks) >= 1
    state = trainer.optimizers[0].state
    for _, layer in svdkern.svd_layers(module):
        for p in (layer.U, layer.s, layer.V):
            assert state[p]["exp_avg"].shape == p.shape


def test_a_run_resumed_after_the_prune_keeps_the_ranks_and_never_prunes_again(tmp_path,
                                                                             monkeypatch):
    """One batch an epoch (Lightning resumes a plain DataLoader at another batch than the
    uninterrupted run takes), the prune after step 2, the checkpoint after it."""
    settings = dict(energy=0.3, prune_step=2, **SETTINGS)
    every = dict(dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1,
                 filename="{step}")
    whole, _ = fit(tmp_path, [SVDTrainingCallback(**settings), ModelCheckpoint(**every)],
                   module=Classifier("adam", 1e-2), max_steps=4, enable_checkpointing=True,
                   batch_size=16, samples=16)
    prunes = []
    original = svdkern.methods.svd_training.prune
    monkeypatch.setattr(svdkern.methods.svd_training, "prune",
                        lambda *a, **k: prunes.append(1) or original(*a, **k))
    resumed, _ = fit(tmp_path, [SVDTrainingCallback(**settings)], module=Classifier("adam", 1e-2),
                     ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"), max_steps=4,
                     batch_size=16, samples=16)
    assert prunes == []
    assert ([layer.rank for _, layer in svdkern.svd_layers(resumed)]
            == [layer.rank for _, layer in svdkern.svd_layers(whole)] != [6, 3])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def global_steps_of_prunes(tmp_path, monkeypatch, callback, batch_size, **trainer_args):
    """The trainer's global step at each prune of a run."""
    steps = []
    original = svdkern.methods.svd_training.prune
    monkeypatch.setattr(svdkern.methods.svd_training, "prune",
                        lambda *a, **k: steps.append(trainer.global_step) or original(*a, **k))
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(tmp_path), callbacks=[callback],
                                **trainer_args)
    trainer.fit(Classifier("adam", 1e-2), loader(batch_size))
    return steps


def test_prune_step_zero_prunes_once_before_the_first_step_with_accumulation(tmp_path,
                                                                            monkeypatch):
    callback = SVDTrainingCallback(energy=0.3, prune_step=0)
    assert global_steps_of_prunes(tmp_path, monkeypatch, callback, 2, max_steps=3,
                                  accumulate_grad_batches=2) == [0]


def test_an_epoch_prune_happens_at_the_start_of_that_epoch(tmp_path, monkeypatch):
    callback = SVDTrainingCallback(energy=0.3, prune_epoch=1)  # 4 steps an epoch
    assert global_steps_of_prunes(tmp_path, monkeypatch, callback, 8, max_epochs=3) == [4]
