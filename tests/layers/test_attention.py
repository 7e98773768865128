"""SVDMultiheadAttention against nn.MultiheadAttention in float64, inside
nn.TransformerEncoder (its fast path too), and through prune, export and both artifacts."""
import copy

import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDMultiheadAttention
from tests.helpers import rel_err


def _pair(**kwargs):
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(**kwargs).double()
    with torch.no_grad():  # torch zeroes the biases: give them values to check
        for p in dense.parameters():
            if p.dim() == 1:
                p.normal_()
    return dense, SVDMultiheadAttention.from_dense(copy.deepcopy(dense), name="attn")


@pytest.mark.parametrize("kwargs", [
    dict(embed_dim=12, num_heads=3, batch_first=True),
    dict(embed_dim=10, num_heads=2, kdim=7, vdim=5),
    dict(embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True, bias=True),
    dict(embed_dim=6, num_heads=1, bias=False, batch_first=True)])
def test_from_dense_matches_forward_masks_and_every_gradient(kwargs):
    dense, layer = _pair(**kwargs)
    E, first = kwargs["embed_dim"], kwargs.get("batch_first", False)
    shape = (lambda n, L, d: (n, L, d)) if first else (lambda n, L, d: (L, n, d))
    q = torch.randn(*shape(3, 5, E), dtype=torch.float64)
    k = torch.randn(*shape(3, 7, kwargs.get("kdim") or E), dtype=torch.float64)
    v = torch.randn(*shape(3, 7, kwargs.get("vdim") or E), dtype=torch.float64)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    mask = torch.randn(5, 7, dtype=torch.float64)
    args = dict(key_padding_mask=padding, attn_mask=mask, average_attn_weights=False)
    y, w = dense(q, k, v, **args)
    y_svd, w_svd = layer(q, k, v, **args)
    assert rel_err(y_svd, y) < 1e-12 and rel_err(w_svd, w) < 1e-12
    grad = torch.randn_like(y)
    y.backward(grad)
    y_svd.backward(grad)
    if dense._qkv_same_embed_dim:
        assert rel_err(layer.in_proj_weight, dense.in_proj_weight) < 1e-12
        G = dense.in_proj_weight.grad.chunk(3)
    else:
        G = [getattr(dense, f"{c}_proj_weight").grad for c in "qkv"]
    for key, g in zip("qkv", G):  # each factor's gradient is the dense one pulled back
        f = layer.factors[key]
        assert rel_err(f.U.grad, g @ f.V * f.s) < 1e-10
        assert rel_err(f.V.grad, g.t() @ f.U * f.s) < 1e-10
        assert rel_err(f.s.grad, ((f.U.t() @ g) * f.V.t()).sum(1)) < 1e-10
    for name, p in dense.named_parameters():
        if p.dim() == 1 or name.startswith(("out_proj", "bias_")):
            assert rel_err(layer.get_parameter(name).grad, p.grad) < 1e-12, name


def test_gradcheck_at_rank_one_with_separate_dims():
    _, layer = _pair(embed_dim=4, num_heads=2, kdim=3, vdim=5)
    svdkern.prune(layer, energy=0.99)  # every matrix to rank 1
    assert [f.rank for f in layer.factors.values()] == [1, 1, 1]
    q, k, v = (torch.randn(2, 1, d, dtype=torch.float64) for d in (4, 3, 5))
    params = [p for f in layer.factors.values() for p in (f.U, f.s, f.V)]

    def run(q, *factors):
        return layer(q, k, v, need_weights=False)[0]
    torch.autograd.gradcheck(run, (q.requires_grad_(True), *params))


