"""svdkern.integrations.transformers.SVDTrainingCallback in a real transformers.Trainer on
CPU: a tiny BERT built from a config (no download)."""
from types import SimpleNamespace

import pytest
import torch

import svdkern
from svdkern import SVDTraining

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import (BertConfig, BertForSequenceClassification, Trainer,  # noqa: E402
                          TrainingArguments)

from svdkern.integrations.transformers import SVDTrainingCallback  # noqa: E402

SETTINGS = dict(ortho=1.0, sparsity="hoyer", strength=0.05)


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return svdkern.decompose(BertForSequenceClassification(config))


def dataset(n=32):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 40, (8,), generator=g),
             "labels": int(torch.randint(0, 3, (), generator=g))} for _ in range(n)]


def train(tmp_path, callbacks, model=None, resume=None, **overrides):
    args = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                disable_tqdm=True, seed=0, data_seed=0)
    args.update(overrides)
    model = tiny_bert() if model is None else model
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=dataset(),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def penalty_gradients(model, **settings):
    schedule = SVDTraining(model, **settings)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(schedule.penalty(), params, allow_unused=True)
    return {id(p): g for p, g in zip(params, grads)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_adds_the_penalty_gradient_once_per_step(tmp_path, accumulate, precision):
    """Same seeded run with and without the callback: after one SGD step the weights differ
    by exactly -lr * grad(penalty), once per optimizer step whatever the accumulation."""
    extra = dict(gradient_accumulation_steps=accumulate,
                 per_device_train_batch_size=4 // accumulate, bf16=precision == "bf16")
    plain, _ = train(tmp_path / "plain", [], **extra)
    regularized, _ = train(tmp_path / "reg", [SVDTrainingCallback(**SETTINGS)], **extra)
    start = tiny_bert()
    expected = penalty_gradients(start, **SETTINGS)
    changed = 0
    for (name, p0), p1, p2 in zip(start.named_parameters(), plain.parameters(),
                                  regularized.parameters()):
        g = expected[id(p0)]
        want = torch.zeros_like(p0) if g is None else -0.1 * g
        torch.testing.assert_close(p2 - p1, want, rtol=1e-4, atol=1e-6, msg=name)
        changed += g is not None and bool(g.abs().max() > 0)
    assert changed == len(svdkern.svd_layers(start)) * 3  # every U, s, V moved


def test_prune_at_a_step_slices_the_optimizer_state_and_training_goes_on(tmp_path):
    model, trainer = train(tmp_path, [SVDTrainingCallback(energy=0.2, prune_step=2)],
                           max_steps=4, optim="adamw_torch", learning_rate=1e-3)
    full = [layer.rank for _, layer in svdkern.svd_layers(tiny_bert())]
    ranks = [layer.rank for _, layer in svdkern.svd_layers(model)]
    assert trainer.state.global_step == 4 and ranks != full and min(ranks) >= 1
    state = trainer.optimizer.optimizer.state
    for _, layer in svdkern.svd_layers(model):
        for p in (layer.U, layer.s, layer.V):
            assert state[p]["exp_avg"].shape == p.shape


def test_a_run_resumed_after_the_prune_keeps_the_ranks_and_never_prunes_again(tmp_path,
                                                                             monkeypatch):
    settings = dict(energy=0.2, prune_step=2, **SETTINGS)
    steps = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch",
                 learning_rate=1e-3)
    whole, _ = train(tmp_path, [SVDTrainingCallback(**settings)], **steps)
    prunes = []
    original = svdkern.methods.svd_training.prune
    monkeypatch.setattr(svdkern.methods.svd_training, "prune",
                        lambda *a, **k: prunes.append(1) or original(*a, **k))
    resumed, _ = train(tmp_path, [SVDTrainingCallback(**settings)], model=tiny_bert(),
                       resume=str(tmp_path / "checkpoint-2"), **steps)
    assert prunes == []
    assert ([layer.rank for _, layer in svdkern.svd_layers(resumed)]
            == [layer.rank for _, layer in svdkern.svd_layers(whole)])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("clipped", [False, True])
def test_fp16_gradients_are_unscaled_before_the_penalty_is_added(clipped):
    """With a GradScaler (fp16) the penalty joins unscaled gradients, which the scaler's step
    then leaves alone: the step equals the unscaled one, whether gradient clipping unscaled
    them first or not. The optimizer is wrapped as accelerate wraps it (`.optimizer`,
    `.scaler`)."""
    results = []
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        model = svdkern.decompose(torch.nn.Sequential(torch.nn.Linear(5, 4)))
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
        wrapped = SimpleNamespace(optimizer=sgd, scaler=scaler)
        loss = model(torch.ones(3, 5)).square().sum()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if clipped and scaler is not None:
            scaler.unscale_(sgd)  # what the trainer's clip_grad_norm_ does
        callback = SVDTrainingCallback(**SETTINGS)
        callback.on_train_begin(None, transformers.TrainerState(), None, model=model)
        callback.on_pre_optimizer_step(None, None, None, optimizer=wrapped)
        if scaler is None:
            sgd.step()
        else:  # accelerate's AcceleratedOptimizer.step
            scaler.step(sgd)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_settings_are_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match="exactly one of energy and threshold"):
        SVDTrainingCallback(energy=0.1, threshold=0.5)
    with pytest.raises(ValueError, match="prune_step must be an integer"):
        SVDTrainingCallback(prune_step=-1)
    with pytest.raises(ValueError, match="at most one of prune_epoch and prune_step"):
        SVDTrainingCallback(prune_step=1, prune_epoch=1)
    with pytest.raises(ValueError, match="sparsity must be"):
        SVDTrainingCallback(sparsity="hoyer-square!")


class Stream(torch.utils.data.IterableDataset):
    """Data of no length: the Trainer's state.epoch stays fractional over it."""

    def __iter__(self):
        return iter(dataset(8))


@pytest.mark.parametrize("data", ["sized", "iterable"])
def test_an_epoch_prune_happens_at_the_start_of_that_epoch(tmp_path, monkeypatch, data):
    """8 samples in batches of 4: epoch 1 starts after optimizer step 2."""
    seen = []
    original = svdkern.methods.svd_training.prune
    monkeypatch.setattr(svdkern.methods.svd_training, "prune",
                        lambda *a, **k: seen.append(trainer.state.global_step)
                        or original(*a, **k))
    model = tiny_bert()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, callbacks=[SVDTrainingCallback(
        energy=0.2, prune_epoch=1)], train_dataset=Stream() if data == "iterable" else dataset(8))
    trainer.train()
    assert seen == [2]


def test_prune_step_zero_prunes_before_the_first_step(tmp_path):
    callback = SVDTrainingCallback(energy=0.2, prune_step=0)
    model, trainer = train(tmp_path, [callback], max_steps=2, optim="adamw_torch")
    assert callback.training.records and trainer.state.global_step == 2
    assert all(r.rank_after < r.rank_before for r in callback.training.records[:1])


def test_pruning_in_a_distributed_run_is_refused_before_any_step(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="prune_distributed"):
        SVDTrainingCallback(prune_step=3).settings.schedule(tiny_bert())
    assert SVDTrainingCallback().settings.schedule(tiny_bert()) is not None  # no prune: fine
