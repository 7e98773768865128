"""save_compressed / load_compressed: safetensors + JSON, loaded into a freshly built dense
architecture (no pickle, no svdkern layers), checked before anything changes; and the
exported low-rank models run outside eager PyTorch (torch.export, ONNX Runtime)."""
import json

import pytest
import torch
import torch.nn as nn

import svdkern
from svdkern import SVDLayer
from tests.helpers import rel_err, small_cnn

pytest.importorskip("safetensors")
PLAIN = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Embedding)


def pruned_cnn(scheme="channel"):
    model = svdkern.decompose(small_cnn(), scheme=scheme)
    svdkern.prune(model, 0.2)
    return model


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_a_pruned_model_loads_into_a_fresh_dense_architecture(tmp_path, scheme):
    model = pruned_cnn(scheme)
    svdkern.save_compressed(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "svdkern.json"]
    layout = json.loads((tmp_path / "svdkern.json").read_text())["layers"]
    assert {entry["form"] for entry in layout.values()} == {"lowrank", "dense"}
    assert [entry["rank"] for entry in layout.values()] == [
        layer.rank for _, layer in svdkern.svd_layers(model)]
    loaded = svdkern.load_compressed(small_cnn(), tmp_path)
    assert all(isinstance(m, PLAIN) for m in loaded.modules())
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    assert rel_err(loaded(x), model(x)) < 1e-12
    exported = svdkern.export(model)
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in exported.parameters())


def test_a_bare_layer_round_trips(tmp_path):
    layer = svdkern.SVDLinear.from_dense(nn.Linear(30, 20).double(), rank=4)
    svdkern.save_compressed(layer, tmp_path)
    loaded = svdkern.load_compressed(nn.Linear(30, 20).double(), tmp_path)
    assert isinstance(loaded, nn.Sequential) and loaded[0].out_features == 4
    x = torch.randn(3, 30, dtype=torch.float64)
    assert rel_err(loaded(x), layer(x)) < 1e-12


def test_a_mismatched_architecture_is_refused_and_left_unchanged(tmp_path):
    svdkern.save_compressed(pruned_cnn(), tmp_path)
    other = small_cnn()
    other[-1] = nn.Linear(90, 7).double()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="layer 6 is a Linear.*was saved"):
        svdkern.load_compressed(other, tmp_path)
    assert isinstance(other[-1], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    layout = json.loads((tmp_path / "svdkern.json").read_text())
    layout["version"] = 99
    (tmp_path / "svdkern.json").write_text(json.dumps(layout))
    with pytest.raises(ValueError, match="version 99"):
        svdkern.load_compressed(small_cnn(), tmp_path)


def test_a_tensor_of_the_wrong_shape_is_named_before_anything_changes(tmp_path):
    from safetensors.torch import load_file, save_file
    svdkern.save_compressed(pruned_cnn(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "6.1.bias" in tensors  # the last linear became a pair
    tensors["6.1.bias"] = torch.zeros(5, dtype=torch.float64)
    save_file(tensors, tmp_path / "model.safetensors")
    model = small_cnn()
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"6.1.bias: saved \(5,\), expected \(9,\)"):
        svdkern.load_compressed(model, tmp_path)
    assert [type(m) for m in model.modules()] == kinds


class TiedLM(nn.Module):
    """An embedding tied to the output head, around linears svdkern converts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 12)
        self.body = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 12))
        self.head = nn.Linear(12, 30, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.body(self.embed(tokens)))


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    model = svdkern.decompose(TiedLM(), skip=["head"])
    svdkern.prune(model, 0.3)
    svdkern.save_compressed(model, tmp_path)
    loaded = svdkern.load_compressed(TiedLM(), tmp_path)
    assert loaded.head.weight is loaded.embed.weight
    tokens = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def tiny_bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=40,
                                   max_position_embeddings=16, num_labels=3)


def test_a_hugging_face_model_loads_back_with_the_documented_one_liner(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = svdkern.decompose(AutoModelForSequenceClassification.from_config(tiny_bert_config()))
    svdkern.prune(model, 0.2)
    model.eval()
    svdkern.save_compressed(model, tmp_path)
    assert (tmp_path / "config.json").exists()
    # README "Deploy": the one-liner
    loaded = svdkern.load_compressed(AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(tmp_path)), tmp_path).eval()
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, SVDLayer) for m in loaded.modules())


def exported_models():
    """A ResNet-like CNN (residual block, strided and grouped convs) and a BERT-like encoder,
    both pruned, exported low-rank, in eval mode, with an example input."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    resnet = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), Block(),
                           nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(16, 10))
    models = {"resnet": (resnet, torch.randn(2, 3, 16, 16))}
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(tiny_bert_config(), add_pooling_layer=False)
    models["bert"] = (bert, torch.randint(0, 50, (2, 7)))
    out = {}
    for name, (model, x) in models.items():
        svdkern.decompose(model)
        svdkern.prune(model, 0.2)
        out[name] = (svdkern.export(model).eval(), x)
    return out


def first_output(y):
    return y if isinstance(y, torch.Tensor) else y[0]


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_exported_models_run_under_torch_export(name):
    model, x = exported_models()[name]
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(first_output(program.module()(x)), first_output(model(x)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_exported_models_run_in_onnx_runtime(tmp_path, name):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, x = exported_models()[name]
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = first_output(model(x))
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


class Shared(nn.Module):
    """One linear used at two paths."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(40, 40)
        self.b = self.a
        self.out = nn.Linear(40, 5)

    def forward(self, x):
        return self.out(self.b(torch.relu(self.a(x))))


def test_a_layer_used_at_two_paths_loads_once_at_both(tmp_path):
    model = svdkern.decompose(Shared())
    svdkern.prune(model, 0.5)
    svdkern.save_compressed(model, tmp_path)
    loaded = svdkern.load_compressed(Shared(), tmp_path)
    assert loaded.a is loaded.b and isinstance(loaded.a, nn.Sequential)
    x = torch.randn(3, 40)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_refusals_leave_the_model_unchanged(tmp_path):
    svdkern.save_compressed(svdkern.decompose(TiedLM(), skip=["head"]), tmp_path / "tied")
    untied = svdkern.decompose(TiedLM(), skip=["head"])
    untied.head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    svdkern.save_compressed(untied, tmp_path / "untied")
    fresh = TiedLM()
    kinds = [type(m) for m in fresh.modules()]
    with pytest.raises(ValueError, match="stored apart, but one tensor in the model"):
        svdkern.load_compressed(fresh, tmp_path / "untied")
    assert [type(m) for m in fresh.modules()] == kinds
    with torch.device("meta"):
        on_meta = TiedLM()
    with pytest.raises(ValueError, match="meta device"):
        svdkern.load_compressed(on_meta, tmp_path / "tied")
    svdkern.save_compressed(pruned_cnn(), tmp_path / "cnn")
    strided = small_cnn()
    dense_layers = [n for n, e in json.loads((tmp_path / "cnn" / "svdkern.json").read_text())[
        "layers"].items() if e["form"] == "dense" and e["kind"] == "conv"]
    strided.get_submodule(dense_layers[0]).stride = (2, 2)  # a layer saved dense
    with pytest.raises(ValueError, match=f"layer {dense_layers[0]} is a Conv2d"):
        svdkern.load_compressed(strided, tmp_path / "cnn")
    loaded = svdkern.load_compressed(small_cnn(), tmp_path / "cnn")
    with pytest.raises(ValueError, match=r"is a Sequential, but a (Linear|Conv2d)"):
        svdkern.load_compressed(loaded, tmp_path / "cnn")  # already holds the pairs