def test_transformer_encoder_decomposes_fully_and_keeps_its_fast_path():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(block, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, -3:] = True
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=padding)
    with torch.inference_mode():  # the fast path (torch's fused encoder layer) under test
        expected_fast = model(x)
    svdkern.decompose(model)  # nothing warned: every matrix is converted
    cov = svdkern.coverage(model)
    assert cov.left_dense == [] and cov.svd_fraction == 1.0
    assert all(isinstance(l.self_attn, SVDMultiheadAttention) for l in model.layers)
    assert len(svdkern.svd_layers(model)) == 2 * (3 + 1 + 2)  # q, k, v, out_proj, linear1, 2
    with torch.no_grad():
        assert rel_err(model(x, src_key_padding_mask=padding), expected) < 1e-5
    with torch.inference_mode():
        assert rel_err(model(x), expected_fast) < 1e-5
    compiled = torch.compile(model.train(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_prune_export_checkpoint_and_artifact(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(
            12, 3, 24, batch_first=True, dropout=0.0), 1, enable_nested_tensor=False).double()
    model = svdkern.decompose(build())
    layers = [layer for _, layer in svdkern.svd_layers(model)]
    assert len(layers) == 6  # q, k, v, out_proj, linear1, linear2
    reg = svdkern.SVDRegularizer(model, ortho=0.0, sparsity="l1", strength=1.0)
    assert rel_err(reg(), sum(layer.s.abs().sum() for layer in layers)) < 1e-12
    svdkern.prune(model, energy=0.2)
    attn = model.layers[0].self_attn
    ranks = {k: f.rank for k, f in attn.factors.items()}
    assert all(r < 12 for r in ranks.values())
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    pruned = model(x)
    plain = svdkern.export(model)
    assert type(plain.layers[0].self_attn) is nn.MultiheadAttention
    assert rel_err(plain(x), pruned) < 1e-10
    svdkern.save(model, tmp_path / "ckpt.pt")
    fresh = svdkern.decompose(build())
    svdkern.load(fresh, tmp_path / "ckpt.pt")
    assert {k: f.rank for k, f in fresh.layers[0].self_attn.factors.items()} == ranks
    assert rel_err(fresh(x), pruned) < 1e-12
    svdkern.save_compressed(model, tmp_path / "art")
    loaded = svdkern.load_compressed(build(), tmp_path / "art")
    assert rel_err(loaded(x), pruned) < 1e-10


def test_assignment_and_bad_input_are_named_errors():
    _, layer = _pair(embed_dim=8, num_heads=2)
    with pytest.raises(AttributeError, match="attn: in_proj_weight is computed from the factors"):
        layer.in_proj_weight = nn.Parameter(torch.zeros(24, 8))
    q = torch.randn(3, 2, 5, dtype=torch.float64)
    with pytest.raises(AssertionError, match="^attn: "):
        layer(q, q, q)
    with pytest.raises(ValueError, match="attn: rank names \\['x'\\]"):
        SVDMultiheadAttention(8, 2, rank={"x": 2}, name="attn")


def test_from_scratch_ranks_and_xavier_spectrum():
    layer = SVDMultiheadAttention(64, 4, rank={"q": 8, "v": 16})
    assert {k: f.rank for k, f in layer.factors.items()} == {"q": 8, "k": 64, "v": 16}
    full = SVDMultiheadAttention(256, 4)
    torch.manual_seed(0)
    xavier = nn.MultiheadAttention(256, 4).in_proj_weight.detach()[:256]
    spectrum = torch.linalg.svdvals(full.factors.q.weight.detach())
    assert rel_err(spectrum.median(), torch.linalg.svdvals(xavier).median()) < 0.05


def test_review_cases(tmp_path):
    """A bare attention module converts its out_proj too and exports fully plain; its
    reset keeps the SVD form; the deployed cost of attention is dense; a version-1
    artifact still loads."""
    from types import SimpleNamespace
    from svdkern.app.pipeline import costs
    torch.manual_seed(0)
    bare = svdkern.decompose(nn.MultiheadAttention(8, 2).double())
    assert sorted(n for n, _ in svdkern.svd_layers(bare)) == ["factors.k", "factors.q",
                                                               "factors.v", "out_proj"]
    plain = svdkern.export(bare)
    assert type(plain) is nn.MultiheadAttention and type(plain.out_proj) is not svdkern.SVDLinear
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    assert rel_err(plain(x, x, x)[0], bare(x, x, x)[0]) < 1e-12
    bare._reset_parameters()
    U = bare.factors.k.U
    torch.testing.assert_close(U.t() @ U, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    assert bare.in_proj_bias.abs().max() == 0

    model = svdkern.decompose(nn.Sequential(nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(), nn.Linear(8 * 3, 2)))
    svdkern.prune(model, energy=0.5)
    data = SimpleNamespace(test_x=torch.randn(1, 3, 8))
    c = costs(model, data)
    linear = dict(svdkern.svd_layers(model))["2"]
    # q, k, v, out_proj, linear1, linear2 and their SVD layers' biases (in_proj_bias is
    # attention's own, outside the SVD layers the costs count)
    merged_dense = 4 * 8 * 8 + 2 * 8 * 16 + 8 + 16 + 8
    assert c["deployed_params"] == merged_dense + (linear.lowrank_params()
                                                   if linear.worth_factorizing()
                                                   else 8 * 3 * 2 + 2)

    import json
    svdkern.save_compressed(model, tmp_path / "v1")
    layout_file = tmp_path / "v1" / "svdkern.json"
    layout = json.loads(layout_file.read_text())
    layout["version"] = 1
    layout_file.write_text(json.dumps(layout))
    fresh = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(8 * 3, 2))
    y = svdkern.load_compressed(fresh, tmp_path / "v1")(data.test_x)
    assert rel_err(y, model(data.test_x)) < 1e-5
