"""Layer forward + backward: dense, eager reference, compiled reference, svdkern."""
import pytest
import torch

from .cases import LAYER_ALTERNATIVES, layer_case, layer_shapes
from .config import preset_from_env

SHAPES = layer_shapes(preset_from_env())


@pytest.mark.parametrize("alternative", LAYER_ALTERNATIVES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_layer_forward_backward(benchmark, shape, alternative, preset, device):
    benchmark.group = f"layer {shape.id}"
    y, dx = benchmark(layer_case(shape, alternative, preset, device))
    assert y.shape == (shape.rows, shape.m) and dx.shape == (shape.rows, shape.n)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: s.id)
def test_layer_alternatives_agree(shape, preset, device):
    """The alternatives compute the same output and input gradient (same weight, same
    inputs), so the benchmark compares like with like."""
    torch.manual_seed(0)
    results = {}
    for alternative in LAYER_ALTERNATIVES:
        torch.manual_seed(1)
        results[alternative] = layer_case(shape, alternative, preset, device)()
    y0, dx0 = results["dense"]
    tol = 1e-4 if device.type == "cpu" else 5e-3  # GPU kernels may use TF32 for fp32
    for alternative, (y, dx) in results.items():
        torch.testing.assert_close(y, y0, rtol=tol, atol=tol, msg=alternative)
        torch.testing.assert_close(dx, dx0, rtol=tol, atol=tol, msg=alternative)
