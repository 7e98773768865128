"""`layer.weight`: the dense weight from the factors, and `svdkern.cached()` for code that
reads it repeatedly."""
import threading

import torch
import torch.nn as nn

import svdkern
from svdkern import reference


def test_weight_is_built_once_per_cached_block_and_fresh_outside():
    layer = svdkern.SVDLinear.from_dense(nn.Linear(7, 5).double(), rank=3)
    assert layer.weight is not layer.weight  # recomputed on every read
    with svdkern.cached():
        first = layer.weight
        assert layer.weight is first
        with svdkern.cached():  # nested: the same cache
            assert layer.weight is first
        assert layer.weight is first
    assert layer.weight is not first
    torch.testing.assert_close(first, reference.materialize(layer.U, layer.s, layer.V))
    first.sum().backward()  # differentiable
    assert layer.U.grad is not None


def test_the_cache_is_per_thread_and_per_layer():
    conv = svdkern.SVDConv2d.from_dense(nn.Conv2d(4, 6, 3).double())
    linear = svdkern.SVDLinear.from_dense(nn.Linear(7, 5).double())
    other = {}
    with svdkern.cached():
        kept = conv.weight
        thread = threading.Thread(target=lambda: other.update(w=conv.weight))
        thread.start()
        thread.join()
        assert conv.weight is kept and linear.weight is linear.weight
        assert linear.weight.shape == (5, 7) and kept.shape == (6, 4, 3, 3)
    assert other["w"] is not kept


QUANTILES = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)


def test_from_scratch_the_spectrum_is_the_default_inits():
    """No SVD is taken, yet s follows the singular values of nn.Linear's and nn.Conv2d's
    default init (three draws pooled), and U, V are orthonormal."""
    torch.manual_seed(0)
    for make_svd, make_dense, matrix in (
            (lambda: svdkern.SVDLinear(256, 512), lambda: nn.Linear(256, 512),
             lambda d: d.weight),
            (lambda: svdkern.SVDLinear(700, 300, rank=300), lambda: nn.Linear(700, 300),
             lambda d: d.weight),
            (lambda: svdkern.SVDConv2d(32, 64, 3, groups=2, scheme="spatial"),
             lambda: nn.Conv2d(32, 64, 3, groups=2),
             lambda d: reference.conv_weight_to_matrix(d.weight, svdkern.SVDConv2d.from_dense(
                 d, "spatial").spec))):
        layer = make_svd()
        want = torch.cat([torch.linalg.svdvals(matrix(make_dense()).detach().double()).flatten()
                          for _ in range(3)])
        got = layer.s.detach().double().flatten()
        torch.testing.assert_close(torch.quantile(got, QUANTILES), torch.quantile(want, QUANTILES),
                                   rtol=0.04, atol=0)
        U, _, V = layer.grouped_factors()
        eye = torch.eye(layer.rank, dtype=U.dtype).expand(U.shape[0], -1, -1)
        torch.testing.assert_close(U.transpose(1, 2) @ U, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(V.transpose(1, 2) @ V, eye, rtol=0, atol=1e-5)


def test_from_scratch_takes_no_svd_and_keeps_the_bias_init(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an SVD was taken")
    monkeypatch.setattr(torch.linalg, "svd", refuse)
    layer = svdkern.SVDLinear(40, 30, rank=7)
    conv = svdkern.SVDConv2d(6, 8, 3, rank=2, device="meta")
    assert layer.s.shape == (7,) and conv.s.shape == (1, 2) and conv.U.is_meta
    assert layer.bias.abs().max() <= 1 / 40 ** 0.5
    layer.reset_parameters()
    assert layer.s.shape == (7,) and torch.all(layer.s[:-1] >= layer.s[1:])


def test_a_weight_read_under_no_grad_is_not_reused_with_gradients():
    layer = svdkern.SVDLinear.from_dense(nn.Linear(7, 5).double(), rank=3)
    with svdkern.cached():
        with torch.no_grad():
            frozen = layer.weight
        assert not frozen.requires_grad
        assert layer.weight.requires_grad and layer.weight is layer.weight


def test_from_scratch_in_half_precision_and_haar_signs():
    """QR runs in fp32 for fp16/bf16 layers; the columns' signs are uniform (QR's own
    convention fixed them)."""
    for dtype in (torch.float16, torch.bfloat16):
        layer = svdkern.SVDLinear(8, 4, dtype=dtype)
        assert layer.U.dtype == layer.s.dtype == dtype
        layer.reset_parameters()
    torch.manual_seed(0)
    negative = sum(bool(reference.default_init_factors(1, 16, 16, 16, 16)[0][0, 0, 0] < 0)
                   for _ in range(400))
    assert 150 < negative < 250  # about half (it was 400 of 400)
