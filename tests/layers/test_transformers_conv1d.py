"""SVDConv1D: transformers' Conv1D (GPT-2's linears) in SVD form, and GPT-2 end to end:
decompose (the tied head left dense with a warning), regularizer, prune, export,
checkpoints and the pickle-free artifact, all against the dense model in float64."""
import pytest
import torch

import svdkern
from svdkern import SVDConv1D
from tests.helpers import rel_err

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


@pytest.mark.parametrize("nf, nx, rank", [(7, 5, None), (5, 9, None), (6, 6, 1), (11, 4, 3)])
def test_from_dense_matches_conv1d_forward_and_every_gradient(nf, nx, rank):
    torch.manual_seed(0)
    dense = Conv1D(nf, nx).double()
    with torch.no_grad():
        dense.bias.normal_()
    layer = SVDConv1D.from_dense(dense, rank=rank)
    assert (layer.nf, layer.nx, layer.weight.shape) == (nf, nx, (nx, nf))
    if rank is None:
        torch.testing.assert_close(layer.weight, dense.weight, rtol=1e-12, atol=1e-12)
    else:  # the truncated SVD of W
        U, s, Vh = torch.linalg.svd(dense.weight.detach().t())
        want = (U[:, :rank] * s[:rank]) @ Vh[:rank]
        torch.testing.assert_close(layer.weight.t(), want, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 3, nx, dtype=torch.float64).permute(1, 0, 2).requires_grad_()  # strided
    want = torch.func.functional_call(dense, {"weight": layer.weight, "bias": layer.bias},
                                      (x.contiguous(),))  # Conv1D views its input
    got = layer(x)
    assert rel_err(got, want) < 1e-12
    dy = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, layer.U, layer.s, layer.V, layer.bias), dy)
    ref = torch.autograd.grad(want, (x, layer.U, layer.s, layer.V, layer.bias), dy)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 1e-12
    assert torch.autograd.gradcheck(lambda xx: layer(xx), (x.detach()[:1].requires_grad_(),))


def test_from_scratch_follows_conv1d_init():
    torch.manual_seed(0)
    layer = SVDConv1D(768, 256)
    want = torch.cat([torch.linalg.svdvals(Conv1D(768, 256).weight.detach().double())
                      for _ in range(3)])
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(layer.s.detach().double(), q),
                               torch.quantile(want, q), rtol=0.04, atol=0)
    assert torch.all(layer.bias == 0)
    with pytest.raises(TypeError, match="expected transformers' Conv1D"):
        SVDConv1D.from_dense(torch.nn.Linear(3, 2))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double().eval()


def test_gpt2_decomposes_every_conv1d_exactly_and_warns_of_what_stays_dense():
    model, dense = tiny_gpt2(), tiny_gpt2()
    with pytest.warns(UserWarning, match="lm_head .its weight is tied to transformer.wte's"):
        svdkern.decompose(model)
    names = [name for name, _ in svdkern.svd_layers(model)]
    assert len(names) == 8 and all(n.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for n in names)
    assert model.lm_head.weight is model.transformer.wte.weight
    tokens = torch.randint(0, 50, (2, 7))
    assert rel_err(model(tokens).logits, dense(tokens).logits) < 1e-10
    loss = model(tokens, labels=tokens).loss + svdkern.SVDRegularizer(model)()
    loss.backward()
    assert all(layer.U.grad is not None for _, layer in svdkern.svd_layers(model))


def test_gpt2_prune_export_checkpoint_and_artifact_agree(tmp_path):
    model = tiny_gpt2()
    with pytest.warns(UserWarning):
        svdkern.decompose(model)
    svdkern.prune(model, 0.2)
    ranks = [layer.rank for _, layer in svdkern.svd_layers(model)]
    assert ranks != [24, 24, 24, 24, 24, 24, 24, 24][:len(ranks)]
    tokens = torch.randint(0, 50, (2, 7))
    want = model(tokens).logits
    for form in ("lowrank", "dense"):
        exported = svdkern.export(model, form)
        assert not svdkern.svd_layers(exported)
        assert rel_err(exported(tokens).logits, want) < 1e-10, form
    assert any(isinstance(m, Conv1D) for m in svdkern.export(model, "dense").modules())
    svdkern.save(model, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning):
        fresh = svdkern.decompose(tiny_gpt2())
    svdkern.load(fresh, tmp_path / "ckpt.pt")
    assert [layer.rank for _, layer in svdkern.svd_layers(fresh)] == ranks
    assert rel_err(fresh(tokens).logits, want) < 1e-12
    svdkern.save_compressed(model, tmp_path / "artifact")
    loaded = svdkern.load_compressed(tiny_gpt2(), tmp_path / "artifact")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert rel_err(loaded(tokens).logits, want) < 1e-10
