"""Training checkpoints: save after a prune, resume into a fresh full-rank model and continue
bit-identically; truncated or mismatched files change nothing."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import svdkern

STEPS, PRUNE_AT, SAVE_AT = 6, 2, 4


def make_model(out_features: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return svdkern.decompose(nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(5 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, out_features)))


def setup(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return optimizer, svdkern.SVDRegularizer(model, ortho=1.0, sparsity="hoyer", strength=0.1)


def step(model, optimizer, reg):
    """One step whose batch and dropout mask come from torch's global RNG."""
    x, y = torch.randn(4, 2, 3, 3), torch.randn(4, model[-1].out_features)
    optimizer.zero_grad()
    (F.mse_loss(model(x), y) + reg()).backward()
    optimizer.step()


def train(model, optimizer, reg, steps, path=None):
    for i in steps:
        if i == PRUNE_AT:
            svdkern.prune(model, 0.1, optimizer)
            reg.sparsity = None
        if i == SAVE_AT and path is not None:
            svdkern.save(model, path, optimizer=optimizer, regularizer=reg, rng=True)
        step(model, optimizer, reg)


def snapshot(model, optimizer, reg):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), repr(reg))


def assert_same(a, b):
    (state_a, opt_a, reg_a), (state_b, opt_b, reg_b) = a, b
    assert state_a.keys() == state_b.keys() and reg_a == reg_b
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, per_param in opt_a["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, opt_b["state"][index][key]), (index, key)


def test_resume_after_prune_is_bit_identical(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(123)
    model = make_model()
    optimizer, reg = setup(model)
    train(model, optimizer, reg, range(STEPS), path)
    expected = snapshot(model, optimizer, reg)

    fresh = make_model(seed=7)  # full rank, other weights, other RNG position
    fresh_opt, fresh_reg = setup(fresh)
    svdkern.load(fresh, path, optimizer=fresh_opt, regularizer=fresh_reg, restore_rng=True)
    assert fresh_reg.sparsity is None
    assert [l.rank for _, l in svdkern.svd_layers(fresh)] == \
        [l.rank for _, l in svdkern.svd_layers(model)]
    train(fresh, fresh_opt, fresh_reg, range(SAVE_AT, STEPS))
    assert_same(snapshot(fresh, fresh_opt, fresh_reg), expected)


def trained_checkpoint(tmp_path, model_fn=make_model, optimizer_params=None,
                       optimizer_cls=torch.optim.Adam):
    torch.manual_seed(5)
    model = model_fn()
    optimizer = optimizer_cls(optimizer_params(model) if optimizer_params else
                              model.parameters(), lr=1e-2)
    reg = svdkern.SVDRegularizer(model, sparsity="l1", strength=0.2)
    train(model, optimizer, reg, range(SAVE_AT + 1), tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def fresh_training_state():
    model = make_model(seed=3)
    optimizer, reg = setup(model)
    step(model, optimizer, reg)  # non-empty optimizer state that must survive a failed load
    return model, optimizer, reg


def assert_load_fails_untouched(path, match):
    model, optimizer, reg = fresh_training_state()
    before, rng = snapshot(model, optimizer, reg), torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        svdkern.load(model, path, optimizer=optimizer, regularizer=reg, restore_rng=True)
    assert_same(snapshot(model, optimizer, reg), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_truncated_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path):
    path = trained_checkpoint(tmp_path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        assert_load_fails_untouched(path, "cannot read checkpoint")


def test_other_architecture_is_a_clear_error_and_changes_nothing(tmp_path):
    path = trained_checkpoint(tmp_path, model_fn=lambda: make_model(out_features=4))
    assert_load_fails_untouched(path, r"does not fit the model.*6\.")


def test_mismatched_optimizer_state_is_a_clear_error_and_changes_nothing(tmp_path):
    reversed_params = lambda model: list(model.parameters())[::-1]  # noqa: E731
    path = trained_checkpoint(tmp_path, optimizer_params=reversed_params)
    assert_load_fails_untouched(path, "optimizer state does not fit")


def test_other_optimizer_type_is_a_clear_error_and_changes_nothing(tmp_path):
    path = trained_checkpoint(tmp_path, optimizer_cls=torch.optim.SGD)
    assert_load_fails_untouched(path, "holds SGD state, not Adam state")


def test_checkpoint_without_training_state_says_what_is_missing(tmp_path):
    model = make_model()
    svdkern.save(model, tmp_path / "weights.pt")
    assert_load_fails_untouched(tmp_path / "weights.pt", "optimizer / regularizer / rng")


def test_invalid_regularizer_settings_change_nothing(tmp_path):
    path = trained_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["regularizer"]["strength"] = -1.0
    torch.save(payload, path)
    assert_load_fails_untouched(path, "strength")


def test_regularizer_with_both_terms_off_after_prune_resumes(tmp_path):
    """ortho=0 and sparsity dropped at the prune: fine-tuning runs no regularizer, and a
    checkpoint of that state must load (a fresh regularizer with these settings is refused,
    so the load checks the settings alone)."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    reg = svdkern.SVDRegularizer(model, ortho=0.0, sparsity="l1", strength=0.2)
    svdkern.prune(model, 0.1, optimizer)
    reg.sparsity = None
    svdkern.save(model, tmp_path / "ckpt.pt", optimizer=optimizer, regularizer=reg)
    fresh = make_model(seed=7)
    fresh_reg = svdkern.SVDRegularizer(fresh, ortho=0.0, sparsity="l1", strength=0.2)
    svdkern.load(fresh, tmp_path / "ckpt.pt", optimizer=torch.optim.Adam(fresh.parameters()),
                 regularizer=fresh_reg)
    assert fresh_reg.adds_nothing() and repr(fresh_reg) == repr(reg)
