"""torch.compile(fullgraph=True) of models with SVD layers matches eager, through the
reference/materialized paths and through the fused custom op (interpreter on CPU)."""
import pytest
import torch
import torch.nn as nn

from svdkern import SVDConv2d, SVDLinear, backend, reference

pytest.importorskip("triton")


class SmallNet(nn.Module):
    def __init__(self, conv: bool):
        super().__init__()
        self.conv = nn.Sequential(SVDConv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  SVDConv2d(8, 8, 3, stride=2, padding=1, scheme="spatial", rank=3),
                                  nn.Flatten()) if conv else nn.Identity()
        width = 8 * 4 * 4 if conv else 20
        self.mlp = nn.Sequential(SVDLinear(width, 24, rank=6), nn.GELU(),
                                 SVDLinear(24, 7, rank=7, bias=False))

    def forward(self, x):
        return self.mlp(self.conv(x))


def grads_of(model, x):
    out = model(x)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    return out, grads


def check_compiled_matches_eager(model, x, name):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with backend.use(name):
        out, grads = grads_of(compiled, x)
        out_eager, grads_eager = grads_of(model, x)
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-5)
    return out


def test_compile_reference_paths_on_cpu():
    """auto on CPU: the first conv runs materialized, the rest as PyTorch chains."""
    torch.manual_seed(0)
    check_compiled_matches_eager(SmallNet(conv=True), torch.randn(4, 3, 8, 8), "auto")


def test_compile_fused_custom_op():
    """SVDKERN_BACKEND=triton: the graph holds the custom op (no break), compiled = eager."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SmallNet(conv=False).to(device)
    x = torch.randn(3, 5, 20, device=device)
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    with backend.use("triton"):
        torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert sum("svdkern.svd_linear_fwd" in t for t in seen) == 2

    out = check_compiled_matches_eager(model, x, "triton")
    ref = x.double()
    for layer in model.mlp:
        ref = layer(ref) if not isinstance(layer, SVDLinear) else reference.svd_linear(
            ref, *(None if t is None else t.double()
                   for t in (layer.U, layer.s, layer.V, layer.bias)))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("groups", [2, 8])
def test_compile_grouped_convs_below_full_rank(scheme, groups):
    """Grouped and depthwise convs below full rank (a depthwise channel-wise matrix is 1 x 9:
    rank 1), compiled by Inductor (the default backend): the spatial chain's permuted second
    weight was computed wrong at ranks >= 2 (torch 2.13)."""
    torch.manual_seed(0)
    rank = 1 if (scheme, groups) == ("channel", 8) else 2
    model = nn.Sequential(SVDConv2d(8, 8, 3, padding=1, groups=groups, scheme=scheme, rank=rank),
                          nn.ReLU(), SVDConv2d(8, 16, 3, stride=2, dilation=2, padding=2,
                                               groups=groups, scheme=scheme, rank=1))
    for name in ("reference", "auto"):  # reference: the two thin convs; auto: by FLOPs
        check_compiled_matches_eager(model, torch.randn(2, 8, 9, 9), name)
