"""SVDLSTM, SVDGRU and SVDRNN against torch's modules in float64 (every layer and direction,
proj_size, packed sequences), and a recurrent language model through decompose, prune,
export, checkpoints and the artifact."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import svdkern
from svdkern import SVDGRU, SVDLSTM, SVDRNN
from tests.helpers import rel_err

CASES = [(nn.LSTM, SVDLSTM, dict(num_layers=2, bidirectional=True, proj_size=3,
                                  batch_first=True)),
         (nn.LSTM, SVDLSTM, dict(bias=False)),
         (nn.GRU, SVDGRU, dict(num_layers=2, bidirectional=True)),
         (nn.RNN, SVDRNN, dict(nonlinearity="relu", num_layers=3))]


@pytest.mark.parametrize("dense_type, svd_type, kwargs", CASES)
def test_from_dense_matches_forward_and_every_gradient(dense_type, svd_type, kwargs):
    torch.manual_seed(0)
    dense = dense_type(5, 7, **kwargs).double()
    layer = svd_type.from_dense(copy.deepcopy(dense), name="rnn")
    assert isinstance(layer, dense_type)
    names = [n for n, _ in dense.named_parameters() if n.startswith("weight_")]
    assert sorted(layer.factors) == sorted(names)
    x = torch.randn(4, 6, 5, dtype=torch.float64)  # (batch, time) or (time, batch)
    y, state = dense(x)
    y_svd, state_svd = layer(x)
    assert rel_err(y_svd, y) < 1e-12
    for name in names:
        assert rel_err(getattr(layer, name), getattr(dense, name)) < 1e-12
    loss = lambda out, st: (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + sum(
        t.square().sum() for t in (st if isinstance(st, tuple) else (st,)))
    loss(y, state).backward()
    loss(y_svd, state_svd).backward()
    for name in names:  # each factor's gradient is the dense gradient pulled back
        g, f = getattr(dense, name).grad, layer.factors[name]
        assert rel_err(f.U.grad, g @ f.V * f.s) < 1e-9, name
        assert rel_err(f.V.grad, g.t() @ f.U * f.s) < 1e-9, name
        assert rel_err(f.s.grad, ((f.U.t() @ g) * f.V.t()).sum(1)) < 1e-9, name
    for name, p in dense.named_parameters():
        if name.startswith("bias_"):
            assert rel_err(layer.get_parameter(name).grad, p.grad) < 1e-12, name


def test_packed_sequences_initial_state_and_rank_one_gradcheck():
    torch.manual_seed(0)
    dense = nn.LSTM(3, 4, bidirectional=True).double()
    layer = SVDLSTM.from_dense(copy.deepcopy(dense))
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
    h0 = (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64))
    assert rel_err(layer(packed, h0)[0].data, dense(packed, h0)[0].data) < 1e-12
    small = SVDGRU.from_dense(nn.GRU(2, 3).double(), rank=1)
    params = [p for f in small.factors.values() for p in (f.U, f.s, f.V)]
    torch.autograd.gradcheck(lambda x, *p: small(x)[0],
                             (torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True),
                              *params))


class CharLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 20)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


def test_language_model_decompose_prune_export_checkpoint_and_artifact(tmp_path):
    model = CharLM().double()
    tokens = torch.randint(0, 20, (3, 9))
    expected = model(tokens)
    with pytest.warns(UserWarning, match="dense: embed \\(an embedding") as seen:
        svdkern.decompose(model)
    assert "rnn" not in str(seen[0].message)
    assert isinstance(model.rnn, SVDLSTM)
    assert rel_err(model(tokens), expected) < 1e-12
    assert len(svdkern.svd_layers(model)) == 5  # 4 RNN matrices and the head
    svdkern.prune(model, energy=0.2)
    assert model.rnn.factors.weight_hh_l0.rank < 16
    pruned = model(tokens)
    for form in ("lowrank", "dense"):
        plain = svdkern.export(model, form)
        assert type(plain.rnn) is nn.LSTM and not svdkern.svd_layers(plain)
        assert rel_err(plain(tokens), pruned) < 1e-10
    svdkern.save(model, tmp_path / "ckpt.pt")
    fresh = CharLM().double()
    with pytest.warns(UserWarning):
        svdkern.decompose(fresh)
    svdkern.load(fresh, tmp_path / "ckpt.pt")
    assert rel_err(fresh(tokens), pruned) < 1e-12
    svdkern.save_compressed(model, tmp_path / "art")
    loaded = svdkern.load_compressed(CharLM().double(), tmp_path / "art")
    assert rel_err(loaded(tokens), pruned) < 1e-10


def test_copies_device_moves_and_compile_keep_working():
    layer = SVDLSTM(4, 5, num_layers=2)
    x = torch.randn(3, 2, 4)
    y = layer(x)[0]
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x)[0], y)
    doubled = layer.double()
    assert rel_err(doubled(x.double())[0], y.double()) < 1e-6
    assert all(w is None for w in doubled._flat_weights[:2])  # nothing kept between calls
    compiled = torch.compile(SVDGRU(4, 5))  # dynamo breaks the graph at torch's RNNs
    assert compiled(x)[0].shape == (3, 2, 5)
    state = layer.state_dict()
    assert "factors.weight_ih_l0.U" in state and "weight_ih_l0" not in state


def test_assignment_and_bad_input_are_named_errors():
    layer = SVDRNN(3, 4, name="enc.rnn")
    with pytest.raises(AttributeError, match="enc.rnn: weight_hh_l0 is computed from the factors"):
        layer.weight_hh_l0 = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="^enc.rnn: input.size\\(-1\\) must be equal to "):
        layer(torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="enc.rnn.weight_ih_l0: rank 9 out of range"):
        SVDRNN(3, 4, rank=9, name="enc.rnn")


def test_from_scratch_follows_torch_init_spectrum():
    torch.manual_seed(0)
    dense = nn.LSTM(128, 96)
    layer = SVDLSTM(128, 96)
    for name in ("weight_ih_l0", "weight_hh_l0"):
        want = torch.linalg.svdvals(getattr(dense, name).detach()).median()
        got = torch.linalg.svdvals(getattr(layer, name).detach()).median()
        assert rel_err(got, want) < 0.05, name


def test_review_cases(tmp_path):
    """reset_parameters keeps the SVD form; a thin input matrix does not keep the whole
    LSTM dense; threads do not share a call's matrices; a subclass converts; tied weights
    are named as tied."""
    import threading
    import warnings
    layer = SVDLSTM(16, 32)
    layer.reset_parameters()
    U = layer.factors.weight_hh_l0.U
    torch.testing.assert_close(U.t() @ U, torch.eye(32), atol=1e-5, rtol=0)
    bound = 1 / 32 ** 0.5
    assert layer.bias_ih_l0.abs().max() <= bound and layer.bias_ih_l0.std() > bound / 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thin = svdkern.decompose(nn.Sequential(nn.LSTM(1, 8)))  # weight_ih_l0 is 32 x 1
    assert isinstance(thin[0], SVDLSTM)
    with pytest.warns(UserWarning, match=r"0 \(every weight matrix is 1x1, of rank <= 1"):
        svdkern.decompose(nn.Sequential(nn.RNN(1, 1), nn.Linear(3, 3)))

    model = SVDGRU.from_dense(nn.GRU(4, 6).double()).eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)[0]
    errors, outputs = [], []

    def work():
        try:
            with torch.no_grad():
                for _ in range(20):
                    outputs.append(rel_err(model(x)[0], expected))
        except Exception as exc:  # noqa: BLE001 (collected and reported below)
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and max(outputs) < 1e-12

    class MyLSTM(nn.LSTM):
        pass
    sub = svdkern.decompose(nn.Sequential(MyLSTM(3, 4).double()))
    assert isinstance(sub[0], SVDLSTM)

    a, b = nn.LSTM(3, 4), nn.LSTM(3, 4)
    b.weight_hh_l0 = a.weight_hh_l0
    with pytest.warns(UserWarning, match="tied to"):
        svdkern.decompose(nn.Sequential(a, b, nn.Linear(4, 4)))

    dense = model.to_dense()
    dense.register_forward_hook(lambda *args: errors.append("hook ran"))
    model(x)
    assert errors == []
