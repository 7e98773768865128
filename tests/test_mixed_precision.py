"""Autocast and GradScaler with SVD layers and the regularizers (CPU bf16 and fp16; the CUDA
fp16 case runs only where a GPU is present)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import svdkern

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dense_layers():
    torch.manual_seed(0)
    return [(nn.Linear(9, 7), (5, 9), "channel"),
            (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 6), "channel"),
            (nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(1, 2)), (2, 4, 6, 7), "spatial")]


def forward_backward(layer, x, autocast_dtype=None, device="cpu"):
    """Output and parameter gradients, optionally under autocast."""
    layer.zero_grad()
    with torch.autocast(device, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        y = layer(x)
    y.float().pow(2).sum().backward()
    return y, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(3))
def test_autocast_matches_fp32_and_dense_dtype(case, dtype):
    dense, shape, scheme = dense_layers()[case]
    layer = svdkern.decompose(dense, scheme=scheme)
    x = torch.randn(shape)
    y32, g32 = forward_backward(layer, x)
    y16, g16 = forward_backward(layer, x, dtype)
    with torch.autocast("cpu", dtype=dtype):
        assert y16.dtype == dense(x).dtype == dtype  # same as the dense layer
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    for name, grad in g16.items():
        assert grad.dtype == torch.float32, name  # master weights and grads stay fp32
        scale = g32[name].abs().max()
        torch.testing.assert_close(grad / scale, g32[name] / scale, rtol=0, atol=5e-2)


def test_half_input_without_autocast_is_a_clear_error():
    layer = svdkern.SVDLinear(5, 3)
    with pytest.raises(TypeError, match="SVDLinear: input dtype torch.bfloat16 differs"):
        layer(torch.randn(2, 5, dtype=torch.bfloat16))


def regularized_model():
    torch.manual_seed(1)
    model = svdkern.decompose(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(),
                                            nn.Linear(5 * 2 * 2, 6)))
    with torch.no_grad():  # off the orthonormal start so the orthogonality term is not ~0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("sparsity", ["hoyer", "hoyer_square", "l1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_regularizer_under_autocast_accumulates_in_fp32(sparsity, dtype):
    model = regularized_model()
    reg = svdkern.SVDRegularizer(model, ortho=1.0, sparsity=sparsity, strength=0.3)
    expected = reg()
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    with torch.autocast("cpu", dtype=dtype):
        value = reg()
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    for grad, ref in zip(grads, expected_grads):
        assert (grad is None) == (ref is None)
        if grad is not None:
            assert grad.dtype == torch.float32
            torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_regularizer_on_half_precision_factors_accumulates_in_fp32(dtype):
    model = regularized_model().to(dtype)
    reg = svdkern.SVDRegularizer(model, ortho=1.0, sparsity="hoyer", strength=0.3)
    exact = svdkern.SVDRegularizer(regularized_model_like(model), ortho=1.0, sparsity="hoyer",
                                   strength=0.3)()
    value = reg()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=0)


def regularized_model_like(model):
    """A float64 copy: half values are exact in float64, so it is the exact reference."""
    copy = regularized_model().double()
    copy.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return copy


def scaled_training(scaler, steps=3, poison_step=None):
    """SGD steps on an SVD model + regularizer through `scaler` (None: plain fp32)."""
    model = regularized_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg = svdkern.SVDRegularizer(model, ortho=1.0, sparsity="hoyer", strength=0.1)
    gen = torch.Generator().manual_seed(2)
    for i in range(steps):
        x, y = torch.randn(4, 3, 4, 4, generator=gen), torch.randn(4, 6, generator=gen)
        if i == poison_step:
            x[0, 0, 0, 0] = float("inf")
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y) + reg()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return model


def test_grad_scaler_steps_equal_unscaled_steps():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled, plain = scaled_training(scaler), scaled_training(None)
    for (name, a), b in zip(scaled.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert scaler.get_scale() == 2.0 ** 12  # no overflow, no back-off


def test_grad_scaler_skips_a_step_with_inf_gradients():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    skipped = scaled_training(scaler, steps=1, poison_step=0)
    for a, b in zip(skipped.state_dict().values(), regularized_model().state_dict().values()):
        assert torch.equal(a, b)  # the step was skipped: weights as initialized
    assert scaler.get_scale() == 2.0 ** 11


@CUDA
def test_cuda_fp16_autocast_with_grad_scaler():
    model = regularized_model().cuda()
    reference = regularized_model().cuda()
    reg = svdkern.SVDRegularizer(model, ortho=1.0, sparsity="hoyer", strength=0.1)
    x, y = torch.randn(4, 3, 4, 4, device="cuda"), torch.randn(4, 6, device="cuda")
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(x)
        assert out.dtype == torch.float16 and reg().dtype == torch.float32
        loss = F.mse_loss(out.float(), y) + reg()
    scaler.scale(loss).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    ref_loss = F.mse_loss(reference(x), y) + svdkern.SVDRegularizer(
        reference, ortho=1.0, sparsity="hoyer", strength=0.1)()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = q.grad.abs().max()
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=0, atol=2e-2, msg=name)
