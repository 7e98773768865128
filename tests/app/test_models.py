"""The CLI's models: output shapes, the option-A ResNet's size (He et al.: 0.27M / 0.85M), the
character LSTM in SVD form."""
import pytest
import torch

from svdkern import decompose
from svdkern.app.models import build_model


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                         ("resnet20", (3, 32, 32)), ("resnet20", (1, 8, 8))])
def test_shapes(name, shape):
    model = build_model(name, shape, 10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name, params", [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_resnet_sizes(name, params):
    n = sum(p.numel() for p in build_model(name, (3, 32, 32), 10).parameters())
    assert abs(n - params) / params < 0.02


def test_resnet_every_layer_decomposes_and_matches():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 10).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = model(x)
    svd = decompose(model)
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in svd.modules())
    torch.testing.assert_close(svd(x), ref)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (3, 32, 32), 10)


def test_char_lstm_next_token_logits_and_exact_svd_form():
    torch.manual_seed(1)
    model = build_model("lstm", (64,), 128).double()
    tokens = torch.randint(0, 128, (3, 17))
    ref = model(tokens)
    assert ref.shape == (3, 17, 128)
    with pytest.warns(UserWarning, match="embed"):  # the lookup table stays dense, named
        svd = decompose(model)
    assert not any(type(m) in (torch.nn.LSTM, torch.nn.Linear) for m in svd.modules())
    torch.testing.assert_close(svd(tokens), ref)


@pytest.mark.parametrize("name, shape", [("lstm", (1, 8, 8)), ("cnn", (64,))])
def test_model_and_data_kind_mismatch(name, shape):
    with pytest.raises(ValueError, match="does not fit inputs"):
        build_model(name, shape, 10)
