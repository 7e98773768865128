"""Bad input gets a clear error naming the layer, and changes nothing."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDConv2d, SVDLinear
from tests.helpers import small_cnn


def test_forward_checks_name_the_layer():
    model = svdkern.decompose(small_cnn())
    with pytest.raises(ValueError, match=r"^0: expected input with 3 features"):
        model(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^0: input dtype torch.float32 differs"):
        model(torch.randn(1, 3, 10, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(1, 3, 10, 8, dtype=torch.long))
    layer = model[6]
    with pytest.raises(ValueError, match=r"^6: expected input with 90 features"):
        layer(torch.randn(2, 91, dtype=torch.float64))


def test_construction_errors():
    with pytest.raises(ValueError, match="rank 9 out of range"):
        SVDLinear(5, 4, rank=9)
    with pytest.raises(ValueError, match="rank 0 out of range"):
        SVDLinear(5, 4, rank=0)
    with pytest.raises(TypeError, match="rank must be an integer, got bool True"):
        SVDLinear(5, 4, rank=True)
    assert SVDLinear(5, 4, rank=np.int64(3)).rank == 3  # NumPy integers are integers
    with pytest.raises(ValueError, match="unknown scheme"):
        SVDConv2d(3, 4, 3, scheme="tucker")
    with pytest.raises(ValueError, match="asymmetric"):
        SVDConv2d(3, 4, 2, padding="same")
    with pytest.raises(TypeError, match="expected nn.Linear"):
        SVDLinear.from_dense(nn.Conv2d(3, 3, 1))


def test_decompose_fails_atomically_on_non_finite_weights():
    model = small_cnn()
    with torch.no_grad():
        model[4].weight[0, 0, 0, 0] = float("nan")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="^4: weight contains NaN or Inf"):
        svdkern.decompose(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]


def test_decompose_unknown_scheme():
    with pytest.raises(ValueError, match="unknown scheme"):
        svdkern.decompose(small_cnn(), scheme="vh")


def test_undecomposable_layer_names_itself_and_the_way_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(3, 3, 2, padding="same"))
    with pytest.raises(ValueError, match=r"^1: padding='same'.*skip=\['1'\]"):
        svdkern.decompose(model)
    assert type(model[0]) is nn.Linear
    svdkern.decompose(model, skip=["1"])
    assert type(model[1]) is nn.Conv2d and isinstance(model[0], SVDLinear)
