"""A pruned model's checkpoint loads back into a freshly decomposed model of the same
architecture; bad checkpoints fail clearly and change nothing."""
import copy

import pytest
import torch
import torch.nn as nn

import svdkern
from tests.helpers import small_cnn


def _pruned(scheme="channel"):
    model = svdkern.decompose(small_cnn(), scheme=scheme)
    svdkern.prune(model, 0.3)
    return model


def _ranks(model):
    return [layer.rank for _, layer in svdkern.svd_layers(model)]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_save_load_round_trip_restores_ranks(tmp_path, scheme):
    model = _pruned(scheme)
    path = tmp_path / "pruned.pt"
    svdkern.save(model, path, extra={"epoch": 3})
    fresh = svdkern.decompose(small_cnn(), scheme=scheme)
    assert _ranks(fresh) != _ranks(model)
    extra = svdkern.load(fresh, path)
    assert extra == {"epoch": 3}
    assert _ranks(fresh) == _ranks(model)
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))


def test_plain_load_state_dict_adopts_ranks():
    model = _pruned()
    fresh = svdkern.decompose(small_cnn())
    fresh.load_state_dict(model.state_dict())
    assert _ranks(fresh) == _ranks(model)


def test_mismatched_architecture_fails_and_leaves_model_untouched(tmp_path):
    path = tmp_path / "pruned.pt"
    svdkern.save(_pruned(), path)
    other = svdkern.decompose(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double())
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        svdkern.load(other, path)
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "pruned.pt"
    svdkern.save(_pruned(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = svdkern.decompose(small_cnn())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        svdkern.load(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an svdkern checkpoint"):
        svdkern.load(model, path)
